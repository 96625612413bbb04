"""Figure grids (PIL only): one row per sample, one column per kind of picture (image, map, mask, ...)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from conceptdistill.utils.io import atomic_write, to_uint8


def to_rgb_uint8(picture: np.ndarray) -> np.ndarray:
    """Image (H, W, 3) in [0, 1], bool mask (H, W), or float map (H, W; min-max scaled) -> uint8 RGB."""
    array = np.asarray(picture)
    if array.ndim == 3 and array.shape[0] == 3 and array.shape[-1] != 3:
        array = array.transpose(1, 2, 0)
    if array.ndim == 2:
        if array.dtype == bool:
            array = array.astype(np.float32)
        else:
            array = array.astype(np.float32)
            low, high = float(array.min()), float(array.max())
            array = (array - low) / (high - low) if high > low else np.zeros_like(array)
        array = np.repeat(array[..., None], 3, axis=-1)
    return to_uint8(array)


def grid_image(columns: dict[str, list[np.ndarray]], *, cell: int = 96, pad: int = 2, header: int = 14) -> Image.Image:
    """A grid whose columns are titled by the dict's keys; every picture is scaled to `cell` pixels."""
    titles = list(columns)
    rows = max(len(v) for v in columns.values())
    width = len(titles) * (cell + pad) + pad
    height = header + rows * (cell + pad) + pad
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for c, title in enumerate(titles):
        x = pad + c * (cell + pad)
        draw.text((x + 2, 1), title, fill=(0, 0, 0))
        for r, picture in enumerate(columns[title]):
            tile = Image.fromarray(to_rgb_uint8(picture)).resize((cell, cell), Image.NEAREST)
            canvas.paste(tile, (x, header + pad + r * (cell + pad)))
    return canvas


def save_grid(path: str | Path, columns: dict[str, list[np.ndarray]], **kwargs) -> Path:
    path = Path(path)
    with atomic_write(path) as handle:
        grid_image(columns, **kwargs).save(handle, format="PNG")
    return path
