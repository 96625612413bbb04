"""The shapes world as data sets: the concept data set D (with exact masks) and the captioned world.

- `ShapesWorldDataModule`: D for one concept, split into train / val / test. Each split is a disjoint
  range of the same generator (train from index 0, val from 1,000,000, test from 2,000,000); D keeps, in
  index order, the first `num_<split>` images that contain the concept (an object whose shape or colour is
  a concept word), so a split always has exactly the requested size. "mask" is the concept's exact visible
  mask; other objects are distractors and count as background.
- `CaptionedWorldDataset` (`ShapesWorldDataModule.caption_dataset`): image-caption pairs of every kind (any
  shape, any colour, empty images captioned "a photo of a background") for training the world's diffusion
  model, drawn from index 10,000,000 on, so they never coincide with an image of D.

Images are the uint8 quantisation of the renderer's float images (as a PNG of them would be), converted to
float32 in [0, 1]; everything is rendered once, when a data set is first asked for, and kept in memory.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from conceptdistill.data.base import ConceptDataModule, Split
from conceptdistill.world.render import (
    BACKGROUND_FAMILIES,
    DEFAULT_COLOURS,
    WorldConfig,
    concept_words_of,
    objects_concept_mask,
    render_batch,
)

SPLIT_OFFSETS: dict[str, int] = {"train": 0, "val": 1_000_000, "test": 2_000_000}
CAPTION_OFFSET = 10_000_000
_CHUNK = 512


class WorldArrayDataset(Dataset):
    """Samples held as arrays: uint8 images (N, H, W, 3), bool masks (N, H, W), captions, optional labels."""

    def __init__(
        self,
        prefix: str,
        images: np.ndarray,
        masks: np.ndarray,
        captions: Sequence[str],
        indices: Sequence[int],
        labels: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        self.prefix = prefix
        self.images = images
        self.masks = masks
        self.captions = list(captions)
        #: the world index each sample was rendered from (render_sample(config, seed, index) gives it back)
        self.indices = [int(i) for i in indices]
        self.labels = {k: list(v) for k, v in (labels or {}).items()}

    def __len__(self) -> int:
        return len(self.images)

    def sample_id(self, i: int) -> str:
        return f"{self.prefix}-{i:06d}"

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i = i % len(self)
        sample = {
            "id": self.sample_id(i),
            "image": torch.from_numpy(self.images[i]).permute(2, 0, 1).float().div_(255.0),
            "mask": torch.from_numpy(self.masks[i].copy()),
            "caption": self.captions[i],
        }
        for key, values in self.labels.items():
            sample[key] = values[i]
        return sample


class CaptionedWorldDataset(WorldArrayDataset):
    """(image, caption) pairs of all kinds, with "mask" (union of all objects), "shape" and "colour" labels.

    The labels are the first object's ("" for an empty image): exact in a one-object world.
    """

    def __init__(
        self, config: WorldConfig, num: int, seed: int = 0, offset: int = CAPTION_OFFSET, prefix: str = "world"
    ) -> None:
        indices = list(range(offset, offset + int(num)))
        images, masks, captions, objects = _render_chunked(config, seed, indices)
        labels = {
            "shape": [objs[0].shape if objs else "" for objs in objects],
            "colour": [objs[0].colour if objs else "" for objs in objects],
        }
        super().__init__(prefix, images, masks, captions, indices, labels)
        self.config = config
        self.seed = int(seed)


def _render_chunked(config: WorldConfig, seed: int, indices: list[int]):
    size = config.image_size
    images = np.empty((len(indices), size, size, 3), dtype=np.uint8)
    masks = np.empty((len(indices), size, size), dtype=bool)
    captions: list[str] = []
    objects: list = []
    for start in range(0, len(indices), _CHUNK):
        batch = render_batch(config, seed, indices[start : start + _CHUNK])
        images[start : start + len(batch.images)] = batch.images
        masks[start : start + len(batch.images)] = batch.masks
        captions += batch.captions
        objects += batch.objects
    return images, masks, captions, objects


def concept_dataset(
    config: WorldConfig,
    concept: str | Iterable[str],
    seed: int,
    num: int,
    offset: int,
    prefix: str,
    max_scan: int | None = None,
) -> WorldArrayDataset:
    """The first `num` images from index `offset` on that contain the concept, with their concept masks."""
    words = concept_words_of(concept)
    size = config.image_size
    max_scan = max_scan if max_scan is not None else max(10_000, 1000 * int(num))
    images, masks, captions, indices = [], [], [], []
    index = offset
    while len(images) < num:
        if index - offset >= max_scan:
            raise RuntimeError(f"found only {len(images)} of {num} images containing {words} in {max_scan} draws")
        chunk = min(_CHUNK, max(64, 2 * (num - len(images))))
        batch = render_batch(config, seed, range(index, index + chunk))
        for j in range(chunk):
            mask = objects_concept_mask(batch.objects[j], words, size)
            if mask.any():
                images.append(batch.images[j])
                masks.append(mask)
                captions.append(batch.captions[j])
                indices.append(index + j)
                if len(images) == num:
                    break
        index += chunk
    empty_images = np.empty((0, size, size, 3), dtype=np.uint8)
    empty_masks = np.empty((0, size, size), dtype=bool)
    return WorldArrayDataset(
        prefix,
        np.stack(images) if images else empty_images,
        np.stack(masks) if masks else empty_masks,
        captions,
        indices,
    )


class ShapesWorldDataModule(ConceptDataModule):
    """The concept data set D of the shapes world, with exact ground-truth masks (`truth = "mask"`)."""

    truth = "mask"

    def __init__(
        self,
        *,
        image_size: int = 32,
        concept: str | Sequence[str] = "circle",
        seed: int = 0,
        num_train: int = 1000,
        num_val: int = 100,
        num_test: int = 500,
        batch_size: int = 16,
        num_workers: int = 0,
        shapes: Sequence[str] = ("circle", "square", "triangle"),
        colours: Mapping[str, Sequence[float]] | None = None,
        min_objects: int = 1,
        max_objects: int = 1,
        p_empty: float = 0.1,
        radius_range: Sequence[float] = (0.16, 0.30),
        backgrounds: Sequence[str] = BACKGROUND_FAMILIES,
        pixel_noise: float = 0.02,
        shading: float = 0.15,
        rotate: bool = True,
        max_overlap: float = 0.2,
    ) -> None:
        super().__init__(image_size=image_size, batch_size=batch_size, num_workers=num_workers)
        self.world = WorldConfig(
            image_size=image_size,
            shapes=tuple(shapes),
            colours=dict(colours) if colours is not None else dict(DEFAULT_COLOURS),
            min_objects=min_objects,
            max_objects=max_objects,
            p_empty=p_empty,
            radius_range=tuple(radius_range),
            backgrounds=tuple(backgrounds),
            pixel_noise=pixel_noise,
            shading=shading,
            rotate=rotate,
            max_overlap=max_overlap,
        )
        self.concept_words = concept_words_of(concept)
        unknown = [w for w in self.concept_words if w not in self.world.words]
        if not self.concept_words or unknown:
            raise ValueError(
                f"concept words {unknown or self.concept_words} are not shapes or colours of this "
                f"world: {self.world.words}"
            )
        self.concept = concept if isinstance(concept, str) else " ".join(self.concept_words)
        self.seed = int(seed)
        self.sizes: dict[str, int] = {"train": int(num_train), "val": int(num_val), "test": int(num_test)}
        self._datasets: dict[str, WorldArrayDataset] = {}

    def setup(self, stage: str | None = None) -> None:
        """Nothing to download; data sets are rendered on first use by `dataset(split)`."""

    def dataset(self, split: Split) -> WorldArrayDataset:
        if split not in SPLIT_OFFSETS:
            raise ValueError(f"unknown split {split!r}; expected one of {tuple(SPLIT_OFFSETS)}")
        if split not in self._datasets:
            self._datasets[split] = concept_dataset(
                self.world, self.concept_words, self.seed, self.sizes[split], SPLIT_OFFSETS[split], split
            )
        return self._datasets[split]

    def records(self, split: Split) -> None:
        """None: the shapes world is generated, so it lists no files (raises ValueError for an unknown split)."""
        if split not in SPLIT_OFFSETS:
            raise ValueError(f"unknown split {split!r}; expected one of {tuple(SPLIT_OFFSETS)}")
        return None

    def stats(self) -> dict:
        """{}: nothing is read from disk, so nothing is skipped or converted."""
        return {}

    def caption_dataset(self, num: int, seed: int | None = None) -> CaptionedWorldDataset:
        """Captioned images of every kind for training the world's diffusion model (seed defaults to ours)."""
        return CaptionedWorldDataset(self.world, num, self.seed if seed is None else seed)
