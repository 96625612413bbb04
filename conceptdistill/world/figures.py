"""Picture the shapes world: a PNG grid of images above their masks (PIL only)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from conceptdistill.utils.io import atomic_write, to_uint8
from conceptdistill.world.render import WorldSample

#: tints for the objects' masks in the overlay, in drawing order
_TINTS = np.array([(1.0, 0.1, 0.6), (0.1, 0.9, 1.0), (1.0, 0.6, 0.0), (0.5, 1.0, 0.2), (0.6, 0.4, 1.0)])


def _image_and_masks(sample: Any) -> tuple[np.ndarray, list[np.ndarray]]:
    """float (H, W, 3) in [0, 1] and a list of bool masks, from a WorldSample or a sample dict."""
    if isinstance(sample, WorldSample):
        return np.asarray(sample.image, dtype=np.float64), [obj.mask for obj in sample.objects]
    image = sample["image"]
    mask = sample.get("mask")
    image = image.detach().cpu().numpy() if hasattr(image, "detach") else np.asarray(image)
    if image.ndim == 3 and image.shape[0] in (1, 3) and image.shape[-1] not in (1, 3):
        image = image.transpose(1, 2, 0)
    image = image.astype(np.float64) / (255.0 if image.dtype == np.uint8 else 1.0)
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    masks = []
    if mask is not None:
        mask = mask.detach().cpu().numpy() if hasattr(mask, "detach") else np.asarray(mask)
        masks.append(mask.astype(bool))
    return image, masks


def mask_overlay(image: np.ndarray, masks: Sequence[np.ndarray]) -> np.ndarray:
    """Background dimmed to 30% grey, each mask blended half-and-half with its tint."""
    grey = image.mean(axis=-1, keepdims=True)
    out = np.repeat(0.3 * grey, 3, axis=-1)
    for k, mask in enumerate(masks):
        out[mask] = 0.5 * image[mask] + 0.5 * _TINTS[k % len(_TINTS)]
    return out


def save_world_grid(
    path: str | os.PathLike, samples: Sequence[Any], ncols: int = 8, scale: int | None = None, pad: int = 2
) -> None:
    """Save a grid: for each row of `ncols` samples, a row of images and below it a row of mask overlays.

    `samples` are WorldSamples (each object's visible mask gets its own tint) or sample dicts with "image"
    ((3, H, W) tensor or (H, W, 3) array) and optionally "mask". Images are enlarged by `scale`
    (nearest neighbour; default: to about 96 pixels).
    """
    if not samples:
        raise ValueError("no samples to draw")
    tiles = [_image_and_masks(s) for s in samples]
    height, width = tiles[0][0].shape[:2]
    scale = scale or max(1, 96 // max(height, width))
    ncols = max(1, min(ncols, len(tiles)))
    nrows = -(-len(tiles) // ncols)
    cell_h, cell_w = height * scale + pad, width * scale + pad
    canvas = np.full((2 * nrows * cell_h + pad, ncols * cell_w + pad, 3), 1.0)
    for n, (image, masks) in enumerate(tiles):
        row, col = divmod(n, ncols)
        y, x = 2 * row * cell_h + pad, col * cell_w + pad
        for k, tile in enumerate((np.clip(image, 0.0, 1.0), mask_overlay(np.clip(image, 0.0, 1.0), masks))):
            big = np.kron(tile, np.ones((scale, scale, 1)))
            canvas[y + k * cell_h : y + k * cell_h + height * scale, x : x + width * scale] = big
    pixels = to_uint8(canvas)
    with atomic_write(path) as handle:
        Image.fromarray(pixels, mode="RGB").save(handle, format="PNG")
