"""Tests for conceptdistill.maskmath (fast, CPU only)."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from conceptdistill.maskmath import (
    DegenerateMapError,
    Rect,
    binarize_map,
    centre_box_mask,
    gmm_threshold,
    majority_filter,
    rectangle_rules_for,
    refine_mask,
    sample_background_rectangle,
    upsample_mask,
)


def box_without_corners(shape, rows: slice, cols: slice) -> np.ndarray:
    """A filled box minus its four corner pixels: what a 3x3 majority filter leaves of an interior box."""
    mask = np.zeros(shape, dtype=bool)
    mask[rows, cols] = True
    for r in (rows.start, rows.stop - 1):
        for c in (cols.start, cols.stop - 1):
            mask[r, c] = False
    return mask


def bimodal(n: int = 5000, low: float = 0.2, high: float = 0.8, sd: float = 0.02, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.normal(low, sd, n), rng.normal(high, sd, n)])


# --- gmm_threshold ---------------------------------------------------------------------------------


def test_gmm_threshold_bimodal_midpoint_and_deterministic():
    values = bimodal()
    threshold = gmm_threshold(values)
    assert abs(threshold - 0.5) < 0.02
    assert gmm_threshold(values) == threshold
    assert gmm_threshold(values.reshape(100, 100)) == threshold  # shape does not matter


def test_gmm_threshold_subsampling_is_deterministic():
    values = bimodal(n=20_000)
    a = gmm_threshold(values, max_samples=1000, seed=3)
    b = gmm_threshold(values, max_samples=1000, seed=3)
    assert a == b
    assert abs(a - 0.5) < 0.02


def test_gmm_threshold_handles_attention_scale_values():
    # Attention probabilities are tiny; their variance is below sklearn's reg_covar.
    values = bimodal(low=0.001, high=0.004, sd=0.0001)
    assert abs(gmm_threshold(values) - 0.0025) < 0.0002


def test_gmm_threshold_ignores_nans():
    values = bimodal()
    values[::7] = np.nan
    assert abs(gmm_threshold(values) - 0.5) < 0.02


@pytest.mark.parametrize(
    "values",
    [np.full((8, 8), 0.3), np.full((8, 8), np.nan), np.array([0.5]), np.array([]), np.array([1.0, np.nan, 1.0])],
)
def test_gmm_threshold_degenerate_raises(values):
    with pytest.raises(DegenerateMapError):
        gmm_threshold(values)
    assert issubclass(DegenerateMapError, ValueError)


def near_constant_maps() -> dict[str, np.ndarray]:
    """Maps that are constant up to rounding; the old exact-equality check split each along its noise."""
    rng = np.random.default_rng(0)
    attention = 1e-3 + 1e-7 * rng.standard_normal((64, 64))
    return {
        "0.5 + 1e-7 noise": 0.5 + 1e-7 * rng.standard_normal((64, 64)),
        "0.5 +- 1e-9": 0.5 + 1e-9 * rng.choice([-1.0, 1.0], (64, 64)),
        # float16 storage of a flat attention map ~1e-3: two values one ulp (~1e-6) apart
        "float16 round-off": attention.astype(np.float16),
        "zero up to round-off": 1e-15 * rng.random((64, 64)),
        "negative, 0.5 + 1e-7 noise": -0.5 + 1e-7 * rng.standard_normal((64, 64)),
    }


@pytest.mark.parametrize("name", list(near_constant_maps()))
def test_gmm_threshold_near_constant_map_is_degenerate(name):
    values = near_constant_maps()[name]
    assert np.unique(values).size >= 2  # not constant: only the tolerance makes it degenerate
    with pytest.raises(DegenerateMapError, match="constant up to rounding"):
        gmm_threshold(values)
    with pytest.raises(DegenerateMapError, match="constant up to rounding"):
        gmm_threshold(values, max_samples=100)  # the subsample is checked the same way


@pytest.mark.parametrize("relative_contrast", [1e-2, 4e-2])
@pytest.mark.parametrize("dtype", [np.float64, np.float16])
def test_gmm_threshold_low_contrast_map_is_not_degenerate(relative_contrast, dtype):
    # Attention-scale values whose object is only 1% (or, like the shapes world, 4%) above the background.
    rng = np.random.default_rng(0)
    amap = 1e-3 * (1 + relative_contrast * 0.02 * rng.standard_normal((64, 64)))
    amap[16:48, 16:48] *= 1 + relative_contrast
    amap = amap.astype(dtype)
    threshold = gmm_threshold(amap)
    assert 1e-3 < threshold < 1e-3 * (1 + relative_contrast)
    mask, _ = binarize_map(amap)
    np.testing.assert_array_equal(mask, box_without_corners((64, 64), slice(16, 48), slice(16, 48)))


def test_degenerate_tolerance_is_a_documented_argument():
    values = 0.5 + 1e-7 * np.random.default_rng(0).standard_normal(1000)
    with pytest.raises(DegenerateMapError):
        gmm_threshold(values)
    assert 0.49 < gmm_threshold(values, rtol=0.0, atol=0.0) < 0.51  # exact equality only: split along the noise
    with pytest.raises(DegenerateMapError):
        gmm_threshold(np.array([0.0, 1.0]), atol=2.0)


# --- majority_filter ------------------------------------------------------------------------------


def test_majority_filter_removes_orphan_and_fills_hole():
    mask = np.zeros((7, 7), dtype=bool)
    mask[3, 3] = True
    assert not majority_filter(mask).any()

    mask = np.ones((7, 7), dtype=bool)
    mask[3, 3] = False
    assert majority_filter(mask).all()


def test_majority_filter_keeps_solid_regions_and_corners():
    mask = np.zeros((8, 8), dtype=bool)
    mask[:4, :4] = True  # a block in the corner: its corner pixel must survive
    out = majority_filter(mask)
    assert out[0, 0] and out[:3, :3].all()
    assert not out[5:, 5:].any()


def test_majority_filter_border_tie_keeps_own_value():
    # Corner (0, 0) sees 4 in-image pixels; 2 True is a tie, so it keeps its own value.
    mask = np.zeros((5, 5), dtype=bool)
    mask[0, 0] = mask[0, 1] = True
    assert majority_filter(mask)[0, 0]
    mask[0, 0] = False
    mask[1, 0] = True
    assert not majority_filter(mask)[0, 0]


def test_majority_filter_rejects_even_size():
    with pytest.raises(ValueError):
        majority_filter(np.zeros((4, 4), dtype=bool), size=2)


# --- binarize_map ---------------------------------------------------------------------------------


def test_binarize_map_square():
    rng = np.random.default_rng(0)
    amap = rng.normal(0.2, 0.02, (32, 32))
    amap[8:24, 8:24] = rng.normal(0.8, 0.02, (16, 16))
    amap[2, 2] = 0.9  # orphan pixel, removed by the majority filter
    mask, threshold = binarize_map(amap)
    expected = box_without_corners((32, 32), slice(8, 24), slice(8, 24))
    assert abs(threshold - 0.5) < 0.02
    np.testing.assert_array_equal(mask, expected)

    low_mask, _ = binarize_map(amap, polarity="low", filter_size=1)  # no filter: exact complement
    high_mask, _ = binarize_map(amap, filter_size=1)
    np.testing.assert_array_equal(low_mask, ~high_mask)
    assert high_mask[2, 2]


@pytest.mark.parametrize("amap", [np.full((16, 16), 0.5), np.full((16, 16), np.nan), np.zeros((1, 1))])
def test_binarize_map_degenerate_warns_and_returns_empty(amap, caplog):
    with caplog.at_level(logging.WARNING, logger="conceptdistill.maskmath"):
        mask, threshold = binarize_map(amap)
    assert mask.shape == amap.shape and mask.dtype == bool and not mask.any()
    assert math.isnan(threshold)
    assert any("degenerate" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("name", list(near_constant_maps()))
def test_binarize_map_near_constant_map_warns_and_returns_empty(name, caplog):
    amap = near_constant_maps()[name]
    with caplog.at_level(logging.WARNING, logger="conceptdistill.maskmath"):
        mask, threshold = binarize_map(amap)
    assert mask.shape == amap.shape and mask.dtype == bool and not mask.any()
    assert math.isnan(threshold)
    assert any("degenerate" in r.getMessage() and "rounding" in r.getMessage() for r in caplog.records)


# --- upsample_mask --------------------------------------------------------------------------------


def test_upsample_mask_integer_factor_repeats_pixels():
    rng = np.random.default_rng(0)
    mask = rng.random((16, 16)) > 0.5
    up = upsample_mask(mask, (64, 64))
    np.testing.assert_array_equal(up, np.kron(mask, np.ones((4, 4), dtype=bool)))


@pytest.mark.parametrize("size", [(50, 70), (64, 64), (7, 5), (33, 100)])
def test_upsample_mask_matches_torch_nearest(size):
    rng = np.random.default_rng(1)
    mask = rng.random((16, 12)) > 0.5
    expected = (
        torch.nn.functional.interpolate(torch.from_numpy(mask)[None, None].float(), size=size, mode="nearest")[0, 0]
        .bool()
        .numpy()
    )
    np.testing.assert_array_equal(upsample_mask(mask, size), expected)


# --- refine_mask ----------------------------------------------------------------------------------


def test_refine_mask_identical_images_is_empty():
    rng = np.random.default_rng(0)
    image = rng.random((32, 32, 3))
    pre = np.ones((32, 32), dtype=bool)
    assert not refine_mask(pre, image, image.copy()).any()
    assert not refine_mask(pre, image, image.copy(), close_holes=True).any()


def test_refine_mask_finds_changed_region_inside_pre():
    rng = np.random.default_rng(0)
    background = rng.random((48, 48, 3)) * 0.1
    image = background.copy()
    image[10:30, 12:34] += 0.7
    pre = np.zeros((48, 48), dtype=bool)
    pre[5:40, 5:40] = True
    refined = refine_mask(pre, image, background)
    expected = box_without_corners((48, 48), slice(10, 30), slice(12, 34))
    np.testing.assert_array_equal(refined, expected)


def test_refine_mask_close_holes_fills_interior_hole_and_keeps_border_objects():
    background = np.zeros((40, 40, 3))
    image = background.copy()
    image[0:20, 0:20] = 1.0  # touches the image border
    image[8:12, 8:12] = 0.0  # hole larger than the majority filter removes
    pre = np.ones((40, 40), dtype=bool)
    plain = refine_mask(pre, image, background)
    assert not plain[9:11, 9:11].any()
    closed = refine_mask(pre, image, background, close_holes=True)
    expected = np.zeros((40, 40), dtype=bool)
    expected[0:20, 0:20] = True
    expected[19, 19] = False  # the only corner inside the image, rounded off by the majority filter
    np.testing.assert_array_equal(closed, expected)


@pytest.mark.parametrize("close_holes", [False, True])
def test_refine_mask_never_exceeds_preliminary_mask(close_holes):
    rng = np.random.default_rng(42)
    for _ in range(25):
        h, w = rng.integers(8, 40, size=2)
        pre = ndimage.binary_dilation(rng.random((h, w)) > 0.9, iterations=int(rng.integers(0, 4)))
        image = rng.random((h, w, 3))
        background = np.where(rng.random((h, w, 1)) > 0.5, image, rng.random((h, w, 3)))
        refined = refine_mask(pre, image, background, close_holes=close_holes, seed=int(rng.integers(100)))
        assert refined.dtype == bool and refined.shape == (h, w)
        assert not (refined & ~pre).any()


def test_refine_mask_shape_mismatch_raises():
    with pytest.raises(ValueError):
        refine_mask(np.ones((8, 8), dtype=bool), np.zeros((8, 9, 3)), np.zeros((8, 9, 3)))


# --- sample_background_rectangle ------------------------------------------------------------------


def check_rectangle(background, loss_mask, rect, rules):
    assert loss_mask.shape == background.shape and loss_mask.dtype == bool
    assert not (loss_mask & ~background).any(), "loss mask must be background only"
    if rect is None:
        np.testing.assert_array_equal(loss_mask, background)
        return
    assert isinstance(rect, Rect)
    h, w = background.shape
    assert 0 <= rect.top and rect.top + rect.height <= h
    assert 0 <= rect.left and rect.left + rect.width <= w
    assert rect.height >= rules["min_side"] and rect.width >= rules["min_side"]
    assert rules["min_area"] <= rect.height * rect.width <= rules["max_area"]
    assert not (rect.height > rules["max_side"] and rect.width > rules["max_side"])
    inside = np.zeros_like(background)
    inside[rect.top : rect.top + rect.height, rect.left : rect.left + rect.width] = True
    assert not (loss_mask & ~inside).any(), "loss mask must lie inside the rectangle"
    np.testing.assert_array_equal(loss_mask, background & inside)
    assert background[inside].mean() >= rules["min_background_fraction"]


def random_background(rng: np.random.Generator, size: int) -> np.ndarray:
    kind = rng.integers(3)
    if kind == 0:  # blobby object
        fg = ndimage.binary_dilation(rng.random((size, size)) > 0.99, iterations=int(rng.integers(1, size // 3)))
    elif kind == 1:  # a box
        fg = np.zeros((size, size), dtype=bool)
        a, b = sorted(rng.integers(0, size, 2))
        fg[a:b, a:b] = True
    else:  # noise at a random density
        fg = rng.random((size, size)) < rng.random()
    return ~fg


@pytest.mark.parametrize("size", [64, 16, 40])
def test_rectangles_obey_rules(size):
    rules = rectangle_rules_for(size)
    rng = np.random.default_rng(size)
    found = 0
    for _ in range(200):
        background = random_background(rng, size)
        loss_mask, rect = sample_background_rectangle(background, rng, **rules)
        check_rectangle(background, loss_mask, rect, rules)
        found += rect is not None
    assert found > 50  # most random masks admit a rectangle


def test_default_rules_are_the_papers():
    rules = rectangle_rules_for(64)
    assert rules == dict(min_side=11, min_area=256, max_area=1024, max_side=32, min_background_fraction=2 / 3)
    rng = np.random.default_rng(0)
    background = np.ones((64, 64), dtype=bool)
    for seed in range(50):
        loss_mask, rect = sample_background_rectangle(background, np.random.default_rng(seed))
        check_rectangle(background, loss_mask, rect, rules)
        assert rect is not None
    # same generator state -> same rectangle
    a = sample_background_rectangle(background, np.random.default_rng(7))[1]
    b = sample_background_rectangle(background, np.random.default_rng(7))[1]
    assert a == b and rng is not None


def test_rectangles_for_16x16_latents_fit():
    rules = rectangle_rules_for(16)
    assert rules["min_side"] == 3 and rules["min_area"] == 16 and rules["max_area"] == 64 and rules["max_side"] == 8
    _, rect = sample_background_rectangle(np.ones((16, 16), dtype=bool), np.random.default_rng(0), **rules)
    assert rect is not None


def test_rectangle_fallbacks_terminate():
    rng = np.random.default_rng(0)
    all_fg = np.zeros((64, 64), dtype=bool)
    loss_mask, rect = sample_background_rectangle(all_fg, rng)
    assert rect is None and not loss_mask.any()

    tiny = np.ones((4, 4), dtype=bool)
    loss_mask, rect = sample_background_rectangle(tiny, rng)
    assert rect is None and loss_mask.all()

    # A thin background stripe: no rectangle can be 2/3 background -> all background after max_tries.
    stripe = np.zeros((64, 64), dtype=bool)
    stripe[:, 0] = True
    loss_mask, rect = sample_background_rectangle(stripe, rng)
    assert rect is None
    np.testing.assert_array_equal(loss_mask, stripe)
    assert loss_mask is not stripe


# --- centre_box_mask ------------------------------------------------------------------------------


def test_centre_box_mask():
    mask = centre_box_mask(10, 20, 0.5)
    expected = np.zeros((10, 20), dtype=bool)
    expected[2:7, 7:12] = True
    np.testing.assert_array_equal(mask, expected)
    assert centre_box_mask(8, 8, 1.0).all()
    assert not centre_box_mask(8, 8, 0.0).any()
    with pytest.raises(ValueError):
        centre_box_mask(8, 8, 1.5)


def test_close_and_fill_holes_turns_an_outline_into_a_solid_object():
    from conceptdistill.maskmath import close_and_fill_holes

    yy, xx = np.mgrid[:16, :16]
    radius = np.hypot(yy - 8, xx - 8)
    ring = (radius > 3) & (radius < 5.5)
    filled = close_and_fill_holes(ring)
    assert filled[8, 8] and filled[radius < 5].all()
    assert not filled[radius > 6.5].any()  # nothing grows outside the outline
    broken = ring.copy()
    broken[7:10, 12:15] = False  # a gap of about one closing width: closing bridges it first
    assert close_and_fill_holes(broken, 3)[8, 8]
    assert not close_and_fill_holes(np.zeros((8, 8), bool)).any()


def test_mirrored_background_fills_the_object_from_the_largest_mirrored_background():
    from conceptdistill.maskmath import mirrored_background

    rng = np.random.default_rng(0)
    image = rng.random((8, 10, 3)).astype(np.float32)
    obj = np.zeros((8, 10), bool)
    obj[2:5, 1:4] = True  # left half: its left-right mirror (columns 6..8) is all background
    filled = mirrored_background(image, obj)
    assert filled.dtype == image.dtype
    assert np.array_equal(filled[~obj], image[~obj])
    assert np.array_equal(filled[obj], image[:, ::-1][obj])
    # an object across the vertical axis: the top-bottom mirror brings more background and fills first
    wide = np.zeros((8, 10), bool)
    wide[0:3, 2:8] = True
    filled = mirrored_background(image, wide)
    assert np.array_equal(filled[wide], image[::-1][wide])
    # pixels no mirror covers with background take the mean background colour; all object: the image mean
    centre = np.zeros((8, 10), bool)
    centre[3:5, 4:6] = True  # every mirror of a centred square is the square itself
    filled = mirrored_background(image, centre)
    assert np.allclose(filled[centre], image[~centre].mean(axis=0))
    everything = mirrored_background(image, np.ones((8, 10), bool))
    assert np.allclose(everything, image.reshape(-1, 3).mean(axis=0))
    with pytest.raises(ValueError, match="differ in size"):
        mirrored_background(image, np.zeros((8, 8), bool))
