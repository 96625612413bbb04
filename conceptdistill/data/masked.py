"""(image, mask) pairs for training and scoring a segmenter, resized and augmented with torchvision v2
(`tv_tensors` keep the image and its mask under the same geometry)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset


class MaskedImages(Dataset):
    """(image, mask) pairs for training: images of a data set with masks read from a stage's folder, or the
    synthetic set's own images and masks; resized to the segmenter's size, optionally augmented.

    Without augmentation (scoring), a sample's truth "boxes" (float64 (N, 4), x0 y0 x1 y1, data/base.py) are
    carried along, moved to the size x size grid with the image, so the box protocol can be scored there.
    """

    def __init__(self, dataset: Dataset, masks=None, *, size: int, augment: bool, image_store=None) -> None:
        from torchvision.transforms import v2

        self.dataset, self.masks, self.image_store, self.size, self.augment = dataset, masks, image_store, size, augment
        steps = [v2.RandomHorizontalFlip(), v2.RandomResizedCrop(size, scale=(0.6, 1.0), antialias=True)] if augment \
            else [v2.Resize((size, size), antialias=True)]
        self.transform = v2.Compose(steps)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        from torchvision import tv_tensors

        sample = self.dataset[index]
        sid = sample["id"]
        if self.image_store is not None:
            image = torch.from_numpy(self.image_store.load("image", sid).transpose(2, 0, 1).copy())
        else:
            image = sample["image"]
        mask = torch.from_numpy(self.masks.load("mask", sid)) if self.masks is not None else sample["mask"]
        if mask.shape != image.shape[-2:]:  # M_pre is at latent resolution
            mask = F.interpolate(mask[None, None].float(), size=image.shape[-2:], mode="nearest")[0, 0]
        image = tv_tensors.Image(image)
        mask = tv_tensors.Mask(mask.to(torch.uint8))
        if "boxes" in sample and not self.augment:
            boxes = tv_tensors.BoundingBoxes(torch.as_tensor(sample["boxes"], dtype=torch.float64).reshape(-1, 4),
                                             format="XYXY", canvas_size=tuple(image.shape[-2:]), clamping_mode=None)
            image, mask, boxes = self.transform(image, mask, boxes)
            extra = {"boxes": boxes.as_subclass(torch.Tensor).numpy()}
        else:
            image, mask = self.transform(image, mask)
            extra = {}
        return {"id": sid, "image": image.as_subclass(torch.Tensor).float(), "mask": mask.as_subclass(torch.Tensor).bool(),
                **extra}
