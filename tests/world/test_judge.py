"""The shapes world's object judge (world/judge.py): exact on rendered images, with and without objects, and it
counts a shape repainted in place, in another palette colour, as an object; `removal_rate` is the exact
fraction of backgrounds that hold none."""

from __future__ import annotations

import numpy as np
import pytest

from conceptdistill.utils.io import to_uint8
from conceptdistill.world.backgrounds import draw_background
from conceptdistill.world.judge import (
    holds_object,
    largest_object_patch,
    min_object_pixels,
    removal_rate,
    shade_distance,
)
from conceptdistill.world.render import WorldConfig, render_batch, render_sample

ONE = WorldConfig()
MULTI = WorldConfig(min_objects=2, max_objects=3, p_empty=0.2)


def true_background(config: WorldConfig, seed: int, index: int) -> np.ndarray:
    """The image `index` with its objects removed: the renderer draws the background first from the same
    generator, so this is exactly what lies under the objects."""
    return draw_background(np.random.default_rng([seed, index]), config).astype(np.float32)


def circle_sample(config: WorldConfig = ONE, seed: int = 0):
    return next(s for s in (render_sample(config, seed, i) for i in range(100)) if s.shape == "circle")


@pytest.mark.parametrize("config", [ONE, MULTI], ids=["one", "multi"])
def test_rendered_images_hold_an_object_exactly_when_they_have_one(config):
    batch = render_batch(config, 3, range(400))
    verdicts = [holds_object(image, config) for image in batch.images]  # uint8, as stored
    assert verdicts == [bool(objects) for objects in batch.objects]
    assert 0 < verdicts.count(False) < len(verdicts)  # both kinds were judged
    # the float render gives the same verdicts; and every object is one patch of its colour, whole
    for index in range(40):
        sample = render_sample(config, 3, index)
        assert holds_object(sample.image, config) == bool(sample.objects)
        for obj in sample.objects:
            assert largest_object_patch(sample.image, config, obj.mask) == obj.mask.sum()


def test_the_world_keeps_a_wide_gap_between_object_and_background_colours():
    batch = render_batch(ONE, 5, range(300))
    palette = np.array(list(ONE.colours.values()))
    distance = shade_distance(batch.images.reshape(-1, 32, 3), palette, ONE.shading).min(axis=-1).reshape(
        batch.masks.shape)
    assert distance[batch.masks].max() < 0.005  # object pixels: the uint8 rounding only
    assert distance[~batch.masks].min() > 0.15  # background pixels: far from every palette shade


def test_a_removed_object_leaves_no_object_and_a_recoloured_circle_is_one():
    sample = circle_sample()
    background = true_background(ONE, 0, sample.index)
    assert holds_object(sample.image, ONE) and not holds_object(background, ONE)
    assert np.array_equal(background[~sample.mask], sample.image[~sample.mask])  # it is the image's own background

    # the failure case: the circle repainted in place, in another palette colour (shaded as the renderer shades)
    for name, rgb in ONE.colours.items():
        if name == sample.colour:
            continue
        repainted = background.copy()
        repainted[sample.mask] = 0.9 * np.asarray(rgb)
        assert holds_object(repainted, ONE), name
        assert holds_object(to_uint8(repainted), ONE, region=sample.mask), name
        # ... also when its colours stray as a diffusion model's do, within the tolerance
        noisy = repainted + np.random.default_rng(1).uniform(-0.06, 0.06, repainted.shape)
        assert holds_object(noisy, ONE), name
    # noise of that size on a background does not make an object of it
    assert not holds_object(background + np.random.default_rng(2).uniform(-0.06, 0.06, background.shape), ONE)


def test_a_remnant_counts_from_a_quarter_of_the_smallest_object():
    sample = circle_sample()
    background = true_background(ONE, 0, sample.index)
    needed = min_object_pixels(ONE)
    assert needed == 21  # a quarter of pi * (0.16 * 32)^2
    rows, cols = np.nonzero(sample.mask)
    for size, expected in ((needed - 1, False), (needed, True)):
        remnant = np.zeros_like(sample.mask)
        remnant[rows[:size], cols[:size]] = True  # the first pixels in row order: one connected patch
        image = background.copy()
        image[remnant] = sample.image[remnant]
        assert largest_object_patch(image, ONE) == size
        assert holds_object(image, ONE) is expected
    # outside the judged region an object does not count
    assert not holds_object(sample.image, ONE, region=~sample.mask)


def test_removal_rate_is_the_fraction_of_backgrounds_without_an_object():
    sample = circle_sample()
    background = true_background(ONE, 0, sample.index)
    recoloured = background.copy()
    recoloured[sample.mask] = np.asarray(ONE.colours["green" if sample.colour != "green" else "red"])
    backgrounds = [background, sample.image, recoloured, background, to_uint8(background)]
    rate = removal_rate(backgrounds, [None] * 5, ONE, skipped=2)
    assert rate == {"value": 3 / 5, "removed": 3, "judged": 5, "skipped": 2}

    # judged inside a region: an object elsewhere (a distractor) is not judged
    regions = [sample.mask, ~sample.mask, sample.mask, None, None]
    assert removal_rate(backgrounds, regions, ONE) == {"value": 4 / 5, "removed": 4, "judged": 5, "skipped": 0}
    assert np.isnan(removal_rate([], [], ONE)["value"])
