"""Scoring stage outputs against ground truth, as the paper scores them, plus logging of the results.

Masks are scored at image resolution with pixels pooled over the whole split (accuracy, foreground IoU,
mIoU); the per-image mean IoU is reported beside them. Ground truth is read here and nowhere in training.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
import torch

from conceptdistill.maskmath import upsample_mask
from conceptdistill.metrics import (
    all_foreground_scores,
    attention_auc,
    best_centre_box_scores,
    mean_iou_per_image,
    pooled_counts,
    scores_from_counts,
)

log = logging.getLogger(__name__)


def evaluation_split(ctx) -> str:
    splits = list(ctx.cfg.masks.splits)
    return "test" if "test" in splits else splits[-1]


def truths_by_id(dataset) -> dict[str, dict]:
    """Truth masks (and images, for figures) keyed by sample id."""
    samples = {}
    for index in range(len(dataset)):
        sample = dataset[index]
        samples[sample["id"]] = {"mask": sample["mask"].numpy().astype(bool), "image": sample["image"].numpy()}
    return samples


def upsample_map(attention: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour upsampling of a float map to the image grid (as the masks are)."""
    rows = (np.arange(size[0]) * attention.shape[0] // size[0])[:, None]
    cols = (np.arange(size[1]) * attention.shape[1] // size[1])[None, :]
    return attention[rows, cols]


def mask_scores(predictions: Iterable[np.ndarray], truths: Iterable[np.ndarray]) -> dict[str, float]:
    """Pooled acc / IoU / mIoU (+ per-image mean IoU) of bool masks, upsampled to the truths' size."""
    predictions, truths = list(predictions), list(truths)
    resized = [upsample_mask(p, t.shape) for p, t in zip(predictions, truths, strict=True)]
    counts = pooled_counts(resized, truths)
    scores = scores_from_counts(counts)
    scores["iou_per_image"] = mean_iou_per_image(resized, truths)
    return scores


def evaluate_mask_stage(ctx, module) -> dict:
    """Scores of A and M_pre, the two baselines, per-layer diagnostics and the figure (masks stage)."""
    from conceptdistill.figures import save_grid
    from conceptdistill.stages.masks import mask_store

    datamodule = ctx.datamodule
    if datamodule.truth is None:
        log.info("no ground truth in this data set: masks are written but not scored")
        return {}
    split = evaluation_split(ctx)
    store = mask_store(ctx, split)
    truth = truths_by_id(datamodule.dataset(split))
    ids = [sid for sid in truth if store.has(sid)]
    truths = [truth[sid]["mask"] for sid in ids]
    maps = [store.load("attention", sid) for sid in ids]
    masks = [store.load("mask", sid) for sid in ids]
    rows = {
        "preliminary_masks": mask_scores(masks, truths),
        "baseline_all_foreground": all_foreground_scores(truths),
    }
    centre, fraction = best_centre_box_scores(truths)
    rows["baseline_centre_box"] = {**centre, "fraction": fraction}
    summary = {
        "split": split,
        "images": len(ids),
        "attention_auc": attention_auc([upsample_map(m, t.shape) for m, t in zip(maps, truths, strict=True)], truths),
        "attention_contrast": attention_contrast(maps, truths),
        "rows": rows,
        "layers": per_layer_diagnostics(module, ids[:32], truth),
    }
    count = ctx.cfg.masks.figure_samples
    figure = save_grid(
        ctx.stage_dir("masks") / "masks_grid.png",
        {
            "image": [truth[sid]["image"] for sid in ids[:count]],
            "attention A": maps[:count],
            "M_pre": masks[:count],
            "truth": truths[:count],
        },
    )
    log_results(ctx, "masks", summary, {"masks_grid": figure})
    return summary


def attention_contrast(maps: list[np.ndarray], truths: list[np.ndarray]) -> float:
    """Mean attention inside the object over mean outside (pooled): above 1 means the right polarity."""
    inside = outside = 0.0
    n_in = n_out = 0
    for attention, truth in zip(maps, truths, strict=True):
        up = upsample_map(attention, truth.shape)
        inside += float(up[truth].sum())
        outside += float(up[~truth].sum())
        n_in += int(truth.sum())
        n_out += int((~truth).sum())
    return (inside / max(n_in, 1)) / max(outside / max(n_out, 1), 1e-12)


def per_layer_diagnostics(module, ids: list[str], truth: dict[str, dict]) -> dict[str, dict]:
    """AUC and contrast of each cross-attention layer's own map on a few images: which layers carry the
    concept (and with which sign) is a property of the trained model, so it is measured, not assumed."""
    if not ids:
        return {}
    images = torch.stack([torch.from_numpy(truth[sid]["image"]) for sid in ids])
    _, attention_store = module.attention_maps(images, ids, per_layer=True)
    truths = [truth[sid]["mask"] for sid in ids]
    result = {}
    for layer, maps in attention_store.per_layer_mean().items():
        layer_maps = list(maps.float().cpu().numpy())
        try:
            auc = attention_auc([upsample_map(m, t.shape) for m, t in zip(layer_maps, truths, strict=True)], truths)
        except ValueError:
            auc = float("nan")
        result[layer] = {"auc": auc, "contrast": attention_contrast(layer_maps, truths)}
    return result


def flatten_metrics(prefix: str, data: dict) -> dict[str, float]:
    """{"rows": {"x": {"iou": 1}}} -> {"prefix/rows/x/iou": 1}; non-numbers are dropped."""
    flat = {}
    for key, value in data.items():
        name = f"{prefix}/{key}"
        if isinstance(value, dict):
            flat.update(flatten_metrics(name, value))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[name] = float(value)
    return flat


def log_results(ctx, stage: str, summary: dict, figures: dict | None = None) -> None:
    """Send a stage's evaluation to the configured logger: metrics under test/, figures as images."""
    logger = ctx.logger(stage)
    if logger is None:
        return
    logger.log_metrics(flatten_metrics("test", {k: v for k, v in summary.items() if k != "layers"}))
    if figures and hasattr(logger, "log_image"):
        for key, path in figures.items():
            logger.log_image(key=f"test/{key}", images=[str(path)])
    logger.save()


def evaluate_inpaint_stage(ctx) -> dict:
    """Scores of the refined masks M on the evaluation split, and the image | M_pre | B | M | truth grid."""
    from conceptdistill.figures import save_grid
    from conceptdistill.stages.inpaint import inpaint_store
    from conceptdistill.stages.masks import mask_store

    datamodule = ctx.datamodule
    if datamodule.truth is None:
        return {}
    split = evaluation_split(ctx)
    refined, prelim = inpaint_store(ctx, split), mask_store(ctx, split)
    truth = truths_by_id(datamodule.dataset(split))
    ids = [sid for sid in truth if refined.has(sid)]
    truths = [truth[sid]["mask"] for sid in ids]
    masks = [refined.load("mask", sid) for sid in ids]
    summary = {"split": split, "images": len(ids), "rows": {"refined_masks": mask_scores(masks, truths)}}
    count = ctx.cfg.inpaint.figure_samples
    figure = save_grid(
        ctx.stage_dir("inpaint") / "inpaint_grid.png",
        {
            "image": [truth[sid]["image"] for sid in ids[:count]],
            "M_pre": [prelim.load("mask", sid) for sid in ids[:count]],
            "background B": [refined.load("background", sid) for sid in ids[:count]],
            "refined M": masks[:count],
            "truth": truths[:count],
        },
    )
    log_results(ctx, "inpaint", summary, {"inpaint_grid": figure})
    return summary
