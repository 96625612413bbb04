"""Whether an image of the shapes world holds an object, judged from the world's own rules (world/render.py).

The renderer paints every object pixel in a palette colour times a shading factor f in [1 - shading, 1], and
nothing else comes near those colours: backgrounds are muted (saturation at most 0.30 before texture and
noise, value at most `background_max`). Over 3000 rendered images (3 million background pixels) every object
pixel lay within 0.0023 of its colour's shading line (the uint8 rounding) and every background pixel at least
0.16 from every colour's line (largest difference over R, G, B). So a pixel within `tolerance` (0.1) of a
line is an object pixel, and an image holds an object when the object pixels of one colour form a connected
patch of at least `min_pixels` pixels: on rendered images this is exact, and it still recognises an object a
diffusion model painted, whose colours stray from the palette by a few hundredths and whose edges are ragged.

The judge tells objects by colour, not by shape: a circle repainted in another palette colour is an object.
Its limit is the other way round: a blob in a colour the world never paints (farther than `tolerance` from
every palette shade) is not counted. `removal_rate` applies it to inpainted backgrounds B: how often the
inpainting removed the object instead of repainting one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from conceptdistill.world.render import WorldConfig

#: largest difference (over R, G, B, in [0, 1]) between a pixel and a palette colour's shade that still counts
#: as that colour: far above the renderer's rounding (0.0023), far below the closest background pixel (0.16)
TOLERANCE = 0.1
#: a patch of object pixels counts when it is at least this fraction of the smallest object the world draws
MIN_OBJECT_FRACTION = 0.25


def min_object_pixels(config: WorldConfig, fraction: float = MIN_OBJECT_FRACTION) -> int:
    """Pixels of the smallest object the world draws (every shape has the area of a circle of the smallest
    radius), times `fraction`: 21 for the default world (32 px, radius 0.16 of the side)."""
    radius = config.radius_range[0] * config.image_size
    return max(1, math.ceil(fraction * math.pi * radius * radius))


def shade_distance(image: np.ndarray, colours: np.ndarray, shading: float) -> np.ndarray:
    """(H, W, K): per pixel and palette colour, the largest RGB difference between the pixel and the closest
    shade f * colour, f in [1 - shading, 1] (f chosen by least squares, then kept in that range).

    Args:
        image: (H, W, 3) float in [0, 1] (or uint8, read as value / 255).
        colours: (K, 3) palette colours in [0, 1].
    """
    pixels = _as_float(image)
    palette = np.asarray(colours, dtype=np.float64)
    factor = np.clip(pixels @ palette.T / (palette * palette).sum(axis=1), 1.0 - shading, 1.0)  # (H, W, K)
    return np.abs(pixels[..., None, :] - factor[..., None] * palette).max(axis=-1)


def object_pixels(image: np.ndarray, config: WorldConfig, *, tolerance: float = TOLERANCE) -> np.ndarray:
    """(H, W) int: for each pixel the index (into `config.colours`) of the palette colour whose shade it is,
    -1 for a pixel no palette shade comes within `tolerance` of (background)."""
    distance = shade_distance(image, np.array(list(config.colours.values())), config.shading)
    nearest = distance.argmin(axis=-1)
    return np.where(np.take_along_axis(distance, nearest[..., None], -1)[..., 0] <= tolerance, nearest, -1)


def largest_object_patch(image: np.ndarray, config: WorldConfig, region: np.ndarray | None = None, *,
                         tolerance: float = TOLERANCE) -> int:
    """Pixels of the largest 8-connected patch of one palette colour's object pixels (inside `region`, a bool
    (H, W) mask, when given); 0 when there is none."""
    labels = object_pixels(image, config, tolerance=tolerance)
    if region is not None:
        region = np.asarray(region, dtype=bool)
        if region.shape != labels.shape:
            raise ValueError(f"region {region.shape} does not match the image {labels.shape}")
        labels = np.where(region, labels, -1)
    largest = 0
    for colour in np.unique(labels[labels >= 0]):
        patches, count = ndimage.label(labels == colour, structure=np.ones((3, 3), dtype=bool))
        if count:
            largest = max(largest, int(np.bincount(patches.ravel())[1:].max()))
    return largest


def holds_object(image: np.ndarray, config: WorldConfig, region: np.ndarray | None = None, *,
                 tolerance: float = TOLERANCE, min_pixels: int | None = None) -> bool:
    """Whether `image` ((H, W, 3) float in [0, 1] or uint8) shows an object of the world `config` (inside
    `region` when given): a connected patch of one palette colour's shades of at least `min_pixels` pixels
    (default: a quarter of the smallest object the world draws, `min_object_pixels`). A pure function."""
    needed = min_object_pixels(config) if min_pixels is None else int(min_pixels)
    return largest_object_patch(image, config, region, tolerance=tolerance) >= needed


def removal_rate(backgrounds: Sequence[np.ndarray], regions: Sequence[np.ndarray | None], config: WorldConfig,
                 *, skipped: int = 0) -> dict:
    """How often inpainting removed the object: the fraction of `backgrounds` that hold no object inside their
    `region` (None: the whole image), with the counts behind it.

    Returns {"value": fraction (NaN when nothing was judged), "removed": int, "judged": int, "skipped":
    `skipped`, the images that could not be judged (no background)}.
    """
    verdicts = [not holds_object(background, config, region)
                for background, region in zip(backgrounds, regions, strict=True)]
    judged = len(verdicts)
    removed = sum(verdicts)
    return {"value": removed / judged if judged else float("nan"), "removed": removed, "judged": judged,
            "skipped": int(skipped)}


def _as_float(image: np.ndarray) -> np.ndarray:
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {array.shape}")
    if array.dtype == np.uint8:
        return array.astype(np.float64) / 255.0
    return array.astype(np.float64)
