"""Geometry of the one preprocessing step: an image, its mask and its boxes brought to a square grid together.

Boxes are float (x0, y0, x1, y1) in continuous pixel coordinates of the displayed image: pixel column ``c``
covers ``[c, c + 1)``, so a box ``(0, 0, W, H)`` covers the whole image. Readers convert the data sets'
conventions (1-based inclusive corners in MATLAB/VOC files, x/y/w/h in CSVs) into this one.

Pixel conventions: "resize" stretches to size x size (aspect not kept, the paper's); "pad" centres the image on
a square canvas (image: the pad value, mask: background) and then resizes, so aspect is kept. The image is
resampled with antialiased bicubic interpolation and clamped to [0, 1]; masks use nearest-exact (the pixel
whose centre is nearest), which is the same rule `boxes_to_mask` applies to boxes. All three move together
as torchvision tv_tensors (Image, Mask, BoundingBoxes) through torchvision.transforms.v2 (pad, then resize).
torchvision scales boxes by float32 factors, so box edges may differ from exact arithmetic by about 1e-7 of
their value; an edge lying exactly on a pixel centre can then fall to the neighbouring pixel.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Literal

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

ResizeMode = Literal["resize", "pad"]
RESIZE_MODES = ("resize", "pad")


def as_boxes(boxes: Iterable[Sequence[float]] | np.ndarray | None) -> np.ndarray:
    """Boxes as a float64 (N, 4) array of (x0, y0, x1, y1); None or empty gives shape (0, 4)."""
    if boxes is None:
        return np.zeros((0, 4), dtype=np.float64)
    array = np.asarray(list(boxes) if not isinstance(boxes, np.ndarray) else boxes, dtype=np.float64)
    return array.reshape(-1, 4)


def boxes_to_mask(h: int, w: int, boxes: Iterable[Sequence[float]] | np.ndarray | None) -> np.ndarray:
    """Rasterise the union of boxes (x0, y0, x1, y1) on an (h, w) grid: bool (h, w).

    A pixel is inside when its centre (c + 0.5, r + 0.5) lies in [x0, x1) x [y0, y1), so resizing a box and
    rasterising it agrees with nearest-neighbour resizing of the box's mask. A box whose sides are positive
    but smaller than one pixel still marks the pixel holding its centre, so no box ever vanishes.
    Boxes with x1 < x0 (or y1 < y0) are read with their corners swapped; boxes are clipped to the grid.
    This is the package's only box rasteriser: the box-scored readers' truth masks and the metric tests use it.
    """
    mask = np.zeros((h, w), dtype=bool)
    for x0, y0, x1, y1 in as_boxes(boxes):
        x0, x1 = min(x0, x1), max(x0, x1)
        y0, y1 = min(y0, y1), max(y0, y1)
        if not (x1 > x0 and y1 > y0):
            continue
        c0, c1 = math.ceil(x0 - 0.5), math.ceil(x1 - 0.5)
        r0, r1 = math.ceil(y0 - 0.5), math.ceil(y1 - 0.5)
        if c1 <= c0:
            c0, c1 = math.floor((x0 + x1) / 2), math.floor((x0 + x1) / 2) + 1
        if r1 <= r0:
            r0, r1 = math.floor((y0 + y1) / 2), math.floor((y0 + y1) / 2) + 1
        c0, c1 = max(c0, 0), min(c1, w)
        r0, r1 = max(r0, 0), min(r1, h)
        if c1 > c0 and r1 > r0:
            mask[r0:r1, c0:c1] = True
    return mask


def union_pixel_box(h: int, w: int, boxes: Iterable[Sequence[float]] | np.ndarray | None) -> tuple[int, int, int, int] | None:
    """The one box around all `boxes` (x0, y0, x1, y1) (min of the near corners, max of the far ones), as the
    pixels `boxes_to_mask` marks for it on an (h, w) grid: (r0, c0, r1, c1), half-open row and column ranges
    (metrics.PixelBox). None when there are no boxes or the union box covers no pixel of the grid (it lies
    outside). Box-scored data sets compare the box around a predicted mask with this box (metrics.mean_box_iou).
    """
    array = as_boxes(boxes)
    if not len(array):
        return None
    xs, ys = np.sort(array[:, [0, 2]], axis=1), np.sort(array[:, [1, 3]], axis=1)  # corners may come swapped
    mask = boxes_to_mask(h, w, [(xs[:, 0].min(), ys[:, 0].min(), xs[:, 1].max(), ys[:, 1].max())])
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if not rows.size:
        return None
    return (int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1)


def _padding(h: int, w: int, mode: str) -> list[int]:
    """[left, top, right, bottom] that centres an (h, w) image on a square ("pad"); zeros for "resize"."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {mode!r}")
    if mode == "resize":
        return [0, 0, 0, 0]
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    return [left, top, side - w - left, side - h - top]


def _to_square(item, padding: list[int], size: int, interpolation: InterpolationMode, fill: float = 0.0):
    """Pad (when `padding` is not all zero) and resize one tv_tensor to size x size."""
    if any(padding):
        item = TF.pad(item, padding, fill=fill)
    return TF.resize(item, [size, size], interpolation=interpolation, antialias=True)  # a no-op at size


def _box_tensor(boxes, hw: tuple[int, int]) -> tv_tensors.BoundingBoxes:
    # no clamping: boxes may leave the image, and boxes_to_mask clips them where it rasterises
    return tv_tensors.BoundingBoxes(torch.from_numpy(as_boxes(boxes)), format="XYXY", canvas_size=hw,
                                    clamping_mode=None)


def transform_boxes(boxes, hw: tuple[int, int], size: int, mode: ResizeMode = "resize") -> np.ndarray:
    """Map boxes (N, 4) given on an (h, w) image to the size x size output of `resize_image_and_mask`:
    float64 (N, 4). Raises ValueError for an unknown mode."""
    out = _to_square(_box_tensor(boxes, hw), _padding(*hw, mode), size, InterpolationMode.NEAREST)
    return out.as_subclass(torch.Tensor).numpy()


def resize_image_and_mask(
    image: np.ndarray | torch.Tensor,
    mask: np.ndarray | torch.Tensor | None,
    size: int,
    mode: ResizeMode = "resize",
    *,
    boxes=None,
    pad_value: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor | None, np.ndarray | None]:
    """The one preprocessing step: image (H, W, 3) float [0, 1] (numpy or torch) to a (3, size, size) tensor,
    with its mask and boxes moved the same way (torchvision.transforms.v2 on tv_tensors).

    - ``mode="resize"`` (the paper's: everything to 512 x 512) stretches to size x size; aspect is not kept.
    - ``mode="pad"`` pads to a centred square (image: `pad_value`, mask: background) and then resizes, so
      aspect is kept; the padding counts as background pixels when scoring.

    The image uses antialiased bicubic interpolation (clamped to [0, 1]); the mask (H, W) — which may be at a
    different size from the image, in which case it is taken to cover the same extent — uses nearest-exact.
    `boxes` on the (H, W) image are mapped to the output grid and returned as (N, 4) (None if not given).
    Returns (image (3, size, size) float32, mask (size, size) bool or None, boxes float64 (N, 4) or None).
    Raises ValueError for a wrongly shaped image or mask, or an unknown mode.
    """
    img = torch.as_tensor(np.ascontiguousarray(image) if isinstance(image, np.ndarray) else image)
    img = img.to(torch.float32)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3), got {tuple(img.shape)}")
    h, w = int(img.shape[0]), int(img.shape[1])
    padding = _padding(h, w, mode)
    out = _to_square(tv_tensors.Image(img.permute(2, 0, 1)), padding, size, InterpolationMode.BICUBIC, pad_value)
    out_image = out.as_subclass(torch.Tensor).clamp(0.0, 1.0).contiguous()

    out_mask = None
    if mask is not None:
        m = torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask).to(torch.uint8)
        if m.ndim != 2:
            raise ValueError(f"mask must be (H, W), got {tuple(m.shape)}")
        m = tv_tensors.Mask(m[None])
        if tuple(m.shape[-2:]) != (h, w):  # a mask stored at another size covers the same extent as the image
            m = TF.resize(m, [h, w], interpolation=InterpolationMode.NEAREST_EXACT)
        m = _to_square(m, padding, size, InterpolationMode.NEAREST_EXACT)
        out_mask = m.as_subclass(torch.Tensor)[0].to(torch.bool).contiguous()

    out_boxes = None
    if boxes is not None:
        out = _to_square(_box_tensor(boxes, (h, w)), padding, size, InterpolationMode.NEAREST)
        out_boxes = out.as_subclass(torch.Tensor).numpy()
    return out_image, out_mask, out_boxes
