"""Tests for conceptdistill.metrics (fast, CPU only)."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from conceptdistill.data.geometry import boxes_to_mask as box_to_mask
from conceptdistill.data.geometry import union_pixel_box
from conceptdistill.maskmath import centre_box_mask
from conceptdistill.metrics import (
    SegmentationScores,
    add_counts,
    all_foreground_scores,
    attention_auc,
    best_centre_box_scores,
    box_iou,
    mean_box_iou,
    mean_iou_per_image,
    pooled_counts,
    scores_from_counts,
    tight_box,
)

# Two 2x2 images, scored by hand.
#   A: truth [[1,1],[0,0]], pred [[1,0],[0,0]] -> tp 1, fp 0, fn 1, tn 2, IoU 1/2
#   B: truth [[1,1],[1,1]], pred [[1,1],[1,0]] -> tp 3, fp 0, fn 1, tn 0, IoU 3/4
# Pooled: tp 4, fp 0, fn 2, tn 2 -> acc 6/8, IoU 4/6, bg IoU 2/4, mIoU (2/3 + 1/2)/2 = 7/12.
# Per-image mean IoU: (1/2 + 3/4)/2 = 5/8, which differs from the pooled 2/3.
TRUTH = np.array([[[1, 1], [0, 0]], [[1, 1], [1, 1]]], dtype=bool)
PRED = np.array([[[1, 0], [0, 0]], [[1, 1], [1, 0]]], dtype=bool)
EXPECTED = {"acc": 0.75, "iou": 2 / 3, "bg_iou": 0.5, "miou": 7 / 12}


def test_hand_computed_pooled_and_per_image():
    counts = pooled_counts(PRED, TRUTH)
    assert counts == {"tp": 4, "fp": 0, "fn": 2, "tn": 2}
    assert scores_from_counts(counts) == pytest.approx(EXPECTED)
    assert mean_iou_per_image(PRED, TRUTH) == pytest.approx(5 / 8)
    # Same numbers from per-image lists, torch input, and accumulated counts.
    assert pooled_counts(list(PRED), list(TRUTH)) == counts
    assert pooled_counts(torch.from_numpy(PRED), torch.from_numpy(TRUTH)) == counts
    assert add_counts(pooled_counts(PRED[0], TRUTH[0]), pooled_counts(PRED[1], TRUTH[1])) == counts


def test_empty_union_is_perfect():
    empty = np.zeros((3, 3), dtype=bool)
    scores = scores_from_counts(pooled_counts(empty, empty))
    assert scores == {"acc": 1.0, "iou": 1.0, "miou": 1.0, "bg_iou": 1.0}
    full = np.ones((3, 3), dtype=bool)
    assert scores_from_counts(pooled_counts(full, full))["bg_iou"] == 1.0
    with pytest.raises(ValueError):
        scores_from_counts({"tp": 0, "fp": 0, "fn": 0, "tn": 0})


def test_pooled_counts_rejects_bad_input():
    with pytest.raises(TypeError):
        pooled_counts(np.full((2, 2), 0.7), TRUTH[0])
    with pytest.raises(ValueError):
        pooled_counts(PRED, TRUTH[0])


def test_segmentation_scores_hand_example():
    metric = SegmentationScores()
    metric.update(torch.from_numpy(PRED[:1]), torch.from_numpy(TRUTH[:1]))  # batch of one
    metric.update(torch.from_numpy(PRED[1]), torch.from_numpy(TRUTH[1]))  # a single (H, W) image
    result = {k: float(v) for k, v in metric.compute().items()}
    assert result == pytest.approx({**EXPECTED, "iou_per_image": 5 / 8})


def test_segmentation_scores_matches_pure_functions():
    rng = np.random.default_rng(0)
    metric = SegmentationScores(threshold=0.5)
    all_probs, all_truths = [], []
    for batch in range(5):
        n = int(rng.integers(1, 4))
        probs = rng.random((n, 1, 12, 12)).astype(np.float32)
        truth = rng.random((n, 1, 12, 12)) > 0.6
        if batch == 0:
            truth[0] = False  # an image with empty truth
            probs[0] = 0.1  # and empty prediction
        metric.update(torch.from_numpy(probs), torch.from_numpy(truth))
        all_probs.append(probs[:, 0])
        all_truths.append(truth[:, 0])
    probs, truths = np.concatenate(all_probs), np.concatenate(all_truths)
    expected = scores_from_counts(pooled_counts(probs > 0.5, truths))
    expected["iou_per_image"] = mean_iou_per_image(probs > 0.5, truths)
    result = {k: float(v) for k, v in metric.compute().items()}
    assert result == pytest.approx(expected, abs=1e-12)

    metric.reset()
    with pytest.raises(ValueError):
        metric.update(torch.full((1, 4, 4), 3.0), torch.zeros((1, 4, 4), dtype=torch.bool))  # logits


def test_attention_auc_perfect_inverted_and_hand_example():
    rng = np.random.default_rng(0)
    truths = rng.random((3, 16, 16)) > 0.7
    maps = np.where(truths, 0.6, 0.2) + rng.random((3, 16, 16)) * 0.1
    assert attention_auc(maps, truths) == 1.0
    assert attention_auc(-maps, truths) == 0.0
    assert attention_auc(list(maps), list(truths)) == 1.0
    # Positives {0.35, 0.8}, negatives {0.1, 0.4}: 3 of 4 pairs ordered correctly.
    assert attention_auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1], dtype=bool)) == 0.75


def test_attention_auc_subsampling_is_close_and_deterministic():
    rng = np.random.default_rng(1)
    truths = rng.random((4, 64, 64)) > 0.5
    maps = truths * 0.5 + rng.random((4, 64, 64))
    exact = attention_auc(maps, truths, max_pixels=None)
    assert exact == pytest.approx(roc_auc_score(truths.ravel(), maps.ravel()))
    approx = attention_auc(maps, truths, max_pixels=5000)
    assert approx == attention_auc(maps, truths, max_pixels=5000)
    assert abs(approx - exact) < 0.02


def test_attention_auc_errors():
    with pytest.raises(ValueError, match="upsample"):
        attention_auc(np.zeros((2, 2)), np.ones((4, 4), dtype=bool))  # shape mismatch
    # Non-finite maps are a fault upstream, not a property of the data: still an error.
    for bad in (np.nan, np.inf):
        maps = np.zeros((4, 4))
        maps[1, 2] = bad
        with pytest.raises(ValueError, match="non-finite"):
            attention_auc(maps, np.eye(4, dtype=bool))
        with pytest.raises(ValueError, match="non-finite"):
            attention_auc(maps, np.zeros((4, 4), dtype=bool))  # even where AUC would be undefined anyway


@pytest.mark.parametrize("truth_value, kind", [(False, "background"), (True, "object")])
def test_attention_auc_of_a_single_class_is_nan_with_a_warning(truth_value, kind, caplog):
    rng = np.random.default_rng(0)
    maps = rng.random((3, 8, 8))
    truths = np.full((3, 8, 8), truth_value)
    with caplog.at_level(logging.WARNING, logger="conceptdistill.metrics"):
        auc = attention_auc(list(maps), list(truths))
    assert math.isnan(auc)
    assert any(f"all 192 truth pixels are {kind}" in r.getMessage() for r in caplog.records)


def test_attention_auc_judges_the_pixels_it_scores():
    # One object pixel among 10000: the full set has both classes, a 100-pixel subsample almost surely not.
    truths = np.zeros((100, 100), dtype=bool)
    truths[0, 0] = True
    maps = np.random.default_rng(0).random((100, 100))
    assert 0.0 <= attention_auc(maps, truths, max_pixels=None) <= 1.0
    assert math.isnan(attention_auc(maps, truths, max_pixels=100))


def test_best_centre_box_finds_exact_square():
    truth = centre_box_mask(32, 32, 0.5)
    scores, fraction = best_centre_box_scores(np.stack([truth, truth]))
    assert fraction == pytest.approx(0.5)
    assert scores["iou"] == 1.0 and scores["acc"] == 1.0 and scores["miou"] == 1.0
    # Mixed image sizes, given as a list.
    scores, fraction = best_centre_box_scores([truth, centre_box_mask(20, 40, 0.5)])
    assert fraction == pytest.approx(0.5) and scores["iou"] == 1.0


def test_best_centre_box_matches_brute_force():
    rng = np.random.default_rng(3)
    truths = [rng.random((10, 14)) > 0.5, rng.random((10, 14)) > 0.3, rng.random((9, 9)) > 0.8]
    fractions = [0.2, 0.5, 0.9]
    scores, fraction = best_centre_box_scores(truths, fractions)
    brute = {
        f: scores_from_counts(pooled_counts([centre_box_mask(*t.shape, f) for t in truths], truths)) for f in fractions
    }
    best = max(fractions, key=lambda f: brute[f]["iou"])
    assert fraction == best
    assert scores == pytest.approx(brute[best])


def test_all_foreground_scores():
    truth = np.zeros((2, 4, 4), dtype=bool)
    truth[:, :2] = True
    scores = all_foreground_scores(truth)
    assert scores == pytest.approx({"acc": 0.5, "iou": 0.5, "bg_iou": 0.0, "miou": 0.25})


def test_box_to_mask():
    mask = box_to_mask(6, 8, [(1, 2, 4, 5), (3, 0, 5, 3), (6, 4, 20, 20), (2, 2, 2, 5)])
    expected = np.zeros((6, 8), dtype=bool)
    expected[2:5, 1:4] = True  # x0=1..3, y0=2..4, exclusive ends
    expected[0:3, 3:5] = True
    expected[4:6, 6:8] = True  # clipped to the image
    np.testing.assert_array_equal(mask, expected)
    assert not box_to_mask(4, 4, []).any()


# ----- the box protocol: box around the prediction vs the union box of the truth boxes -----------------------
def test_tight_box_holds_all_foreground_not_only_the_largest_component():
    mask = np.zeros((10, 12), dtype=bool)
    mask[2:6, 3:8] = True  # the large component
    mask[8, 10] = True  # a one-pixel blob far away still widens the box
    assert tight_box(mask) == (2, 3, 9, 11)
    assert tight_box(np.zeros((4, 4), dtype=bool)) is None
    assert tight_box(np.eye(3, dtype=np.uint8)) == (0, 0, 3, 3)
    with pytest.raises(TypeError):
        tight_box(np.zeros((4, 4)))
    with pytest.raises(ValueError):
        tight_box(np.zeros((2, 4, 4), dtype=bool))


def test_box_iou_hand_examples_and_empty_boxes():
    assert box_iou((0, 0, 4, 4), (0, 0, 4, 4)) == 1.0
    assert box_iou((0, 0, 4, 4), (2, 2, 6, 6)) == pytest.approx(4 / 28)  # 2x2 overlap of two 16-pixel boxes
    assert box_iou((0, 0, 2, 2), (0, 2, 2, 4)) == 0.0  # touching, no shared pixel
    assert box_iou((1, 1, 3, 5), (0, 0, 4, 4)) == pytest.approx(6 / 18)
    assert box_iou(None, None) == 1.0  # empty union: perfect agreement, as for pixel IoU
    assert box_iou(None, (0, 0, 1, 1)) == 0.0 and box_iou((0, 0, 1, 1), None) == 0.0
    assert box_iou((2, 2, 2, 5), None) == 1.0  # a box of no pixels is empty
    with pytest.raises(ValueError):
        box_iou((3, 0, 1, 2), (0, 0, 1, 1))


def test_union_pixel_box_rasterises_the_box_around_all_boxes():
    # two boxes (x0, y0, x1, y1): the union box is (1, 1, 10, 7); pixel centres inside: columns 1-9, rows 1-6
    assert union_pixel_box(8, 12, [(1, 1, 4, 4), (6, 3, 10, 7)]) == (1, 1, 7, 10)
    assert union_pixel_box(8, 12, [(10, 7, 6, 3)]) == (3, 6, 7, 10)  # corners swapped
    assert union_pixel_box(8, 12, [(-5, -5, 30, 3.2)]) == (0, 0, 3, 12)  # clipped to the grid
    assert union_pixel_box(8, 12, []) is None and union_pixel_box(8, 12, None) is None
    assert union_pixel_box(8, 12, [(20, 20, 30, 30)]) is None  # outside the grid
    # the union box's pixels are those of its rasterised mask (the truth mask of a one-box image)
    mask = box_to_mask(8, 12, [(1.3, 0.6, 9.4, 6.5)])
    assert union_pixel_box(8, 12, [(1.3, 0.6, 9.4, 6.5)]) == tight_box(mask)


def test_the_two_box_protocols_differ_by_hand():
    # Truth: two dogs, boxes (x0, y0, x1, y1) (0, 0, 4, 4) and (6, 6, 10, 10) on a 10 x 10 image; the union box
    # is the whole image. The prediction finds both dogs exactly.
    truth_boxes = [(0, 0, 4, 4), (6, 6, 10, 10)]
    truth = box_to_mask(10, 10, truth_boxes)
    pred = truth.copy()
    mask_vs_box = scores_from_counts(pooled_counts(pred, truth))["iou"]
    assert mask_vs_box == 1.0
    assert mean_box_iou([pred], [union_pixel_box(10, 10, truth_boxes)]) == 1.0
    # A prediction of one 4x4 dog: mask IoU 16/32, but its box covers 16 of the union box's 100 pixels.
    one = np.zeros((10, 10), dtype=bool)
    one[:4, :4] = True
    assert scores_from_counts(pooled_counts(one, truth))["iou"] == pytest.approx(0.5)
    assert mean_box_iou([one], [union_pixel_box(10, 10, truth_boxes)]) == pytest.approx(0.16)
    # A ring around a one-box truth: mask IoU small, box IoU perfect.
    ring = box_to_mask(10, 10, [(2, 2, 8, 8)]) & ~box_to_mask(10, 10, [(3, 3, 7, 7)])
    single = union_pixel_box(10, 10, [(2, 2, 8, 8)])
    assert scores_from_counts(pooled_counts(ring, box_to_mask(10, 10, [(2, 2, 8, 8)])))["iou"] == pytest.approx(20 / 36)
    assert mean_box_iou([ring], [single]) == 1.0
    # The mean is over images, each weighing the same; an empty prediction scores 0 against a truth box.
    empty = np.zeros((10, 10), dtype=bool)
    assert mean_box_iou([ring, empty], [single, single]) == pytest.approx(0.5)
    assert mean_box_iou(np.stack([ring, one]), [single, single]) == pytest.approx((1 + 4 / 48) / 2)  # 2x2 of 16 and 36 pixels
    with pytest.raises(ValueError):
        mean_box_iou([ring], [])
    with pytest.raises(ValueError):
        mean_box_iou([], [])
