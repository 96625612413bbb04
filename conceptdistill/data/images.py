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
- EXIF orientation IS applied, to images and masks alike, and boxes are taken to be given on the image as
  displayed: every file is read the way an image viewer shows it, because that is the picture a person drew
  the mask or the box on. Every size this module reports or compares (`image_size`, the setup scan's checks)
  is the displayed size. A mask (or a box annotation's recorded frame) whose aspect ratio fits only the
  stored, unrotated pixels is not rotated to match: the scan skips and counts that sample and says so.
- Unreadable files (not an image, truncated, corrupt, decompression bomb) raise `UnreadableImageError`.
  `scan_records` decodes every file once at setup and drops those, so a DataLoader worker never meets one.
- Masks: see `load_mask` for how every common encoding becomes one bool mask. A mask of another size than
  its image is used when it has the same aspect ratio (it is resized, nearest); otherwise the scan skips the
  sample and counts it (`same_aspect` is the test).

Boxes are float (x0, y0, x1, y1) in continuous pixel coordinates of the displayed image: pixel column ``c``
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


# EXIF Orientation (tag 0x0112) -> the transpose that shows the picture upright, as Pillow's exif_transpose maps it
_EXIF_ORIENTATION_TAG = 0x0112
_ORIENT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SWAPS_AXES = (5, 6, 7, 8)


def exif_orientation(image: Image.Image) -> int:
    """The EXIF Orientation of an opened image, 1..8; 1 (as stored) when absent, invalid or unreadable.

    A broken EXIF block must not make an otherwise readable picture unreadable, so any error reads as 1; the
    loaders and the scan all go through this one function, so they always agree on the displayed size.
    """
    try:
        value = image.getexif().get(_EXIF_ORIENTATION_TAG, 1)
    except Exception:  # malformed EXIF: Pillow raises many kinds
        return 1
    return value if isinstance(value, int) and value in _ORIENT else 1


def _displayed(image: Image.Image) -> Image.Image:
    """The loaded image turned as its EXIF orientation says (the same object when it needs no turning)."""
    method = _ORIENT.get(exif_orientation(image))
    return image.transpose(method) if method is not None else image


def _displayed_wh(stored_wh: tuple[int, int], orientation: int) -> tuple[int, int]:
    w, h = stored_wh
    return (h, w) if orientation in _SWAPS_AXES else (w, h)


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(height, width) of an image file as displayed, i.e. after its EXIF orientation (see the module doc).

    This is the size `load_rgb` returns and the size at which masks are meant to be written back for the
    image. Raises `UnreadableImageError` if the file cannot be opened as an image.
    """
    try:
        with Image.open(path) as image:
            w, h = _displayed_wh(image.size, exif_orientation(image))
    except MemoryError:
        raise
    except Exception as exc:
        raise UnreadableImageError(f"cannot open image {path}: {type(exc).__name__}: {exc}") from exc
    return h, w


def same_aspect(a_wh: tuple[float, float], b_wh: tuple[float, float]) -> bool:
    """Whether two (width, height) sizes are one picture at two resolutions.

    True when they agree up to one pixel of rounding on the smaller grid: |wa * hb - ha * wb| <= the larger
    of (wa + ha, wb + hb). So a mask stored at half the size of a 48 x 41 image (24 x 20 or 24 x 21) passes,
    and so does one pixel of difference at the same size; a 97 x 13 mask for a 48 x 40 image, or a mask
    of the unrotated stored pixels of a portrait photo, does not.
    """
    (wa, ha), (wb, hb) = a_wh, b_wh
    return abs(wa * hb - ha * wb) <= max(wa + ha, wb + hb)


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
    """Load any image file as float32 (H, W, 3) in [0, 1], turned upright by its EXIF orientation (H, W are the
    displayed size); raise `UnreadableImageError` if it cannot be decoded."""
    with _open_checked(path) as image:
        try:
            array = pil_to_rgb_array(_displayed(image))
        except MemoryError:
            raise
        except Exception as exc:
            raise UnreadableImageError(f"cannot convert image {path} (mode {image.mode}): {exc}") from exc
    return np.ascontiguousarray(array, dtype=np.float32)


def _binarise(values: np.ndarray, threshold: float) -> np.ndarray:
    """Foreground of a single-channel mask of any numeric type: value / scale > threshold (see `load_mask`)."""
    values = np.nan_to_num(np.asarray(values, dtype=np.float64), nan=0.0)
    top = float(values.max()) if values.size else 0.0
    # the scale comes from the values, not the storage type: a 16-bit file holding 0/255 is a 0/255 mask
    scale = 1.0 if top <= 1.0 else 255.0 if top <= 255.0 else 65535.0
    return values / scale > threshold


def load_mask(path: str | os.PathLike, threshold: float = 0.5) -> np.ndarray:
    """Load a mask file as bool (H, W), turned upright by its EXIF orientation like its image.

    One rule reads every common encoding (`threshold` in [0, 1), default 0.5):

    - bilevel (mode ``1``): taken as it is;
    - palette (``P``) without transparency: a label map, every index other than 0 is foreground;
    - every other file is reduced to one value per pixel: the gray value, or for colour the maximum over the
      colour channels (a coloured-on-black drawing), times alpha / max alpha when there is an alpha channel
      (transparent = background). Then foreground = value / scale > `threshold`, where scale is 1 when the
      largest value in the mask is at most 1 (a 0/1 label map, or a float mask in [0, 1]), 255 when it is at
      most 255, and 65535 otherwise.

    So 8-bit 0/255, 8-bit 0/1, 16-bit 0/1, 0/255 and 0/65535, palette, RGB and RGBA masks all give the same
    bool mask; CUB's soft masks (0, 51, ..., 255: the share of annotators) are foreground where more than
    `threshold` of them agree (> 127 of 255 at 0.5). A mask whose largest value lies between 1 and 255 is
    read on the 0..255 scale (a 0/2 label map is then all background); a multi-class label map must be
    stored as palette or 0/1. Raises `UnreadableImageError` when the file cannot be decoded.
    """
    with _open_checked(path) as opened:
        image = _displayed(opened)
        mode = image.mode
        if mode == "1":
            return np.asarray(image, dtype=bool).copy()
        if mode == "P" and "transparency" not in image.info:
            return np.asarray(image) != 0
        if mode in _SIXTEEN_BIT or mode in ("I", "F", "L"):
            return _binarise(np.asarray(image), threshold)
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float64)
    return _binarise(rgba[:, :, :3].max(axis=2) * (rgba[:, :, 3] / 255.0), threshold)


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

    `boxes` are (x0, y0, x1, y1) in continuous pixel coordinates of the image as displayed — or of
    `box_frame` = (width, height) when the annotation was made on an image of another size (they are then
    rescaled to the image; a frame of another aspect ratio is a counted skip). `boxes=()` means "box-scored,
    no box in this image"; None means "no boxes". `skip` is set by a reader that lists an entry it already
    knows is no sample (e.g. "not an image file"): the scan counts it under that kind without opening it.
    """

    id: str
    image: Path
    mask: Path | None = None
    boxes: tuple[tuple[float, float, float, float], ...] | None = None
    box_frame: tuple[float, float] | None = None
    skip: str | None = None


# Why a listed entry is no sample: kind -> how the warning line counts them. Readers may use other kinds.
SKIP_LABELS = {
    "unreadable image": "unreadable image(s)",
    "missing file": "listed image(s) missing on disk",
    "broken link": "broken link(s)",
    "not a regular file": "special file(s) (not regular files)",
    "folder named like an image": "folder(s) named like an image",
    "not an image file": "non-image file(s)",
    "hidden file or folder": "hidden file(s) or folder(s)",
    "folder link already read": "link(s) to a folder already read",
    "unreadable folder": "unreadable folder(s)",
    "outside train/ and test/": "image(s) outside the train/ and test/ folders",
    "missing mask": "image(s) without a mask file",
    "unreadable mask": "image(s) whose mask cannot be decoded",
    "mask size mismatch": "image(s) whose mask has another aspect ratio",
    "no box annotation": "image(s) without a readable box annotation",
    "box frame mismatch": "image(s) whose box annotation frame has another aspect ratio",
}


@dataclass
class ScanReport:
    """What `scan_records` found: the readable records, the skipped ones (with why) and the converted ones.

    Every record given to the scan ends in exactly one of `kept` and `skipped_items`; `converted` counts the
    kept images stored in another mode than 8-bit RGB.
    """

    kept: list[ImageRecord] = field(default_factory=list)
    skipped_items: list[tuple[str, str, str]] = field(default_factory=list)  # (path, kind, reason)
    converted_modes: Counter = field(default_factory=Counter)  # stored mode -> number of images converted

    @property
    def skipped(self) -> int:
        return len(self.skipped_items)

    @property
    def converted(self) -> int:
        return sum(self.converted_modes.values())

    @property
    def skipped_kinds(self) -> dict[str, int]:
        return dict(Counter(kind for _, kind, _ in self.skipped_items))

    def summary(self) -> dict:
        """Counts for a stage to report; "skipped_kinds" (kind -> count) is present when something was skipped."""
        out = {
            "kept": len(self.kept),
            "skipped": self.skipped,
            "converted": self.converted,
            "converted_modes": dict(self.converted_modes),
            "skipped_paths": [path for path, _, _ in self.skipped_items],
        }
        if self.skipped:
            out["skipped_kinds"] = self.skipped_kinds
        return out


@dataclass(frozen=True)
class _Probe:
    mode: str  # Pillow mode as stored
    size: tuple[int, int]  # (width, height) as displayed
    stored: tuple[int, int]  # (width, height) of the pixel grid on disk
    orientation: int  # EXIF orientation, 1..8


def _probe(path: Path) -> _Probe:
    """Decode `path` once (cheaply); raise UnreadableImageError if it fails.

    `Image.verify()` alone does not decode JPEG data, so it misses truncated JPEGs; instead the file is
    decoded for real, JPEGs at 1/8 scale through `draft` (the entropy-coded stream is still read to its end,
    so truncation is caught, at a fraction of the cost).
    """
    try:
        with Image.open(path) as image:
            mode, stored = image.mode, image.size
            if image.width == 0 or image.height == 0:
                raise UnreadableImageError(f"image {path} has zero size")
            if image.format == "JPEG":
                image.draft(None, (max(1, image.width // 8), max(1, image.height // 8)))
            image.load()
            orientation = exif_orientation(image)
    except (UnreadableImageError, MemoryError):
        raise
    except Exception as exc:
        raise UnreadableImageError(f"{type(exc).__name__}: {exc}") from exc
    return _Probe(mode, _displayed_wh(stored, orientation), stored, orientation)


def _entry_problem(path: Path) -> tuple[str, str] | None:
    """(kind, reason) when `path` is not a regular file that could be opened, else None. Checked before any
    open: a FIFO named like an image would block a decoder forever."""
    try:
        return _entry_problem_unguarded(path)
    except OSError as exc:  # e.g. no permission to look: it cannot be read either
        return "unreadable image", f"cannot inspect {path}: {exc}"


def _entry_problem_unguarded(path: Path) -> tuple[str, str] | None:
    if not path.exists():
        if path.is_symlink():
            return "broken link", f"link to {os.readlink(path)}, which does not exist"
        return "missing file", "no such file"
    if path.is_dir():
        return "not a regular file", "a folder"
    if not path.is_file():
        return "not a regular file", "a special file (device, pipe or socket)"
    return None


def _wh(size: tuple[float, float]) -> str:
    return f"{size[0]:g}x{size[1]:g}"


def _mask_mismatch(record: ImageRecord, image: _Probe, mask: _Probe) -> str | None:
    """Why the mask cannot be laid on its image (sizes are width x height as displayed), or None."""
    if same_aspect(mask.size, image.size):
        return None
    reason = (f"mask {record.mask} is {_wh(mask.size)} but image {record.image} is {_wh(image.size)} "
              f"(width x height): another aspect ratio, so the mask does not cover the same picture")
    if image.orientation in _SWAPS_AXES and same_aspect(mask.size, image.stored):
        reason += (f"; the mask fits the image's stored pixels ({_wh(image.stored)}), but the image carries EXIF "
                   f"orientation {image.orientation} and masks are read on the picture as displayed")
    return reason


def _scan_one(
    record: ImageRecord, check_masks: bool, require_masks: bool, require_boxes: bool
) -> tuple[str | None, str, str, str]:
    """(stored mode of a kept record or None, failing path, kind, reason)."""
    image_path = str(record.image)
    if record.skip is not None:
        return None, image_path, record.skip, record.skip
    if require_boxes and record.boxes is None:
        return None, image_path, "no box annotation", "no readable box annotation"
    problem = _entry_problem(Path(record.image))
    if problem is not None:
        return None, image_path, *problem
    try:
        image = _probe(record.image)
    except UnreadableImageError as exc:
        return None, image_path, "unreadable image", str(exc)
    if require_boxes and record.box_frame is not None and not same_aspect(record.box_frame, image.size):
        reason = (f"boxes of {image_path} were drawn on a {_wh(record.box_frame)} picture but the image is "
                  f"{_wh(image.size)} (width x height, as displayed): another aspect ratio")
        if image.orientation in _SWAPS_AXES and same_aspect(record.box_frame, image.stored):
            reason += f"; the frame fits the stored pixels, but the image carries EXIF orientation {image.orientation}"
        return None, image_path, "box frame mismatch", reason
    if require_masks and record.mask is None:
        return None, image_path, "missing mask", "no mask file listed"
    if check_masks and record.mask is not None:
        mask_path = str(record.mask)
        problem = _entry_problem(Path(record.mask))
        if problem is not None:
            return None, mask_path, "missing mask", f"mask: {problem[1]}"
        try:
            mask = _probe(record.mask)
        except UnreadableImageError as exc:
            return None, mask_path, "unreadable mask", f"mask: {exc}"
        mismatch = _mask_mismatch(record, image, mask)
        if mismatch is not None:
            return None, mask_path, "mask size mismatch", mismatch
    return image.mode, "", "", ""


def scan_records(
    records: Sequence[ImageRecord],
    *,
    check_masks: bool = True,
    require_masks: bool = False,
    require_boxes: bool = False,
    workers: int | None = None,
    name: str = "",
) -> ScanReport:
    """Decode every image (and mask) once; keep the usable records, count and log the rest.

    A record is skipped, with a kind (`SKIP_LABELS`) and a reason naming the files, when the reader marked it
    (`ImageRecord.skip`), its image is a broken link, missing, not a regular file or cannot be decoded, or —
    with `check_masks` — its mask is missing, cannot be decoded or has another aspect ratio than the image,
    or — with `require_masks` — it lists no mask, or — with `require_boxes` — its `boxes` is None
    (annotation missing or unparseable) or its `box_frame` has another aspect ratio. Sizes are compared as displayed (EXIF orientation applied). Logs ONE warning
    line per kind of skip ("skipped N <what> [<kind>]: first paths ...") and one info line for the converted
    images. Threads are used (Pillow releases the GIL while decoding); the result does not depend on them.
    """
    workers = workers or min(8, os.cpu_count() or 1)
    checks = (check_masks, require_masks, require_boxes)
    report = ScanReport()
    if workers > 1 and len(records) > 16:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(lambda r: _scan_one(r, *checks), records, chunksize=32))
    else:
        results = [_scan_one(r, *checks) for r in records]
    for record, (mode, bad_path, kind, reason) in zip(records, results, strict=True):
        if mode is None:
            report.skipped_items.append((bad_path or str(record.image), kind, reason))
            continue
        report.kept.append(record)
        if needs_conversion(mode):
            report.converted_modes[mode] += 1
    prefix = f"{name}: " if name else ""
    by_kind: dict[str, list[tuple[str, str]]] = {}
    for path, kind, reason in report.skipped_items:
        by_kind.setdefault(kind, []).append((path, reason))
    for kind, items in by_kind.items():
        first = "; ".join(p if why == kind else f"{p} ({why})" for p, why in items[:5])
        more = f"; ... and {len(items) - 5} more" if len(items) > 5 else ""
        label = SKIP_LABELS.get(kind, "file(s)")
        log.warning("%sskipped %d %s [%s]: %s%s", prefix, len(items), label, kind, first, more)
    if report.converted:
        modes = ", ".join(f"{mode}={count}" for mode, count in sorted(report.converted_modes.items()))
        log.info("%sconverted %d image(s) to 8-bit-equivalent RGB (%s)", prefix, report.converted, modes)
    return report


DEFAULT_ID_RULE = "each reader makes sample ids from file names (see the reader's documentation)"


def check_unique_ids(records: Sequence[ImageRecord], id_rule: str = DEFAULT_ID_RULE) -> None:
    """Raise ValueError when two records (other than reader-skipped ones) share a sample id.

    The message lists every id shared and all of its files, states `id_rule` (how the reader forms ids) and
    asks for a rename: outputs are stored per id, so one file's results would silently replace another's.
    """
    files: dict[str, list[str]] = {}
    for record in records:
        if record.skip is None:
            files.setdefault(record.id, []).append(str(record.image))
    shared = {sample_id: paths for sample_id, paths in files.items() if len(paths) > 1}
    if not shared:
        return
    listed = "; ".join(f"{sample_id!r} <- {', '.join(paths)}" for sample_id, paths in sorted(shared.items())[:10])
    more = f"; ... and {len(shared) - 10} more" if len(shared) > 10 else ""
    raise ValueError(
        f"{len(shared)} sample id(s) shared by several files: {listed}{more}. Results are stored per sample id, "
        f"so these files would overwrite each other's. How ids are formed: {id_rule}. "
        f"Please rename the files so that their ids differ."
    )


# ------------------------------------------------------------------------------------------ the dataset
class ImageListDataset(Dataset):
    """A map-style data set over `ImageRecord`s that yields the sample dicts of `conceptdistill.data.base`.

    `truth`: "mask" reads `record.mask` (see `load_mask`; thresholded at `mask_threshold`), "box" rasterises
    `record.boxes` at the output resolution, None yields no "mask". Build it with
    `ImageListDataset.scan(records, ...)` so that unusable files are dropped at setup; the constructor checks
    only that ids are unique and file-name safe (ValueError otherwise; `id_rule` says in the message how the
    reader forms ids) and trusts its records. If a file becomes unreadable after the scan, or a mask takes
    another aspect ratio, `__getitem__` raises `UnreadableImageError` naming it.
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
        id_rule: str = DEFAULT_ID_RULE,
    ) -> None:
        if resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {resize_mode!r}")
        if truth not in ("mask", "box", None):
            raise ValueError(f"truth must be 'mask', 'box' or None, got {truth!r}")
        check_unique_ids(records, id_rule)
        ids = [r.id for r in records]
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
        """Check that sample ids are unique (before decoding anything), scan (`scan_records`) and build the data set
        from the usable records. Raises ValueError for shared ids (see `check_unique_ids`)."""
        check_unique_ids(records, kwargs.get("id_rule", DEFAULT_ID_RULE))
        truth = kwargs.get("truth")
        report = scan_records(
            records, check_masks=truth == "mask", require_masks=truth == "mask", require_boxes=truth == "box",
            workers=workers, name=name,
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
            if not same_aspect(mask.shape[::-1], (w, h)):  # changed on disk since the scan: never stretch it
                raise UnreadableImageError(
                    f"mask {record.mask} ({mask.shape[1]}x{mask.shape[0]}) does not fit image {record.image} ({w}x{h})"
                )
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
