"""Mask maths for concept distillation: binarisation, majority filtering, refinement and loss rectangles.

Pure numpy functions (no file I/O, no torch). Unless stated otherwise a function works on one (H, W) map.
See docs/METHOD.md, stage 1 step 4 (binarisation), stage 2 (background rectangles) and stage 3 step 2
(refined masks).
"""

from __future__ import annotations

import logging
import math
from typing import Literal, NamedTuple, TypedDict

import numpy as np
from scipy import ndimage
from sklearn.mixture import GaussianMixture

logger = logging.getLogger(__name__)

__all__ = [
    "DEGENERATE_ATOL",
    "DEGENERATE_RTOL",
    "DegenerateMapError",
    "Rect",
    "RectangleRules",
    "binarize_map",
    "centre_box_mask",
    "close_and_fill_holes",
    "gmm_threshold",
    "majority_filter",
    "rectangle_rules_for",
    "refine_mask",
    "resize_nearest",
    "sample_background_rectangle",
    "upsample_mask",
]

# SD 1.x latent grid side; the paper's rectangle rules are stated for it.
_REFERENCE_LATENT_SIZE = 64

# A map whose range is at most DEGENERATE_RTOL * magnitude + DEGENERATE_ATOL is constant up to rounding. The
# relative part is about two float16 ulps (eps 2**-10 ~ 1e-3): attention is computed in float16 on GPUs and
# stored in float16, so a flat map of values ~1e-3 comes back with a spread of an ulp or two (~1e-6). Real
# low-contrast maps differ by percents (the shapes world's inside/outside contrast is 1.04). The absolute part
# only catches maps that are zero up to round-off.
DEGENERATE_RTOL = 2e-3
DEGENERATE_ATOL = 1e-12


class DegenerateMapError(ValueError):
    """The map has no two-cluster structure to threshold (constant up to rounding, all-NaN, or one cluster)."""


# --------------------------------------------------------------------------------------------------
# Binarisation
# --------------------------------------------------------------------------------------------------


def _check_not_flat(flat: np.ndarray, rtol: float, atol: float, what: str) -> None:
    """Raise DegenerateMapError when the finite float64 values `flat` are constant up to rounding."""
    if flat.size < 2:
        raise DegenerateMapError(f"cannot threshold {what} with {flat.size} finite value(s)")
    low, high = float(flat.min()), float(flat.max())
    magnitude = max(abs(low), abs(high))
    if high - low <= rtol * magnitude + atol:
        raise DegenerateMapError(
            f"{what} is constant up to rounding: range {high - low:.3g} <= {rtol:g} * {magnitude:.3g} + {atol:g} "
            f"({np.unique(flat).size} distinct finite value(s))"
        )


def gmm_threshold(
    values: np.ndarray,
    *,
    seed: int = 0,
    max_samples: int = 100_000,
    rtol: float = DEGENERATE_RTOL,
    atol: float = DEGENERATE_ATOL,
) -> float:
    """Midpoint of the two component means of a 2-component Gaussian mixture fitted to `values`.

    `values`: any shape and real dtype (float16 storage included), any range; non-finite values are ignored.
    Deterministic: the mixture uses `random_state=seed` and inputs larger than `max_samples` are subsampled
    with a generator seeded by `seed`. Returns a float64 threshold within the values' range.

    Raises:
        DegenerateMapError: nothing to split: fewer than 2 finite values; a map constant up to rounding, i.e.
            (max - min) <= rtol * max(|max|, |min|) + atol (defaults `DEGENERATE_RTOL` = 2e-3, about two float16
            ulps, and `DEGENERATE_ATOL` = 1e-12), which would otherwise be split along its round-off noise; or
            two fitted means that coincide.
    """
    flat = np.asarray(values, dtype=np.float64).ravel()
    flat = flat[np.isfinite(flat)]
    _check_not_flat(flat, rtol, atol, "a map")
    if flat.size > max_samples:
        flat = np.random.default_rng(seed).choice(flat, size=max_samples, replace=False)
        _check_not_flat(flat, rtol, atol, "the subsample of a map")

    # Standardise before fitting: attention probabilities are ~1e-3 with variances far below sklearn's
    # reg_covar (1e-6), which would otherwise blur the components. The midpoint is affine-equivariant.
    centre, scale = flat.mean(), flat.std()
    standardised = ((flat - centre) / scale).reshape(-1, 1)
    gmm = GaussianMixture(n_components=2, covariance_type="full", random_state=seed)
    gmm.fit(standardised)
    low, high = sorted(float(m) for m in gmm.means_.ravel())
    if not math.isfinite(low) or not math.isfinite(high) or high - low < 1e-6:
        raise DegenerateMapError("the two mixture components have the same mean")
    return float(centre + scale * (low + high) / 2.0)


def majority_filter(mask: np.ndarray, size: int = 3) -> np.ndarray:
    """Each pixel becomes the majority value of its size x size neighbourhood (itself included).

    Border handling: only in-image neighbours are counted (a corner pixel of a 3x3 filter votes over 4
    pixels). A tie, which can only happen at the border, keeps the pixel's own value.
    """
    if size < 1 or size % 2 == 0:
        raise ValueError(f"size must be a positive odd integer, got {size}")
    mask = np.asarray(mask, dtype=bool)
    kernel = np.ones((size, size), dtype=np.int32)
    # Integer convolution with zero padding gives exact counts of True and of in-image neighbours.
    true_count = ndimage.convolve(mask.astype(np.int32), kernel, mode="constant", cval=0)
    in_image = ndimage.convolve(np.ones(mask.shape, dtype=np.int32), kernel, mode="constant", cval=0)
    twice = 2 * true_count
    return np.where(twice == in_image, mask, twice > in_image)


def binarize_map(
    attention_map: np.ndarray,
    *,
    filter_size: int = 3,
    seed: int = 0,
    polarity: Literal["high", "low"] = "high",
    floor: float | None = None,
) -> tuple[np.ndarray, float]:
    """GMM-midpoint threshold then majority filter: returns (bool mask, threshold).

    polarity "high" (the method's rule) marks values above the threshold as object; "low" marks those
    below it. A degenerate map (see `gmm_threshold`: constant up to rounding, all-NaN, or one cluster) gives
    an all-False mask and threshold nan, with a logged warning; this never raises for degenerate input. filter_size <= 1 disables the majority filter. `floor` (polarity
    "high" only) is the smallest threshold allowed: a map whose two clusters are both below it (noise
    only) then gives an empty mask instead of a split of the noise.
    """
    values = np.asarray(attention_map, dtype=np.float64)
    try:
        threshold = gmm_threshold(values, seed=seed)
    except DegenerateMapError as error:
        logger.warning("degenerate map of shape %s, returning an empty mask: %s", values.shape, error)
        return np.zeros(values.shape, dtype=bool), float("nan")
    if floor is not None and polarity == "high":
        threshold = max(threshold, float(floor))
    # NaN pixels compare False on both sides, so they are never object.
    mask = values > threshold if polarity == "high" else values < threshold
    if filter_size > 1:
        mask = majority_filter(mask, filter_size)
    return mask, threshold


# --------------------------------------------------------------------------------------------------
# Resolution change and refinement
# --------------------------------------------------------------------------------------------------


def resize_nearest(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of the last two axes to `size` = (H, W), keeping the dtype; any factor.

    Hand-written index arithmetic: output pixel i reads source pixel floor(i * h_in / H), the convention
    of torch's `interpolate(mode="nearest")`; scipy's zoom(order=0) rounds differently at non-integer
    factors. Integer factors reduce to pixel repetition.
    """
    array = np.asarray(array)
    out_h, out_w = size
    in_h, in_w = array.shape[-2:]
    rows = (np.arange(out_h) * in_h) // out_h
    cols = (np.arange(out_w) * in_w) // out_w
    return array[..., rows[:, None], cols[None, :]]


def upsample_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """`resize_nearest` of a mask, as bool (latent-resolution masks to the image grid)."""
    return resize_nearest(mask, size).astype(bool)


def refine_mask(
    preliminary_mask_upsampled: np.ndarray,
    image: np.ndarray,
    background: np.ndarray,
    *,
    filter_size: int = 3,
    seed: int = 0,
    close_holes: bool = False,
    closing_size: int = 3,
    min_difference: float = 2 / 255,
) -> np.ndarray:
    """Refined mask M = M_pre_up AND binarize(mean_rgb |image - background|).

    A pixel whose mean difference is at most `min_difference` (default: two 8-bit grey levels, i.e.
    quantisation noise) is never object, whatever the mixture fit says: an image that the inpainting
    reproduced gives an empty mask rather than a threshold through its noise.

    `image` and `background` are float (H, W, 3) in [0, 1]; `preliminary_mask_upsampled` is (H, W).
    With `close_holes`, binary closing then hole filling are applied to the difference mask before the
    AND, so M never exceeds M_pre_up. Identical image and background give an all-False mask.
    """
    pre = np.asarray(preliminary_mask_upsampled, dtype=bool)
    image = np.asarray(image, dtype=np.float64)
    background = np.asarray(background, dtype=np.float64)
    if image.shape != background.shape or image.shape[:2] != pre.shape:
        raise ValueError(f"shape mismatch: mask {pre.shape}, image {image.shape}, background {background.shape}")
    difference = np.abs(image - background)
    if difference.ndim == 3:
        difference = difference.mean(axis=-1)
    changed, _ = binarize_map(difference, filter_size=filter_size, seed=seed, floor=min_difference)
    if close_holes:
        changed = close_and_fill_holes(changed, closing_size)
    return pre & changed


def mirrored_background(image: np.ndarray, object_mask: np.ndarray) -> np.ndarray:
    """The simple-inpainting baseline's background ("M_crop", Dombrowski et al. 2023, ablation): the object
    region filled with the image's own background, flipped into the object's place.

    Of the three mirror images (left-right, top-bottom, both), the one that brings the most background pixels
    into the object region fills first, then the others fill what is left; object pixels that no mirror covers
    with background get the mean background colour (the image's mean when everything is object). Written here:
    no library fills a region from a flipped copy.

    Args:
        image: (H, W, C) float array, any range.
        object_mask: (H, W) bool, True = object (M_pre at the image's size).
    Returns:
        (H, W, C) array of image's dtype, equal to `image` outside the object region.
    """
    if image.shape[:2] != object_mask.shape:
        raise ValueError(f"image {image.shape[:2]} and mask {object_mask.shape} differ in size")
    background = ~object_mask
    mirrors = [(image[:, ::-1], background[:, ::-1]), (image[::-1], background[::-1]),
               (image[::-1, ::-1], background[::-1, ::-1])]
    # the mirror that supplies the largest background region over the object goes first
    mirrors.sort(key=lambda pair: -int(np.count_nonzero(pair[1] & object_mask)))
    filled, todo = image.copy(), object_mask.copy()
    for flipped, usable in mirrors:
        take = todo & usable
        filled[take] = flipped[take]
        todo &= ~take
    if todo.any():
        filled[todo] = image[background].mean(axis=0) if background.any() else image.reshape(-1, image.shape[-1]).mean(0)
    return filled


def close_and_fill_holes(mask: np.ndarray, closing_size: int = 3) -> np.ndarray:
    """Binary closing (bridges gaps up to about `closing_size` pixels), then hole filling."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return mask.copy()
    structure = np.ones((closing_size, closing_size), dtype=bool)
    # Pad by replication first: scipy's closing treats outside pixels as 0, so its erosion would eat
    # objects that touch the image border.
    pad = closing_size
    padded = np.pad(mask, pad, mode="edge")
    closed = ndimage.binary_closing(padded, structure=structure)[pad:-pad, pad:-pad]
    return ndimage.binary_fill_holes(closed)


# --------------------------------------------------------------------------------------------------
# Stage-2 background rectangles
# --------------------------------------------------------------------------------------------------


class Rect(NamedTuple):
    """A rectangle in latent pixels: rows top:top+height, columns left:left+width."""

    height: int
    width: int
    top: int
    left: int


class RectangleRules(TypedDict):
    """Keyword arguments of `sample_background_rectangle` that define the size rules."""

    min_side: int
    min_area: int
    max_area: int
    max_side: int
    min_background_fraction: float


def rectangle_rules_for(latent_size: int) -> RectangleRules:
    """The paper's rectangle rules (stated for SD's 64x64 latents) scaled to a `latent_size` grid.

    Sides scale linearly and areas quadratically: at 64 this is sides > 10, area 16^2..32^2, not both
    sides > 32; at 16 it is sides > 2, area 4^2..8^2, not both sides > 8.
    Use as `sample_background_rectangle(mask, rng, **rectangle_rules_for(16))`.
    """
    scale = latent_size / _REFERENCE_LATENT_SIZE
    return RectangleRules(
        min_side=max(1, math.floor(10 * scale) + 1),  # "side > 10" -> smallest integer side above 10*scale
        min_area=max(1, round((16 * scale) ** 2)),
        max_area=max(1, round((32 * scale) ** 2)),
        max_side=max(1, round(32 * scale)),
        min_background_fraction=2 / 3,
    )


def _allowed_shapes(
    grid_h: int, grid_w: int, *, min_side: int, min_area: int, max_area: int, max_side: int
) -> np.ndarray:
    """All (height, width) pairs that fit the grid and obey the side and area rules, as an (n, 2) array."""
    heights, widths = np.meshgrid(np.arange(1, grid_h + 1), np.arange(1, grid_w + 1), indexing="ij")
    area = heights * widths
    ok = (
        (heights >= min_side)
        & (widths >= min_side)
        & (area >= min_area)
        & (area <= max_area)
        & ~((heights > max_side) & (widths > max_side))
    )
    return np.stack([heights[ok], widths[ok]], axis=1)


def sample_background_rectangle(
    background_mask: np.ndarray,
    rng: np.random.Generator | int | None,
    *,
    min_side: int = 11,
    min_area: int = 16**2,
    max_area: int = 32**2,
    max_side: int = 32,
    min_background_fraction: float = 2 / 3,
    max_tries: int = 100,
) -> tuple[np.ndarray, Rect | None]:
    """Stage-2 loss mask: the background pixels inside a random rectangle that obeys the paper's rules.

    Rules (latent pixels): both sides >= min_side, min_area <= area <= max_area, not both sides
    > max_side, and at least `min_background_fraction` of the rectangle is background. Each draw picks a
    shape uniformly among those that satisfy the size rules and fit the grid, then a uniform position; only
    the background fraction can then fail. After `max_tries` failed draws, or when no shape fits the
    grid, returns all background pixels (possibly none) and rect None. Always terminates.
    Returns (loss mask of background_mask's shape, Rect or None).
    """
    background = np.asarray(background_mask, dtype=bool)
    if background.ndim != 2:
        raise ValueError(f"background_mask must be (H, W), got shape {background.shape}")
    rng = np.random.default_rng(rng)
    grid_h, grid_w = background.shape
    shapes = _allowed_shapes(grid_h, grid_w, min_side=min_side, min_area=min_area, max_area=max_area, max_side=max_side)
    if len(shapes) and background.any():
        for _ in range(max_tries):
            height, width = (int(v) for v in shapes[rng.integers(len(shapes))])
            top = int(rng.integers(grid_h - height + 1))
            left = int(rng.integers(grid_w - width + 1))
            window = background[top : top + height, left : left + width]
            if window.mean() >= min_background_fraction:
                loss_mask = np.zeros_like(background)
                loss_mask[top : top + height, left : left + width] = window
                return loss_mask, Rect(height, width, top, left)
    return background.copy(), None


def centre_box_mask(h: int, w: int, fraction: float) -> np.ndarray:
    """A centred square of side round(fraction * min(h, w)) as an (h, w) bool mask."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    side = int(round(fraction * min(h, w)))
    top, left = (h - side) // 2, (w - side) // 2
    mask = np.zeros((h, w), dtype=bool)
    mask[top : top + side, left : left + side] = True
    return mask
