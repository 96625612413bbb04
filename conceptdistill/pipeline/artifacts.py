"""Per-sample artifacts on disk: the prediction writer that stages write through, and the data set
wrappers that let later stages read them.

Layout under a stage folder: `<split>/<output name>/<sample id>.<png|npy>`. Masks and images are PNGs a
person can open; float maps are float16 .npy files. Every file is written atomically (temp file + rename),
so a killed run leaves only whole files, and `pending()` lets a rerun compute only what is missing.

A sample whose outputs would hold NaN or inf is never written: it is recorded as skipped
(`<split>/skipped/<sample id>.json` with the reason), logged with its id, counted in the stage's summary, and
left out of every later stage, which counts it again as "missing upstream".
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
    read_json,
    save_array,
    save_image_png,
    save_mask_png,
    write_json,
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

    def skip_path(self, sample_id: str) -> Path:
        return self.folder / "skipped" / f"{sample_id}.json"

    def record_skip(self, sample_id: str, reason: str) -> None:
        """Mark a sample as skipped (one small file per sample, so DDP ranks never write the same file)."""
        log.warning("%s: skipped sample %s: %s", self.folder, sample_id, reason)
        write_json(self.skip_path(sample_id), {"id": sample_id, "reason": reason})

    def skipped(self) -> dict[str, str]:
        """Sample id -> reason, for every sample recorded as skipped."""
        return {p.stem: read_json(p)["reason"] for p in sorted((self.folder / "skipped").glob("*.json"))}

    def finished(self, sample_id: str) -> bool:
        """Written or recorded as skipped: a resumed run does not compute it again."""
        return self.has(sample_id) or self.skip_path(sample_id).exists()

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
        for name in [*self.outputs, "skipped"]:
            for leftover in (self.folder / name).glob(".*.tmp"):
                leftover.unlink(missing_ok=True)
                removed += 1
        return removed

    def ids(self, output: str) -> list[str]:
        ext = _EXTENSION[self.outputs[output]]
        return sorted(p.name[: -len(ext) - 1] for p in (self.folder / output).glob(f"*.{ext}"))


class SampleWriter(BasePredictionWriter):
    """Writes each sample's outputs as soon as its batch is predicted.

    `predict_step` returns a list with one dict per sample: {"id": ..., <output name>: array, ...}, or
    {"id": ..., "skipped": reason} for a sample it could not process. A sample any of whose outputs holds a
    non-finite value is recorded as skipped and none of its files is written.
    Under DDP, Lightning's predict sampler gives each rank distinct samples, so each file is written once.
    """

    def __init__(self, store: ArtifactStore) -> None:
        super().__init__(write_interval="batch")
        self.store = store

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        for sample in prediction:
            reason = sample.get("skipped") or nonfinite_outputs(sample, self.store.outputs)
            if reason:
                self.store.record_skip(sample["id"], reason)
                continue
            for name in self.store.outputs:
                self.store.save(sample["id"], name, sample[name])


def nonfinite_outputs(sample: dict, names) -> str | None:
    """A reason naming the outputs of `sample` that hold NaN or inf, or None when all are finite."""
    bad = []
    for name in names:
        value = sample[name]
        array = value.detach().float().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        if array.dtype.kind in "fc" and not np.isfinite(array).all():
            bad.append(name)
    return f"non-finite values in {', '.join(bad)}" if bad else None


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
    todo = [index for index, sid in enumerate(ids) if not store.finished(sid)]
    if len(todo) < len(ids):
        log.info("%d of %d samples already done in %s; computing the other %d", len(ids) - len(todo), len(ids),
                 store.folder, len(todo))
    return Subset(dataset, todo)


def split_counts(store: ArtifactStore, missing_upstream: list[str] | None = None) -> dict:
    """A split's counts for a stage summary: images written, and every sample left out, with why."""
    skipped = store.skipped()
    # "skipped_in_stage": images the stage could not process (e.g. non-finite); the data set's own "skipped"
    # (unreadable files) is counted separately, in summary["data"]
    counts: dict = {"images": len(store.ids(next(iter(store.outputs)))), "skipped_in_stage": len(skipped)}
    if skipped:
        counts["skipped_ids"] = skipped
    if missing_upstream is not None:
        counts["missing_upstream"] = len(missing_upstream)
        if missing_upstream:
            counts["missing_upstream_ids"] = list(missing_upstream)
    return counts


class SampleIds(Dataset):
    """The samples a store holds, as {"id": ...} items (e.g. the synthetic set, whose images are in the store)."""

    def __init__(self, ids: list[str]) -> None:
        self.ids = list(ids)

    def __len__(self) -> int:
        return len(self.ids)

    def sample_ids(self) -> list[str]:
        return list(self.ids)

    def sample_id(self, index: int) -> str:
        return self.ids[index]

    def __getitem__(self, index: int) -> dict:
        return {"id": self.ids[index]}


def present(ids: list[str], outputs: list[tuple[ArtifactStore, str]]) -> tuple[list[int], list[str]]:
    """Positions of the ids for which every (store, output) file exists, and the ids left out (skipped by an
    earlier stage), which are logged."""
    keep = [i for i, sid in enumerate(ids) if all(store.path(output, sid).exists() for store, output in outputs)]
    kept = {ids[i] for i in keep}
    missing = [sid for sid in ids if sid not in kept]
    if missing:
        names = ", ".join(f"{output} in {store.folder}" for store, output in outputs)
        log.warning("%d sample(s) have no %s and are left out: %s", len(missing), names,
                    ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else ""))
    return keep, missing


def with_output(dataset: Dataset, store: ArtifactStore, output: str) -> Subset:
    """The samples of `dataset` for which `store` holds `output` (see `present`)."""
    return Subset(dataset, present(sample_ids(dataset), [(store, output)])[0])


class WithArtifacts(Dataset):
    """Adds earlier stages' per-sample outputs to each sample, e.g. {"prelim_mask": (store, "mask")}.

    Only samples for which every named output exists are kept; the others (skipped upstream, e.g. for a
    non-finite latent) are listed in `missing` so the stage can count them.
    """

    def __init__(self, dataset: Dataset, extras: dict[str, tuple[ArtifactStore, str]]) -> None:
        self.dataset = dataset
        self.extras = extras
        ids = sample_ids(dataset)
        self.indices, self.missing = present(ids, list(extras.values()))
        self._ids = [ids[i] for i in self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def sample_ids(self) -> list[str]:
        return list(self._ids)

    def __getitem__(self, index: int) -> dict:
        sample = dict(self.dataset[self.indices[index]])
        for key, (store, output) in self.extras.items():
            value = store.load(output, sample["id"])
            if value.ndim == 3:  # images come back (H, W, 3); samples carry (3, H, W)
                value = value.transpose(2, 0, 1)
            sample[key] = torch.from_numpy(np.ascontiguousarray(value))
        return sample
