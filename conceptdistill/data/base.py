"""The one interface every data set offers the stages.

A data set yields one dict per image:
- "id": str, unique within the data set and safe as a file name (no slashes);
- "image": float32 tensor (3, H, W) in [0, 1], already resized to the data module's `image_size`;
- "mask": bool tensor (H, W), the concept's ground-truth foreground, present only when `truth` is not None
  (for box-scored data sets it is the union of the boxes, rasterised: the paper scores those against boxes);
- "boxes": float64 numpy (N, 4), N >= 0, the truth boxes (x0, y0, x1, y1) in pixels of the output grid
  (data/geometry.py conventions), present only when `truth` is "box"; kept as a list by `collate_samples`;
- "caption": str, present where the data set has one (the shapes world); never used for training targets.

Ground truth is used for evaluation only, never for training (except the supervised upper-bound row).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar, Literal

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

if TYPE_CHECKING:
    from conceptdistill.data.scanning import ImageRecord

Split = Literal["train", "val", "test"]
TruthKind = Literal["mask", "box"] | None


class ConceptDataModule(pl.LightningDataModule, ABC):
    """The contract every data module keeps; the stages, the runner and the evaluation rely on nothing else.

    Subclasses implement `dataset`, `records` and `stats`, and set `truth`. Members:

    - `truth` (class attribute, or set per instance before use): "mask" when samples carry an exact mask,
      "box" when their "mask" is the union of annotated boxes rasterised at `image_size` (scored as the paper
      scores box data sets), None when samples carry no "mask" (nothing to score against).
    - `image_size`: int, the side of every sample's square image and mask (pixels).
    - `batch_size`, `num_workers`: the defaults `loader` uses.
    - `dataset(split)`, `loader(...)`, `records(split)`, `stats()`: see each.
    """

    #: what "mask" means in the samples: exact masks ("mask"), rasterised boxes ("box"), or absent (None)
    truth: ClassVar[TruthKind] = None

    def __init__(self, *, image_size: int, batch_size: int = 16, num_workers: int = 0) -> None:
        super().__init__()
        #: side of every sample's square image and mask, in pixels
        self.image_size = image_size
        self.batch_size = batch_size
        self.num_workers = num_workers

    @abstractmethod
    def dataset(self, split: Split) -> Dataset:
        """The map-style data set of `split` ("train", "val" or "test"), built once and then reused.

        Each item is the sample dict of the module doc: "id" str, "image" float32 (3, image_size, image_size)
        in [0, 1], "mask" bool (image_size, image_size) when `truth` is not None, "boxes" float64 (N, 4) when
        `truth` is "box", "caption" str where the data set has one. Raises ValueError for another split name; real-data readers raise `DatasetLayoutError`
        (a FileNotFoundError) for a missing or malformed annotation file met while listing.
        """

    @abstractmethod
    def records(self, split: Split) -> list[ImageRecord] | None:
        """The files a split lists, before the setup scan drops unusable ones (`ImageRecord`s: id, image path,
        mask path, boxes), in a deterministic order; None for generated data, which has no files. Used to
        fingerprint the data (a file replaced on disk invalidates finished work). Raises ValueError for an
        unknown split."""

    @abstractmethod
    def stats(self) -> dict:
        """Per split built so far: {"kept", "skipped", "converted": int, "converted_modes": {mode: int},
        "skipped_paths": [str], and "skipped_kinds": {kind: int} when something was skipped}, so a stage can
        report what the setup scan dropped; kept + skipped = the records listed. {} for generated data, where
        nothing is read from disk."""

    def loader(self, dataset: Dataset, *, shuffle: bool = False, batch_size: int | None = None) -> DataLoader:
        """A DataLoader over any data set of this module's samples (a split, or a subset of one), with this
        module's workers and `collate_samples`: batches hold "image" float32 (B, 3, S, S), "mask" bool (B, S, S)
        where every sample has one, and lists of the strings. `batch_size` defaults to the module's."""
        return DataLoader(
            dataset,
            batch_size=batch_size or self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=collate_samples,
        )

    def dataloader(self, split: Split, *, shuffle: bool = False, batch_size: int | None = None) -> DataLoader:
        """`loader` over `dataset(split)`."""
        return self.loader(self.dataset(split), shuffle=shuffle, batch_size=batch_size)

    def train_dataloader(self) -> DataLoader:
        return self.dataloader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self.dataloader("val")

    def test_dataloader(self) -> DataLoader:
        return self.dataloader("test")


def collate_samples(samples: list[dict]) -> dict:
    """Stack tensors, keep strings as lists; a key missing from any sample is dropped from the batch."""
    keys = set(samples[0]).intersection(*samples[1:])
    batch: dict = {}
    for key in sorted(keys):
        values = [sample[key] for sample in samples]
        batch[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return batch
