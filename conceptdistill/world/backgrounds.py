"""The shapes world's backgrounds: muted gradients, low-frequency value noise, stripes or checkers, pixel noise
(world/render.py describes the whole image model). Pure numpy; every number comes from the caller's generator."""

from __future__ import annotations

import colorsys
import functools
import math
from collections.abc import Sequence
from typing import Protocol

import numpy as np


class BackgroundSettings(Protocol):
    """The settings a background is drawn from (world/render.py's WorldConfig has them)."""

    image_size: int
    backgrounds: Sequence[str]
    background_saturation: tuple[float, float]
    background_value: tuple[float, float]
    background_max: float
    pixel_noise: float


@functools.lru_cache(maxsize=8)
def pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (x, y), each (H, W) float64, in pixel units."""
    coords = np.arange(size, dtype=np.float64) + 0.5
    xs, ys = np.meshgrid(coords, coords)
    xs.setflags(write=False)
    ys.setflags(write=False)
    return xs, ys


_NOISE_CELLS = 4  # low-frequency value noise: a (cells+1)^2 lattice, bilinearly interpolated


@functools.lru_cache(maxsize=8)
def _upsample_matrix(size: int, cells: int = _NOISE_CELLS) -> np.ndarray:
    """(size, cells + 1) bilinear interpolation weights from a lattice to pixel centres."""
    pos = (np.arange(size) + 0.5) / size * cells
    lo = np.minimum(np.floor(pos).astype(int), cells - 1)
    frac = pos - lo
    matrix = np.zeros((size, cells + 1))
    matrix[np.arange(size), lo] = 1.0 - frac
    matrix[np.arange(size), lo + 1] = frac
    matrix.setflags(write=False)
    return matrix


def _muted_colour(rng: np.random.Generator, config: BackgroundSettings) -> np.ndarray:
    hue = rng.random()
    sat = rng.uniform(*config.background_saturation)
    val = rng.uniform(*config.background_value)
    return np.array(colorsys.hsv_to_rgb(hue, sat, val))


def draw_background(rng: np.random.Generator, config: BackgroundSettings) -> np.ndarray:
    """float64 (H, W, 3). Draws the same numbers whatever the enabled families, then uses what is enabled."""
    size = config.image_size
    xs, ys = pixel_grid(size)
    families = config.backgrounds
    c1 = _muted_colour(rng, config)
    c2 = _muted_colour(rng, config)
    angle = rng.uniform(0.0, 2.0 * math.pi)
    lattice = rng.uniform(-1.0, 1.0, size=(_NOISE_CELLS + 1, _NOISE_CELLS + 1))
    noise_amp = rng.uniform(0.02, 0.07)
    patterns = [None] + [p for p in ("stripes", "checker") if p in families]
    pattern = patterns[int(rng.integers(len(patterns)))]
    p_angle = rng.uniform(0.0, math.pi)
    p_scale = rng.uniform(2.0, 5.0)  # half period of stripes / cell size of checker, in pixels
    p_contrast = rng.uniform(0.04, 0.12)
    p_phase = rng.uniform(0.0, 2.0 * p_scale)

    if "gradient" in families:
        half = size / 2.0
        proj = (xs - half) * math.cos(angle) + (ys - half) * math.sin(angle)
        t = 0.5 + proj / (size * math.sqrt(2.0))
        value = t[..., None] * (c2 - c1) + c1
    else:
        value = np.broadcast_to(c1, (size, size, 3)).copy()
    luminance = np.zeros((size, size))
    if "noise" in families:
        m = _upsample_matrix(size)
        luminance += noise_amp * (m @ lattice @ m.T)
    if pattern is not None:
        ca, sa = math.cos(p_angle), math.sin(p_angle)
        u = xs * ca + ys * sa + p_phase
        if pattern == "stripes":
            bits = np.floor(u / p_scale)
        else:
            v = -xs * sa + ys * ca + p_phase
            bits = np.floor(u / p_scale) + np.floor(v / p_scale)
        luminance += p_contrast * (np.mod(bits, 2.0) - 0.5)
    value += luminance[..., None]
    if config.pixel_noise > 0:
        value += rng.normal(0.0, config.pixel_noise, size=value.shape)
    else:
        rng.normal(0.0, 1.0, size=value.shape)  # keep the stream aligned across configs
    np.clip(value, 0.0, config.background_max, out=value)
    return value
