"""Decoding image and mask files into arrays, the same way for every real-data reader.

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
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm")

_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


class UnreadableImageError(OSError):
    """An image (or mask) file that cannot be decoded: not an image, truncated, or corrupt."""


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
#: EXIF orientations that swap width and height (the transposes and the quarter turns)
SWAPS_AXES = (5, 6, 7, 8)


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


def displayed_wh(stored_wh: tuple[int, int], orientation: int) -> tuple[int, int]:
    """(width, height) as displayed, from the stored (width, height) and the EXIF orientation (1..8)."""
    w, h = stored_wh
    return (h, w) if orientation in SWAPS_AXES else (w, h)


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(height, width) of an image file as displayed, i.e. after its EXIF orientation (see the module doc).

    This is the size `load_rgb` returns and the size at which masks are meant to be written back for the
    image. Raises `UnreadableImageError` if the file cannot be opened as an image.
    """
    try:
        with Image.open(path) as image:
            w, h = displayed_wh(image.size, exif_orientation(image))
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
