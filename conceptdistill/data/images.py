"""Robust image loading and preprocessing shared by every real-data reader.

Decisions (all readers follow them):

- Colour: every image becomes float32 RGB (H, W, 3) in [0, 1]. Grayscale (``L``, ``1``, ``I;16``, ``I``,
  ``F``) is replicated to three channels; ``CMYK``/``YCbCr``/``P``/``LAB``/``HSV`` go through Pillow's RGB
  conversion.
- Transparency (``RGBA``, ``LA``, ``PA``, ``RGBa``, ``La`` and ``P``/``L``/``RGB`` with a ``transparency``
  entry) is composited on WHITE. The colour of a fully transparent pixel is undefined (often black or
  leftover paint), so dropping alpha would show arbitrary content; white is how such images are meant to be
  seen, and it is a neutral "background" for the diffusion model.
- 16-bit and integer images are scaled by their type's range, never by their own min/max (which would
  change the look image by image): ``I;16*`` is divided by 65535; ``I`` (32-bit int, which is how some
  Pillow versions open 16-bit PNGs) is divided by 65535 when its values lie in [0, 65535] and min-max
  normalised only otherwise; ``F`` is kept when it lies in [0, 1] and min-max normalised otherwise.
- EXIF orientation is NOT applied: the data sets' masks and boxes are given on the stored pixel grid.
- Unreadable files (not an image, truncated, corrupt, decompression bomb) raise `UnreadableImageError`.
  `scan_records` decodes every file once at setup and drops those, so a DataLoader worker never meets one.

Boxes are float (x0, y0, x1, y1) in continuous pixel coordinates of the stored image: pixel column ``c``
covers ``[c, c + 1)``, so a box ``(0, 0, W, H)`` covers the whole image. Readers convert the data sets'
conventions (1-based inclusive corners in MATLAB/VOC files, x/y/w/h in CSVs) into this one.
"""

from __future__ import annotations

import logging
import math
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

log = logging.getLogger("conceptdistill.data")

ResizeMode = Literal["resize", "pad"]
RESIZE_MODES = ("resize", "pad")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm")

_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


class UnreadableImageError(OSError):
    """An image (or mask) file that cannot be decoded: not an image, truncated, or corrupt."""


# ----------------------------------------------------------------------------------------------- loading
def _open_checked(path: str | os.PathLike) -> Image.Image:
    try:
        image = Image.open(path)
        image.load()
    except MemoryError:
        raise
    except FileNotFoundError as exc:
        raise UnreadableImageError(f"image file not found: {path}") from exc
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, struct.error, EOFError ...
        raise UnreadableImageError(f"cannot decode image {path}: {type(exc).__name__}: {exc}") from exc
    if image.width == 0 or image.height == 0:
        raise UnreadableImageError(f"image {path} has zero size")
    return image


def needs_conversion(mode: str) -> bool:
    """Whether an image stored in Pillow mode `mode` is converted (not plain 8-bit RGB)."""
    return mode != "RGB"


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in _ALPHA_MODES or (image.mode in ("P", "L", "RGB") and "transparency" in image.info)


def _gray_to_unit(image: Image.Image) -> np.ndarray:
    """A single-channel high-bit-depth image as float32 (H, W) in [0, 1] (see the module doc)."""
    mode = image.mode
    if mode in _SIXTEEN_BIT:
        return np.asarray(image).astype(np.float32) / 65535.0
    array = np.asarray(image).astype(np.float64)
    if mode == "I" and array.size and array.min() >= 0 and array.max() <= 65535:
        return (array / 65535.0).astype(np.float32)
    if mode == "F" and array.size and array.min() >= 0.0 and array.max() <= 1.0:
        return array.astype(np.float32)
    finite = array[np.isfinite(array)]
    low, high = (finite.min(), finite.max()) if finite.size else (0.0, 0.0)
    scaled = (array - low) / (high - low) if high > low else np.zeros_like(array)
    return np.nan_to_num(scaled, nan=0.0).clip(0.0, 1.0).astype(np.float32)


def pil_to_rgb_array(image: Image.Image) -> np.ndarray:
    """Any Pillow image as float32 (H, W, 3) in [0, 1], following the module's conversion rules."""
    mode = image.mode
    if mode == "RGB":
        return np.asarray(image, dtype=np.float32) / 255.0
    if mode in _SIXTEEN_BIT or mode in ("I", "F"):
        gray = _gray_to_unit(image)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if _has_alpha(image):
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float32) / 255.0
        alpha = rgba[:, :, 3:4]
        return rgba[:, :, :3] * alpha + (1.0 - alpha)  # composite on white
    if mode == "L":
        gray = np.asarray(image, dtype=np.float32) / 255.0
        return np.repeat(gray[:, :, None], 3, axis=2)
    return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0


def load_rgb(path: str | os.PathLike) -> np.ndarray:
    """Load any image file as float32 (H, W, 3) in [0, 1]; raise `UnreadableImageError` if it cannot be decoded."""
    with _open_checked(path) as image:
        try:
            array = pil_to_rgb_array(image)
        except MemoryError:
            raise
        except Exception as exc:
            raise UnreadableImageError(f"cannot convert image {path} (mode {image.mode}): {exc}") from exc
    return np.ascontiguousarray(array, dtype=np.float32)


def load_mask(path: str | os.PathLike, threshold: float = 0.5) -> np.ndarray:
    """Load a mask file as bool (H, W).

    Foreground = gray value / max value > `threshold` (8-bit: > 127 for 0.5), after compositing any alpha on
    black (transparent = background). Bilevel (``1``) masks are taken as they are; palette (``P``) masks
    without transparency are label maps: every index other than 0 is foreground. Multi-channel masks use
    the maximum over channels, so a coloured-on-black mask works too.
    """
    with _open_checked(path) as image:
        mode = image.mode
        if mode == "1":
            return np.asarray(image, dtype=bool).copy()
        if mode == "P" and "transparency" not in image.info:
            return np.asarray(image) != 0
        if mode in _SIXTEEN_BIT or mode in ("I", "F"):
            return _gray_to_unit(image) > threshold
        if mode == "L":
            return np.asarray(image, dtype=np.float32) / 255.0 > threshold
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float32) / 255.0
    value = rgba[:, :, :3].max(axis=2) * rgba[:, :, 3]
    return value > threshold


# ------------------------------------------------------------------------------------ geometry helpers
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


def _pad_geometry(h: int, w: int, mode: str) -> tuple[int, int, int]:
    """(side, top, left) of the square canvas that holds the (h, w) image; for "resize" side is unused."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {mode!r}")
    if mode == "resize":
        return 0, 0, 0
    side = max(h, w)
    return side, (side - h) // 2, (side - w) // 2


def transform_boxes(boxes, hw: tuple[int, int], size: int, mode: ResizeMode = "resize") -> np.ndarray:
    """Map boxes given on an (h, w) image to the size x size output of `resize_image_and_mask`."""
    h, w = hw
    boxes = as_boxes(boxes).copy()
    side, top, left = _pad_geometry(h, w, mode)
    if mode == "resize":
        sx, sy = size / w, size / h
        offx = offy = 0.0
    else:
        sx = sy = size / side
        offx, offy = float(left), float(top)
    boxes[:, [0, 2]] = (boxes[:, [0, 2]] + offx) * sx
    boxes[:, [1, 3]] = (boxes[:, [1, 3]] + offy) * sy
    return boxes


def resize_image_and_mask(
    image: np.ndarray | torch.Tensor,
    mask: np.ndarray | torch.Tensor | None,
    size: int,
    mode: ResizeMode = "resize",
    *,
    boxes=None,
    pad_value: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor | None, np.ndarray | None]:
    """The one preprocessing step: image (H, W, 3) float [0, 1] (numpy or torch) to a (3, size, size) tensor.

    - ``mode="resize"`` (the paper's: everything to 512 x 512) stretches to size x size; aspect is not kept.
    - ``mode="pad"`` pads to a centred square (image: `pad_value`, mask: background) and then resizes, so
      aspect is kept; the padding counts as background pixels when scoring.

    The image uses antialiased bicubic interpolation (clamped to [0, 1]); the mask (H, W) — which may be at a
    different size from the image, in which case it is taken to cover the same extent — uses nearest-exact.
    `boxes` on the (H, W) image are mapped to the output grid and returned as (N, 4) (None if not given).
    Returns (image (3, size, size) float32, mask (size, size) bool or None, boxes or None).
    """
    img = torch.as_tensor(np.ascontiguousarray(image) if isinstance(image, np.ndarray) else image)
    img = img.to(torch.float32)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3), got {tuple(img.shape)}")
    h, w = int(img.shape[0]), int(img.shape[1])
    side, top, left = _pad_geometry(h, w, mode)
    chw = img.permute(2, 0, 1)
    if mode == "pad" and (side != h or side != w):
        canvas = torch.full((3, side, side), float(pad_value), dtype=torch.float32)
        canvas[:, top : top + h, left : left + w] = chw
        chw = canvas
    if chw.shape[1] != size or chw.shape[2] != size:
        chw = F.interpolate(chw[None], size=(size, size), mode="bicubic", align_corners=False, antialias=True)[0]
    out_image = chw.clamp_(0.0, 1.0).contiguous()

    out_mask = None
    if mask is not None:
        m = torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask).to(torch.bool)
        if m.ndim != 2:
            raise ValueError(f"mask must be (H, W), got {tuple(m.shape)}")
        if tuple(m.shape) != (h, w):  # a mask stored at another size covers the same extent as the image
            m = F.interpolate(m[None, None].float(), size=(h, w), mode="nearest-exact")[0, 0] > 0.5
        if mode == "pad" and (side != h or side != w):
            canvas_m = torch.zeros((side, side), dtype=torch.bool)
            canvas_m[top : top + h, left : left + w] = m
            m = canvas_m
        if tuple(m.shape) != (size, size):
            m = F.interpolate(m[None, None].float(), size=(size, size), mode="nearest-exact")[0, 0] > 0.5
        out_mask = m.contiguous()

    out_boxes = transform_boxes(boxes, (h, w), size, mode) if boxes is not None else None
    return out_image, out_mask, out_boxes


# ------------------------------------------------------------------------------------- records and scan
@dataclass(frozen=True)
class ImageRecord:
    """One image of a data set, as a reader lists it.

    `boxes` are (x0, y0, x1, y1) in continuous pixel coordinates of the image on disk — or of `box_frame`
    = (width, height) when the annotation was made on an image of another size (they are then rescaled to
    the stored image). `boxes=()` means "box-scored, no box in this image"; None means "no boxes".
    """

    id: str
    image: Path
    mask: Path | None = None
    boxes: tuple[tuple[float, float, float, float], ...] | None = None
    box_frame: tuple[float, float] | None = None


@dataclass
class ScanReport:
    """What `scan_records` found: the readable records, the skipped ones (with why) and the converted ones."""

    kept: list[ImageRecord] = field(default_factory=list)
    skipped_items: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    converted_modes: Counter = field(default_factory=Counter)  # stored mode -> number of images converted

    @property
    def skipped(self) -> int:
        return len(self.skipped_items)

    @property
    def converted(self) -> int:
        return sum(self.converted_modes.values())

    def summary(self) -> dict:
        return {
            "kept": len(self.kept),
            "skipped": self.skipped,
            "converted": self.converted,
            "converted_modes": dict(self.converted_modes),
            "skipped_paths": [path for path, _ in self.skipped_items],
        }


def _check_file(path: Path) -> str:
    """Decode `path` once (cheaply) and return its Pillow mode; raise UnreadableImageError if it fails.

    `Image.verify()` alone does not decode JPEG data, so it misses truncated JPEGs; instead the file is
    decoded for real, JPEGs at 1/8 scale through `draft` (the entropy-coded stream is still read to its end,
    so truncation is caught, at a fraction of the cost).
    """
    try:
        with Image.open(path) as image:
            mode = image.mode
            if image.width == 0 or image.height == 0:
                raise UnreadableImageError(f"image {path} has zero size")
            if image.format == "JPEG":
                image.draft(None, (max(1, image.width // 8), max(1, image.height // 8)))
            image.load()
            return mode
    except (UnreadableImageError, MemoryError):
        raise
    except FileNotFoundError as exc:
        raise UnreadableImageError(f"missing file {path}") from exc
    except Exception as exc:
        raise UnreadableImageError(f"{type(exc).__name__}: {exc}") from exc


def _scan_one(record: ImageRecord, check_masks: bool, require_boxes: bool) -> tuple[str | None, str | None, str]:
    """(mode or None, failing path or None, reason)."""
    if require_boxes and record.boxes is None:
        return None, str(record.image), "no readable box annotation"
    try:
        mode = _check_file(record.image)
    except UnreadableImageError as exc:
        return None, str(record.image), str(exc)
    if check_masks and record.mask is not None:
        try:
            _check_file(record.mask)
        except UnreadableImageError as exc:
            return None, str(record.mask), f"mask: {exc}"
    return mode, None, ""


def scan_records(
    records: Sequence[ImageRecord],
    *,
    check_masks: bool = True,
    require_boxes: bool = False,
    workers: int | None = None,
    name: str = "",
) -> ScanReport:
    """Decode every image (and mask) once; keep the readable records, count and log the rest.

    Logs ONE warning for the skipped files ("skipped N unreadable image(s): first paths ...") and one info
    line for the converted ones. `require_boxes` also skips records whose `boxes` is None (annotation
    missing or unparseable). Threads are used (Pillow releases the GIL while decoding).
    """
    workers = workers or min(8, os.cpu_count() or 1)
    report = ScanReport()
    if workers > 1 and len(records) > 16:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(lambda r: _scan_one(r, check_masks, require_boxes), records, chunksize=32))
    else:
        results = [_scan_one(r, check_masks, require_boxes) for r in records]
    for record, (mode, bad_path, reason) in zip(records, results, strict=True):
        if mode is None:
            report.skipped_items.append((bad_path or str(record.image), reason))
            continue
        report.kept.append(record)
        if needs_conversion(mode):
            report.converted_modes[mode] += 1
    prefix = f"{name}: " if name else ""
    if report.skipped:
        first = "; ".join(f"{p} ({why})" for p, why in report.skipped_items[:5])
        more = f"; ... and {report.skipped - 5} more" if report.skipped > 5 else ""
        log.warning("%sskipped %d unreadable image(s): %s%s", prefix, report.skipped, first, more)
    if report.converted:
        modes = ", ".join(f"{mode}={count}" for mode, count in sorted(report.converted_modes.items()))
        log.info("%sconverted %d image(s) to 8-bit-equivalent RGB (%s)", prefix, report.converted, modes)
    return report


# ------------------------------------------------------------------------------------------ the dataset
class ImageListDataset(Dataset):
    """A map-style data set over `ImageRecord`s that yields the sample dicts of `conceptdistill.data.base`.

    `truth`: "mask" reads `record.mask` (thresholded at `mask_threshold`), "box" rasterises `record.boxes`
    at the output resolution, None yields no "mask". Build it with `ImageListDataset.scan(records, ...)` so
    that unreadable files are dropped at setup; the constructor itself trusts its records. If a file becomes
    unreadable after the scan, `__getitem__` raises `UnreadableImageError` naming it.
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        *,
        image_size: int,
        resize_mode: ResizeMode = "resize",
        truth: str | None = None,
        mask_threshold: float = 0.5,
        report: ScanReport | None = None,
    ) -> None:
        if resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {resize_mode!r}")
        if truth not in ("mask", "box", None):
            raise ValueError(f"truth must be 'mask', 'box' or None, got {truth!r}")
        ids = [r.id for r in records]
        if len(set(ids)) != len(ids):
            dupes = sorted(i for i, n in Counter(ids).items() if n > 1)
            raise ValueError(f"duplicate sample ids: {dupes[:5]}")
        unsafe = [sid for sid in ids if not sid or "/" in sid or "\\" in sid or sid in (".", "..")]
        if unsafe:
            raise ValueError(f"sample ids are not file-name safe: {unsafe[:5]}")
        self.records = list(records)
        self.image_size = int(image_size)
        self.resize_mode = resize_mode
        self.truth = truth
        self.mask_threshold = mask_threshold
        self.report = report or ScanReport(kept=list(records))

    @classmethod
    def scan(
        cls, records: Sequence[ImageRecord], *, workers: int | None = None, name: str = "", **kwargs
    ) -> ImageListDataset:
        """Scan (`scan_records`) and build the data set from the readable records."""
        truth = kwargs.get("truth")
        report = scan_records(
            records, check_masks=truth == "mask", require_boxes=truth == "box", workers=workers, name=name
        )
        return cls(report.kept, report=report, **kwargs)

    @property
    def skipped(self) -> int:
        return self.report.skipped

    @property
    def converted(self) -> int:
        return self.report.converted

    def __len__(self) -> int:
        return len(self.records)

    def sample_ids(self) -> list[str]:
        """Ids without decoding any image (stages use them to find what is already done)."""
        return [record.id for record in self.records]

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        image = load_rgb(record.image)
        h, w = image.shape[:2]
        mask = None
        if self.truth == "mask":
            if record.mask is None:
                raise UnreadableImageError(f"sample {record.id} has no mask file")
            mask = load_mask(record.mask, self.mask_threshold)
        out_image, out_mask, _ = resize_image_and_mask(image, mask, self.image_size, self.resize_mode)
        sample = {"id": record.id, "image": out_image}
        if self.truth == "mask":
            sample["mask"] = out_mask
        elif self.truth == "box":
            boxes = as_boxes(record.boxes)
            if record.box_frame is not None:
                fw, fh = record.box_frame
                boxes = boxes * np.array([w / fw, h / fh, w / fw, h / fh])
            boxes = transform_boxes(boxes, (h, w), self.image_size, self.resize_mode)
            sample["mask"] = torch.from_numpy(boxes_to_mask(self.image_size, self.image_size, boxes))
        return sample
