"""Scoring helpers of conceptdistill.evaluation: streaming mask scores and the pixel sample for AUC."""

from __future__ import annotations

import numpy as np
import pytest

from conceptdistill.evaluation import mask_scores, sampled_pixels
from conceptdistill.maskmath import upsample_mask
from conceptdistill.metrics import attention_auc, pooled_counts, scores_from_counts


def test_mask_scores_upsample_each_prediction_and_pool_the_pixels():
    truths = [np.zeros((8, 8), bool), np.zeros((8, 8), bool)]
    truths[0][:4, :4] = True
    truths[1][4:, 4:] = True
    predictions = [np.zeros((4, 4), bool), np.zeros((4, 4), bool)]  # latent resolution, 2x
    predictions[0][:2, :2] = True  # exact
    predictions[1][2:, 1:3] = True  # upsampled: rows 4-7, columns 2-5; half of it on the truth
    scores = mask_scores(predictions, truths)
    expected = scores_from_counts(pooled_counts([upsample_mask(p, (8, 8)) for p in predictions], truths))
    assert scores["iou"] == pytest.approx(expected["iou"]) == pytest.approx(24 / 40)
    assert scores["iou_per_image"] == pytest.approx((1 + 8 / 24) / 2)


def test_sampled_pixels_are_exact_under_the_budget_and_a_seeded_equal_sample_above():
    rng = np.random.default_rng(0)
    truths = [rng.random((16, 16)) > 0.7 for _ in range(6)]
    maps = [t[::2, ::2] + rng.normal(0, 0.5, (8, 8)) for t in truths]
    values, labels = sampled_pixels(maps, truths, budget=10_000)
    assert [v.size for v in values] == [256] * 6
    full = attention_auc([np.kron(m, np.ones((2, 2))) for m in maps], truths)
    assert attention_auc(values, labels) == pytest.approx(full)

    small, small_labels = sampled_pixels(maps, truths, budget=600, seed=1)
    assert [v.size for v in small] == [100] * 6
    again, _ = sampled_pixels(maps, truths, budget=600, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(small, again, strict=True))
    assert abs(attention_auc(small, small_labels) - full) < 0.1
