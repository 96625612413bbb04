"""Per-sample artifacts on disk: the prediction writer that stages write through, and the data set
wrappers that let later stages read them.

Layout under a stage folder: `<split>/<output name>/<sample id>.<png|npy>`. Masks and images are PNGs a
person can open; float maps are float16 .npy files. Every file is written atomically (temp file + rename),
so a killed run leaves only whole files, and `pending()` lets a rerun compute only what is missing.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pytorch_lightning.callbacks import BasePredictionWriter
from torch.utils.data import Dataset, Subset

from conceptdistill.utils.io import (
    load_array,
    load_image_png,
    load_mask_png,
    save_array,
    save_image_png,
    save_mask_png,
)

log = logging.getLogger(__name__)

Kind = Literal["mask", "image", "array"]
_EXTENSION = {"mask": "png", "image": "png", "array": "npy"}
_SAVE = {"mask": save_mask_png, "image": save_image_png, "array": save_array}
_LOAD = {"mask": load_mask_png, "image": load_image_png, "array": load_array}


class ArtifactStore:
    """Names the files of one stage and split: `folder/<output>/<id>.<ext>`."""

    def __init__(self, folder: str | Path, outputs: dict[str, Kind]) -> None:
        self.folder = Path(folder)
        self.outputs = dict(outputs)

    def path(self, output: str, sample_id: str) -> Path:
        return self.folder / output / f"{sample_id}.{_EXTENSION[self.outputs[output]]}"

    def has(self, sample_id: str) -> bool:
        return all(self.path(name, sample_id).exists() for name in self.outputs)

    def save(self, sample_id: str, output: str, value) -> None:
        if isinstance(value, torch.Tensor):
            value = value.detach().float().cpu().numpy()
        _SAVE[self.outputs[output]](self.path(output, sample_id), value)

    def load(self, output: str, sample_id: str) -> np.ndarray:
        return _LOAD[self.outputs[output]](self.path(output, sample_id))

    def discard_partial(self) -> int:
        """Delete the temp files of writes a killed run left unfinished (`atomic_write` names them
        `.<file name>.<random>.tmp`); returns how many. Only called before a trainer starts writing here."""
        removed = 0
        for name in self.outputs:
            for leftover in (self.folder / name).glob(".*.tmp"):
                leftover.unlink(missing_ok=True)
                removed += 1
        return removed

    def ids(self, output: str) -> list[str]:
        ext = _EXTENSION[self.outputs[output]]
        return sorted(p.name[: -len(ext) - 1] for p in (self.folder / output).glob(f"*.{ext}"))


class SampleWriter(BasePredictionWriter):
    """Writes each sample's outputs as soon as its batch is predicted.

    `predict_step` returns a list with one dict per sample: {"id": ..., <output name>: array, ...}.
    Under DDP, Lightning's predict sampler gives each rank distinct samples, so each file is written once.
    """

    def __init__(self, store: ArtifactStore) -> None:
        super().__init__(write_interval="batch")
        self.store = store

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        for sample in prediction:
            for name in self.store.outputs:
                self.store.save(sample["id"], name, sample[name])


def sample_ids(dataset: Dataset) -> list[str]:
    """Ids of a data set's samples, cheaply where the data set can tell them without loading images."""
    if isinstance(dataset, Subset):
        parent = sample_ids(dataset.dataset)
        return [parent[i] for i in dataset.indices]
    if hasattr(dataset, "sample_ids"):
        return list(dataset.sample_ids())
    if hasattr(dataset, "sample_id"):
        return [dataset.sample_id(i) for i in range(len(dataset))]
    return [dataset[i]["id"] for i in range(len(dataset))]


def pending(dataset: Dataset, store: ArtifactStore) -> Dataset:
    """The samples whose outputs are not all on disk yet (a resumed run computes only these).

    Also deletes the temp files of interrupted writes: safe because every rank calls this before its
    trainer's setup barrier, so no rank is writing into `store` yet.
    """
    if removed := store.discard_partial():
        log.info("removed %d unfinished temp file(s) of an interrupted run in %s", removed, store.folder)
    ids = sample_ids(dataset)
    todo = [index for index, sid in enumerate(ids) if not store.has(sid)]
    if len(todo) < len(ids):
        log.info("%d of %d samples already done in %s; computing the other %d", len(ids) - len(todo), len(ids),
                 store.folder, len(todo))
    return Subset(dataset, todo)


class WithArtifacts(Dataset):
    """Adds earlier stages' per-sample outputs to each sample, e.g. {"prelim_mask": (store, "mask")}."""

    def __init__(self, dataset: Dataset, extras: dict[str, tuple[ArtifactStore, str]]) -> None:
        self.dataset = dataset
        self.extras = extras

    def __len__(self) -> int:
        return len(self.dataset)

    def sample_ids(self) -> list[str]:
        return sample_ids(self.dataset)

    def __getitem__(self, index: int) -> dict:
        sample = dict(self.dataset[index])
        for key, (store, output) in self.extras.items():
            value = store.load(output, sample["id"])
            if value.ndim == 3:  # images come back (H, W, 3); samples carry (3, H, W)
                value = value.transpose(2, 0, 1)
            sample[key] = torch.from_numpy(np.ascontiguousarray(value))
        return sample
