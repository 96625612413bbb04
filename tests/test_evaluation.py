"""Scoring in conceptdistill.evaluation: streaming mask scores, the pixel sample for AUC, one-class splits."""

from __future__ import annotations

import logging
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from conceptdistill.evaluation import evaluate_mask_stage, mask_scores, sampled_pixels
from conceptdistill.maskmath import upsample_mask
from conceptdistill.metrics import attention_auc, pooled_counts, scores_from_counts
from conceptdistill.pipeline.layout import RunLayout
from conceptdistill.utils.io import read_json, write_json


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


def test_mask_scores_give_both_box_protocols_when_boxes_are_given():
    truths = [np.zeros((8, 8), bool), np.zeros((8, 8), bool)]
    truths[0][:4, :4] = True
    truths[1][2:6, 2:6] = True
    boxes = [(0, 0, 4, 4), (2, 2, 6, 6)]  # the pixel boxes of those truths
    predictions = [np.zeros((4, 4), bool), np.zeros((4, 4), bool)]  # latent resolution, 2x
    predictions[0][:2, :2] = True  # exact after upsampling
    predictions[1][1, 1] = predictions[1][2, 2] = True  # two corners of the truth: a sparse mask, an exact box
    scores = mask_scores(predictions, truths, boxes)
    assert scores["iou_mask_vs_box"] == scores["iou"] == pytest.approx(24 / 32)
    assert scores["iou_box"] == 1.0
    assert "iou_box" not in mask_scores(predictions, truths)


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


class _Split:
    """A data split of (image, mask) samples as the data modules give them: tensors, ids."""

    def __init__(self, masks: list[np.ndarray]) -> None:
        self.masks = masks

    def __len__(self) -> int:
        return len(self.masks)

    def __getitem__(self, index: int) -> dict:
        mask = torch.from_numpy(self.masks[index])
        return {"id": f"test-{index:06d}", "image": torch.rand(3, *mask.shape), "mask": mask}


class _Masker:
    """`module` of evaluate_mask_stage: per-layer maps of the given images from a fixed pattern."""

    def attention_maps(self, images: torch.Tensor, ids: list[str], *, per_layer: bool = False):
        maps = torch.rand(len(ids), 8, 8, generator=torch.Generator().manual_seed(0))
        store = SimpleNamespace(per_layer_mean=lambda: {"up_blocks.0": maps, "up_blocks.1": 2 * maps})
        return maps, store


@pytest.mark.parametrize("object_everywhere", [False, True])
def test_mask_stage_scores_a_one_class_split_with_nan_auc(tmp_path, caplog, object_everywhere):
    # Truths all background (or all object): every map is already written, so scoring must finish.
    masks = [np.full((16, 16), object_everywhere) for _ in range(3)]
    cfg = OmegaConf.create({"seed": 0, "splits": ["train", "test"], "masks": {"figure_samples": 2}})
    ctx = SimpleNamespace(
        cfg=cfg,
        run_dir=tmp_path,
        layout=RunLayout(tmp_path),
        datamodule=SimpleNamespace(truth=True, dataset=lambda split: _Split(masks)),
        stage_dir=lambda stage: tmp_path / stage,
        logger=lambda stage: None,
    )
    store = ctx.layout.mask_store("test")
    rng = np.random.default_rng(0)
    for index in range(len(masks)):
        store.save(f"test-{index:06d}", "attention", rng.random((8, 8)).astype(np.float32))
        store.save(f"test-{index:06d}", "mask", rng.random((8, 8)) > 0.5)

    with caplog.at_level(logging.WARNING, logger="conceptdistill.metrics"):
        summary = evaluate_mask_stage(ctx, _Masker())
    assert summary["images"] == 3
    assert math.isnan(summary["attention_auc"])
    assert set(summary["layers"]) == {"up_blocks.0", "up_blocks.1"}
    assert all(math.isnan(layer["auc"]) for layer in summary["layers"].values())
    assert any("attention AUC is undefined" in r.getMessage() for r in caplog.records)
    # The summary is recorded as JSON (DONE.json, results.json); NaN round-trips.
    write_json(tmp_path / "summary.json", summary)
    assert math.isnan(read_json(tmp_path / "summary.json")["attention_auc"])


def test_attention_contrast_of_a_single_class_is_nan_not_a_number_from_an_empty_side():
    from conceptdistill.evaluation import attention_contrast

    maps = [np.linspace(0, 1, 16).reshape(4, 4)]
    assert math.isnan(attention_contrast(maps, [np.zeros((4, 4), bool)]))  # was 0
    assert math.isnan(attention_contrast(maps, [np.ones((4, 4), bool)]))  # was about 1e12
    half = np.zeros((4, 4), bool)
    half[2:] = True
    assert attention_contrast(maps, [half]) > 1
