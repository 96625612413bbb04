"""Scoring stage outputs against ground truth, as the paper scores them, plus logging of the results.

Masks are scored at image resolution with pixels pooled over the whole split (accuracy, foreground IoU,
mIoU); the per-image mean IoU is reported beside them. Box-scored data sets get both box protocols
(docs/METHOD.md, "Scoring"): `iou_mask_vs_box`, the pooled IoU of the masks against the rasterised boxes (the
same number as `iou`, named explicitly), and `iou_box`, the mean IoU of the box around each predicted mask with
the union box of its truth boxes. Ground truth is read here and nowhere in training.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
import torch

from conceptdistill.data.geometry import union_pixel_box
from conceptdistill.figures import save_grid
from conceptdistill.maskmath import centre_box_mask, resize_nearest, upsample_mask
from conceptdistill.metrics import (
    add_counts,
    all_foreground_scores,
    attention_auc,
    best_centre_box_scores,
    mean_box_iou,
    mean_iou_per_image,
    pooled_counts,
    scores_from_counts,
)

log = logging.getLogger(__name__)


def scored_split(cfg) -> str:
    """The split the per-image stages (masks, inpaint) are scored on: test if `cfg.splits` holds it, else the
    last one."""
    splits = list(cfg.splits)
    return "test" if "test" in splits else splits[-1]


def split_label(cfg, labels: dict[str, str]) -> dict[str, str]:
    """Results-table labels of per-image stage rows, each naming the split it is scored on when that is not
    the test split (`splits` without test): those rows then stand beside the U-Nets' test-split rows."""
    split = scored_split(cfg)
    return labels if split == "test" else {key: f"{label} [{split} split, not test]" for key, label in labels.items()}


def truths_by_id(dataset, *, images: int = 0) -> dict[str, dict]:
    """Truth masks keyed by sample id, plus the images of the first `images` samples (for figures only:
    a whole test set of 512 px float images would not fit in memory), and for box-scored data sets (samples
    with "boxes") "box": the union box of the image's truth boxes on the mask's grid (a metrics.PixelBox)."""
    samples = {}
    for index in range(len(dataset)):
        sample = dataset[index]
        entry = {"mask": sample["mask"].numpy().astype(bool)}
        if "boxes" in sample:
            entry["box"] = union_pixel_box(*entry["mask"].shape, sample["boxes"])
        if index < images:
            entry["image"] = sample["image"].numpy()
        samples[sample["id"]] = entry
    return samples


def mask_scores(predictions: Iterable[np.ndarray], truths: Iterable[np.ndarray],
                boxes: list | None = None) -> dict[str, float]:
    """Pooled acc / IoU / mIoU (+ per-image mean IoU) of bool masks, each upsampled to its truth's size.

    With `boxes` (one metrics.PixelBox or None per truth, on the truth's grid: a box-scored data set), also
    both box protocols, fractions in [0, 1]: "iou_mask_vs_box" (= "iou") and "iou_box" (metrics.mean_box_iou).
    Streams over the pairs, so only one upsampled mask exists at a time. Raises ValueError with no masks."""
    counts, ious, pairs, box_ious = None, 0.0, 0, []
    for index, (prediction, truth) in enumerate(zip(predictions, truths, strict=True)):
        resized = upsample_mask(prediction, truth.shape)
        image_counts = pooled_counts(resized, truth)
        counts = image_counts if counts is None else add_counts(counts, image_counts)
        ious += mean_iou_per_image([resized], [truth])
        if boxes is not None:
            box_ious.append(mean_box_iou([resized], [boxes[index]]))
        pairs += 1
    if counts is None:
        raise ValueError("no masks to score")
    scores = scores_from_counts(counts)
    scores["iou_per_image"] = ious / pairs
    if boxes is not None:
        scores["iou_mask_vs_box"] = scores["iou"]
        scores["iou_box"] = float(np.mean(box_ious))
    return scores


def truth_boxes(truth: dict[str, dict], ids: list[str]) -> list | None:
    """The union truth box of each of `ids` (see `truths_by_id`), or None for a data set not scored on boxes."""
    if not ids or "box" not in truth[ids[0]]:
        return None
    return [truth[sid]["box"] for sid in ids]


def sampled_pixels(
    maps: list[np.ndarray], truths: list[np.ndarray], *, budget: int = 4_000_000, seed: int = 0
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Each map upsampled to its truth's grid, as flat (map values, truth values) pixel lists; beyond
    `budget` pixels in all, the same number of pixels is drawn from every image (seeded), so the AUC of a
    large test set is estimated without holding every full-resolution map at once."""
    total = sum(t.size for t in truths)
    per_image = None if total <= budget else max(1, budget // len(truths))
    rng = np.random.default_rng(seed)
    values, labels = [], []
    for attention, truth in zip(maps, truths, strict=True):
        up, flat_truth = resize_nearest(attention, truth.shape).ravel(), truth.ravel()
        if per_image is not None and per_image < up.size:
            keep = rng.choice(up.size, size=per_image, replace=False)
            up, flat_truth = up[keep], flat_truth[keep]
        values.append(up)
        labels.append(flat_truth)
    return values, labels


def evaluate_mask_stage(ctx, module) -> dict:
    """Scores of A and M_pre, the two baselines, per-layer diagnostics and the figure (masks stage)."""
    datamodule = ctx.datamodule
    if datamodule.truth is None:
        log.info("no ground truth in this data set: masks are written but not scored")
        return {}
    split = scored_split(ctx.cfg)
    store = ctx.layout.mask_store(split)
    count = ctx.cfg.masks.figure_samples
    truth = truths_by_id(datamodule.dataset(split), images=max(count, 32))
    ids = [sid for sid in truth if store.has(sid)]
    pictured = [sid for sid in ids if "image" in truth[sid]]
    truths = [truth[sid]["mask"] for sid in ids]
    maps = [store.load("attention", sid) for sid in ids]
    masks = [store.load("mask", sid) for sid in ids]
    rows = {
        "preliminary_masks": mask_scores(masks, truths, truth_boxes(truth, ids)),
        "baseline_all_foreground": all_foreground_scores(truths),
    }
    centre, fraction = best_centre_box_scores(truths)
    rows["baseline_centre_box"] = {**centre, "fraction": fraction}
    boxes = truth_boxes(truth, ids)
    if boxes is not None:  # the baselines' boxes: the whole image, and the centred square
        for key, baseline in (("baseline_all_foreground", lambda t: np.ones_like(t)),
                              ("baseline_centre_box", lambda t: centre_box_mask(*t.shape, fraction))):
            rows[key]["iou_mask_vs_box"] = rows[key]["iou"]
            rows[key]["iou_box"] = float(np.mean([mean_box_iou([baseline(t)], [b]) for t, b in zip(truths, boxes, strict=True)]))
    summary = {
        "split": split,
        "images": len(ids),
        # NaN, with a logged warning, when the split's truths hold one class: the maps are written by now.
        "attention_auc": attention_auc(*sampled_pixels(maps, truths, seed=ctx.cfg.seed)),
        "attention_contrast": attention_contrast(maps, truths),
        "rows": rows,
        "layers": per_layer_diagnostics(module, pictured[:32], truth),
    }
    shown = [i for i, sid in enumerate(ids) if "image" in truth[sid]][:count]  # positions in ids
    figure = save_grid(
        ctx.stage_dir("masks") / "masks_grid.png",
        {
            "image": [truth[ids[i]]["image"] for i in shown],
            "attention A": [maps[i] for i in shown],
            "M_pre": [masks[i] for i in shown],
            "truth": [truths[i] for i in shown],
        },
    )
    log_results(ctx, "masks", summary, {"masks_grid": figure})
    return summary


def attention_contrast(maps: list[np.ndarray], truths: list[np.ndarray]) -> float:
    """Mean attention inside the object over mean outside (pooled): above 1 means the right polarity.

    NaN when the truths hold a single class (no inside or no outside to compare), as the AUC is then."""
    inside = outside = 0.0
    n_in = n_out = 0
    for attention, truth in zip(maps, truths, strict=True):
        up = resize_nearest(attention, truth.shape)
        inside += float(up[truth].sum())
        outside += float(up[~truth].sum())
        n_in += int(truth.sum())
        n_out += int((~truth).sum())
    if n_in == 0 or n_out == 0:
        return float("nan")
    return (inside / n_in) / max(outside / n_out, 1e-12)


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
        # NaN (with a warning) when the truths hold one class; non-finite maps still raise, as for the mean map.
        auc = attention_auc(*sampled_pixels(layer_maps, truths))
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
    datamodule = ctx.datamodule
    if datamodule.truth is None:
        return {}
    split = scored_split(ctx.cfg)
    refined, prelim = ctx.layout.inpaint_store(split), ctx.layout.mask_store(split)
    count = ctx.cfg.inpaint.figure_samples
    truth = truths_by_id(datamodule.dataset(split), images=count)
    ids = [sid for sid in truth if refined.has(sid)]
    truths = [truth[sid]["mask"] for sid in ids]
    masks = [refined.load("mask", sid) for sid in ids]
    summary = {"split": split, "images": len(ids), "rows": {"refined_masks": mask_scores(masks, truths, truth_boxes(truth, ids))}}
    removal = object_removal(datamodule, truth, ids, refined, prelim, split)
    if removal is not None:
        summary["scalars"] = {"object_removal_rate": removal}
    shown = [i for i, sid in enumerate(ids) if "image" in truth[sid]][:count]  # positions in ids
    figure = save_grid(
        ctx.stage_dir("inpaint") / "inpaint_grid.png",
        {
            "image": [truth[ids[i]]["image"] for i in shown],
            "M_pre": [prelim.load("mask", ids[i]) for i in shown],
            "background B": [refined.load("background", ids[i]) for i in shown],
            "refined M": [masks[i] for i in shown],
            "truth": [truths[i] for i in shown],
        },
    )
    log_results(ctx, "inpaint", summary, {"inpaint_grid": figure})
    return summary


def object_removal(datamodule, truth: dict[str, dict], ids: list[str], refined, prelim, split: str) -> dict | None:
    """How often the inpainting removed the object (docs/METHOD.md, stage 3): the fraction of backgrounds B of
    the split that hold no object where the object was or where they were repainted (the truth mask united
    with up(M_pre)), judged by the shapes world's own rules (world/judge.py). A repainted shape, a leftover
    part of the object that M_pre missed, and an image whose M_pre is empty (nothing repainted) all count as
    not removed; other objects elsewhere in the image (distractors) are not judged. None for data whose truth
    cannot judge what an image shows (anything but the shapes world). "skipped": images of the split without
    a background (skipped in the stage, or without M_pre)."""
    from conceptdistill.world.datamodule import ShapesWorldDataModule
    from conceptdistill.world.judge import removal_rate

    if not isinstance(datamodule, ShapesWorldDataModule):
        return None
    regions = []
    for sid in ids:
        mask = truth[sid]["mask"]
        regions.append(mask | upsample_mask(prelim.load("mask", sid), mask.shape))
    backgrounds = (refined.load("background", sid) for sid in ids)
    return {**removal_rate(list(backgrounds), regions, datamodule.world, skipped=len(truth) - len(ids)), "split": split}
