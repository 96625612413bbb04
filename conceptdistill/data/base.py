"""The one interface every data set offers the stages.

A data set yields one dict per image:
- "id": str, unique within the data set and safe as a file name (no slashes);
- "image": float32 tensor (3, H, W) in [0, 1], already resized to the data module's `image_size`;
- "mask": bool tensor (H, W), the concept's ground-truth foreground, present only when `truth` is not None
  (for box-scored data sets it is the union of the boxes, rasterised: the paper scores those against boxes);
- "caption": str, present where the data set has one (the shapes world); never used for training targets.

Ground truth is used for evaluation only, never for training (except the supervised upper-bound row).
"""

from __future__ import annotations

from typing import Literal

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

Split = Literal["train", "val", "test"]
TruthKind = Literal["mask", "box"] | None


class ConceptDataModule(pl.LightningDataModule):
    """Base class: subclasses implement `dataset(split)` and set `truth`."""

    #: what "mask" means in the samples: exact masks, rasterised boxes, or absent
    truth: TruthKind = None

    def __init__(self, *, image_size: int, batch_size: int = 16, num_workers: int = 0) -> None:
        super().__init__()
        self.image_size = image_size
        self.batch_size = batch_size
        self.num_workers = num_workers

    def dataset(self, split: Split) -> Dataset:
        raise NotImplementedError

    def loader(self, dataset: Dataset, *, shuffle: bool = False, batch_size: int | None = None) -> DataLoader:
        """A loader over any data set of this module's samples (a split, or a subset of one)."""
        return DataLoader(
            dataset,
            batch_size=batch_size or self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=collate_samples,
        )

    def dataloader(self, split: Split, *, shuffle: bool = False, batch_size: int | None = None) -> DataLoader:
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
