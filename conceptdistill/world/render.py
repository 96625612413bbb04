"""Render the shapes world: coloured shapes on textured backgrounds, with exact visible-pixel masks.

Pure numpy, no global state: `render_sample(config, seed, index)` draws everything from
`np.random.default_rng([seed, index])`, so an image is a function of (config, seed, index) alone and any
subset of a data set can be regenerated anywhere (other process, other machine, other batch order).

How an image is made
- Background: a muted two-colour gradient at a random angle ("gradient"), plus low-frequency value noise
  ("noise"), plus at most one of hard-edged stripes ("stripes") or a checkerboard ("checker") at a random
  angle and scale, plus pixel noise (sd `pixel_noise`). Muted means low saturation and a value capped at
  `background_max`, so no background pixel can look like a saturated object colour or shaded white.
- Objects: each a shape with a random size (`radius_range`, as a fraction of the side: the radius of the
  circle of the same area, so all shapes of one radius have the same area), rotation, position (always
  fully inside the image) and a colour from `colours`, shaded by a linear ramp that darkens it by at most
  `shading` (a pixel is `rgb * f` with f in [1 - shading, 1]). Objects are hard-edged (no antialiasing) and
  carry no pixel noise, so the masks are exact: every masked pixel holds its object's shaded colour and no
  other pixel does. Several objects are placed so that each overlaps an earlier one by at most
  `max_overlap` of the smaller area; later ones occlude earlier ones, and each mask is what stays visible.
  An object that cannot be placed after `placement_tries` attempts is left out (and out of the caption).
- Caption: "a photo of a {colour} {shape}", "... and a {colour} {shape}" for more objects (in drawing
  order), "a photo of a background" for an image without objects.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from conceptdistill.utils.io import to_uint8
from conceptdistill.world.backgrounds import draw_background, pixel_grid

#: saturated, mutually distinct object colours (RGB in [0, 1])
DEFAULT_COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.10, 0.10),
    "green": (0.10, 0.75, 0.15),
    "blue": (0.10, 0.25, 0.95),
    "yellow": (0.95, 0.85, 0.10),
    "purple": (0.60, 0.15, 0.80),
    "white": (0.97, 0.97, 0.97),
}

#: number of polygon sides per shape name; "circle" is the only curved shape
POLYGON_SIDES: dict[str, int] = {"triangle": 3, "square": 4, "pentagon": 5, "hexagon": 6}
SUPPORTED_SHAPES: tuple[str, ...] = ("circle", *POLYGON_SIDES)
BACKGROUND_FAMILIES: tuple[str, ...] = ("gradient", "stripes", "checker", "noise")
EMPTY_CAPTION = "a photo of a background"


@dataclass
class WorldConfig:
    """What the world looks like. Every field has a sensible default; Hydra lists and dicts are accepted."""

    image_size: int = 32
    shapes: tuple[str, ...] = ("circle", "square", "triangle")
    colours: Mapping[str, tuple[float, float, float]] = field(default_factory=lambda: dict(DEFAULT_COLOURS))
    min_objects: int = 1
    max_objects: int = 1
    #: fraction of images with no object at all
    p_empty: float = 0.1
    #: object size: radius of the equal-area circle, as a fraction of the image side
    radius_range: tuple[float, float] = (0.16, 0.30)
    #: background ingredients that may appear ("gradient", "stripes", "checker", "noise")
    backgrounds: tuple[str, ...] = BACKGROUND_FAMILIES
    pixel_noise: float = 0.02
    #: largest relative darkening of an object by its shading ramp (0: flat colour)
    shading: float = 0.15
    rotate: bool = True
    #: an object may overlap an earlier object's visible part by this fraction of the smaller area
    max_overlap: float = 0.2
    placement_tries: int = 30
    #: no two objects in one image share both shape and colour (their captions would be ambiguous)
    distinct_objects: bool = True
    #: background value range (HSV value of the gradient colours) and a hard ceiling for any background pixel
    background_value: tuple[float, float] = (0.22, 0.60)
    background_saturation: tuple[float, float] = (0.05, 0.30)
    background_max: float = 0.80

    def __post_init__(self) -> None:
        self.image_size = int(self.image_size)
        self.shapes = tuple(str(s) for s in self.shapes)
        self.colours = {str(k): tuple(float(c) for c in v) for k, v in dict(self.colours).items()}
        self.backgrounds = tuple(str(b) for b in self.backgrounds)
        self.radius_range = (float(self.radius_range[0]), float(self.radius_range[1]))
        self.background_value = (float(self.background_value[0]), float(self.background_value[1]))
        self.background_saturation = (float(self.background_saturation[0]), float(self.background_saturation[1]))
        self.min_objects, self.max_objects = int(self.min_objects), int(self.max_objects)
        if self.image_size < 8:
            raise ValueError(f"image_size must be at least 8, got {self.image_size}")
        if not self.shapes or not self.colours:
            raise ValueError("the world needs at least one shape and one colour")
        unknown = [s for s in self.shapes if s not in SUPPORTED_SHAPES]
        if unknown:
            raise ValueError(f"unknown shapes {unknown}; supported: {SUPPORTED_SHAPES}")
        unknown = [b for b in self.backgrounds if b not in BACKGROUND_FAMILIES]
        if unknown:
            raise ValueError(f"unknown background families {unknown}; supported: {BACKGROUND_FAMILIES}")
        clash = set(self.shapes) & set(self.colours)
        if clash:
            raise ValueError(f"names used both as shape and colour: {sorted(clash)}")
        for name, rgb in self.colours.items():
            if len(rgb) != 3 or not all(0.0 <= c <= 1.0 for c in rgb):
                raise ValueError(f"colour {name!r} must be three floats in [0, 1], got {rgb}")
        if not 0 <= self.min_objects <= self.max_objects:
            raise ValueError(f"need 0 <= min_objects <= max_objects, got {self.min_objects}, {self.max_objects}")
        if not 0.0 <= self.p_empty <= 1.0:
            raise ValueError(f"p_empty must be in [0, 1], got {self.p_empty}")
        if not 0.0 < self.radius_range[0] <= self.radius_range[1] <= 0.32:
            raise ValueError(
                f"radius_range must satisfy 0 < lo <= hi <= 0.32 (shapes must fit), got {self.radius_range}"
            )
        if not 0.0 <= self.shading < 1.0:
            raise ValueError(f"shading must be in [0, 1), got {self.shading}")

    @property
    def words(self) -> tuple[str, ...]:
        """Every word a concept may name: the shapes and the colours."""
        return (*self.shapes, *self.colours)


class WorldObject(NamedTuple):
    """One drawn object: unpacks as (shape, colour, box, mask)."""

    shape: str
    colour: str
    #: tight box of the visible pixels, (x0, y0, x1, y1), exclusive upper ends
    box: tuple[int, int, int, int]
    #: bool (H, W): the pixels where this object is visible (not occluded by a later one)
    mask: np.ndarray


@dataclass
class WorldSample:
    image: np.ndarray  # float32 (H, W, 3) in [0, 1]
    objects: list[WorldObject]
    caption: str
    seed: int = 0
    index: int = 0

    @property
    def mask(self) -> np.ndarray:
        """Union of all objects' visible masks, bool (H, W)."""
        out = np.zeros(self.image.shape[:2], dtype=bool)
        for obj in self.objects:
            out |= obj.mask
        return out

    @property
    def shape(self) -> str:
        """Label of the first object's shape ("" for an empty image)."""
        return self.objects[0].shape if self.objects else ""

    @property
    def colour(self) -> str:
        """Label of the first object's colour ("" for an empty image)."""
        return self.objects[0].colour if self.objects else ""


class RenderedBatch(NamedTuple):
    """What `render_batch` returns; unpacks as (images, masks, captions, objects)."""

    images: np.ndarray  # uint8 (N, H, W, 3)
    masks: np.ndarray  # bool (N, H, W): union of each image's objects
    captions: list[str]
    objects: list[list[WorldObject]]


def caption_for(objects: Sequence[tuple[str, str]] | Sequence[WorldObject]) -> str:
    """Caption for objects given as WorldObjects or (shape, colour) pairs, in drawing order."""
    if not objects:
        return EMPTY_CAPTION
    pairs = [(o.shape, o.colour) if isinstance(o, WorldObject) else (o[0], o[1]) for o in objects]
    return "a photo of " + " and ".join(f"a {colour} {shape}" for shape, colour in pairs)


# ---------------------------------------------------------------------------------------------------------
# geometry and background helpers


def _shape_geometry(shape: str, radius: float, angle: float) -> tuple[float, np.ndarray | None]:
    """(outer radius, vertices (n, 2) relative to the centre or None for a circle), equal area pi r^2."""
    if shape == "circle":
        return radius, None
    n = POLYGON_SIDES[shape]
    outer = radius * math.sqrt(math.pi / (0.5 * n * math.sin(2.0 * math.pi / n)))
    # first vertex points up (y grows downwards), then rotate
    phis = angle - math.pi / 2.0 + 2.0 * math.pi * np.arange(n) / n
    return outer, outer * np.stack([np.cos(phis), np.sin(phis)], axis=1)


def _shape_mask(shape: str, cx: float, cy: float, radius: float, angle: float, size: int) -> tuple[np.ndarray, float]:
    xs, ys = pixel_grid(size)
    dx, dy = xs - cx, ys - cy
    outer, verts = _shape_geometry(shape, radius, angle)
    if verts is None:
        return dx * dx + dy * dy <= radius * radius, outer
    n = len(verts)
    # edge k joins vertex k and k+1; its outward normal points at the edge's midpoint direction
    normals = angle - math.pi / 2.0 + (2.0 * np.arange(n) + 1.0) * math.pi / n
    apothem = outer * math.cos(math.pi / n)
    proj = dx[None] * np.cos(normals)[:, None, None] + dy[None] * np.sin(normals)[:, None, None]
    return np.all(proj <= apothem, axis=0), outer


def _box(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if len(rows) == 0:
        return (0, 0, 0, 0)
    return (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)


# ---------------------------------------------------------------------------------------------------------
# rendering


def _render(config: WorldConfig, seed: int, index: int) -> tuple[np.ndarray, list[WorldObject]]:
    """float64 image (H, W, 3) and its objects, drawn from default_rng([seed, index])."""
    rng = np.random.default_rng([int(seed), int(index)])
    size = config.image_size
    image = draw_background(rng, config)
    xs, ys = pixel_grid(size)

    empty = rng.random() < config.p_empty
    count = 0 if empty else int(rng.integers(config.min_objects, config.max_objects + 1))
    shapes, colours = config.shapes, list(config.colours)
    placed: list[tuple[str, str, np.ndarray, np.ndarray]] = []  # shape, colour, full mask, shaded rgb
    visible: list[np.ndarray] = []
    for _ in range(count):
        shape = shapes[int(rng.integers(len(shapes)))]
        colour = colours[int(rng.integers(len(colours)))]
        if config.distinct_objects:
            for _retry in range(20):
                if all((shape, colour) != (s, c) for s, c, _, _ in placed):
                    break
                shape = shapes[int(rng.integers(len(shapes)))]
                colour = colours[int(rng.integers(len(colours)))]
            else:
                continue
        mask = None
        for _try in range(config.placement_tries):
            radius = rng.uniform(*config.radius_range) * size
            angle = rng.uniform(0.0, 2.0 * math.pi) if config.rotate else 0.0
            outer, verts = _shape_geometry(shape, radius, angle)
            if verts is None:
                lo_x = lo_y = hi_x = hi_y = radius
            else:
                lo_x, lo_y = -verts.min(axis=0)
                hi_x, hi_y = verts.max(axis=0)
            cx = rng.uniform(lo_x, size - hi_x)
            cy = rng.uniform(lo_y, size - hi_y)
            candidate, outer = _shape_mask(shape, cx, cy, radius, angle, size)
            area = candidate.sum()
            ok = area > 0
            for vis in visible:
                if not ok:
                    break
                inter = np.count_nonzero(candidate & vis)
                ok = inter <= config.max_overlap * min(area, vis.sum())
            if ok:
                mask = candidate
                break
        if mask is None:
            continue
        light = rng.uniform(0.0, 2.0 * math.pi)
        amount = rng.uniform(0.0, config.shading)
        proj = ((xs - cx) * math.cos(light) + (ys - cy) * math.sin(light)) / outer
        factor = 1.0 - amount * (0.5 + 0.5 * np.clip(proj, -1.0, 1.0))
        shaded = factor[..., None] * np.asarray(config.colours[colour])
        for vis in visible:
            vis &= ~mask
        placed.append((shape, colour, mask, shaded))
        visible.append(mask.copy())
    objects = []
    for (shape, colour, mask, shaded), vis in zip(placed, visible, strict=True):
        image[mask] = shaded[mask]  # drawing order: later objects paint over earlier ones
        objects.append(WorldObject(shape, colour, _box(vis), vis))
    return image, objects


def render_sample(config: WorldConfig | None, seed: int, index: int) -> WorldSample:
    """Render image `index` of the world with seed `seed`; a pure function of its arguments."""
    config = config or WorldConfig()
    image, objects = _render(config, seed, index)
    return WorldSample(image.astype(np.float32), objects, caption_for(objects), int(seed), int(index))


def render_batch(config: WorldConfig | None, seed: int, indices: Iterable[int]) -> RenderedBatch:
    """Render many images: uint8 (N, H, W, 3), union masks (N, H, W), captions and objects.

    Image i equals `to_uint8(render_sample(config, seed, indices[i]).image)` exactly.
    """
    config = config or WorldConfig()
    indices = [int(i) for i in indices]
    size = config.image_size
    images = np.empty((len(indices), size, size, 3), dtype=np.uint8)
    masks = np.zeros((len(indices), size, size), dtype=bool)
    captions: list[str] = []
    all_objects: list[list[WorldObject]] = []
    for row, index in enumerate(indices):
        image, objects = _render(config, seed, index)
        images[row] = to_uint8(image.astype(np.float32))
        for obj in objects:
            masks[row] |= obj.mask
        captions.append(caption_for(objects))
        all_objects.append(objects)
    return RenderedBatch(images, masks, captions, all_objects)


def concept_words_of(concept: str | Iterable[str]) -> tuple[str, ...]:
    """Normalise a concept given as one word or a list of words."""
    if isinstance(concept, str):
        return (concept,)
    return tuple(str(word) for word in concept)


def concept_mask(sample: WorldSample, concept_words: str | Iterable[str]) -> np.ndarray:
    """bool (H, W): union of the visible masks of objects whose shape or colour is one of the words.

    Objects matching no word are distractors and count as background.
    """
    words = set(concept_words_of(concept_words))
    out = np.zeros(sample.image.shape[:2], dtype=bool)
    for obj in sample.objects:
        if obj.shape in words or obj.colour in words:
            out |= obj.mask
    return out


def objects_concept_mask(objects: Sequence[WorldObject], concept_words: str | Iterable[str], size: int) -> np.ndarray:
    """Like `concept_mask` for a bare list of objects (e.g. one entry of `RenderedBatch.objects`)."""
    words = set(concept_words_of(concept_words))
    out = np.zeros((size, size), dtype=bool)
    for obj in objects:
        if obj.shape in words or obj.colour in words:
            out |= obj.mask
    return out
