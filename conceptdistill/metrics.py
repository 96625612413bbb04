"""Segmentation and attention-map metrics, scored the paper's way (pixels pooled over the whole set).

Conventions used throughout:
- a prediction is foreground where it is True (bool masks) or where probability > threshold (0.5);
- IoU of a class whose union is empty (neither prediction nor truth has it) is 1.0: perfect agreement;
- scores are fractions in [0, 1], not percentages.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any, TypedDict

import numpy as np
import torch
from scipy import ndimage
from sklearn.metrics import roc_auc_score
from torchmetrics import Metric

from conceptdistill.maskmath import centre_box_mask

logger = logging.getLogger(__name__)

__all__ = [
    "Counts",
    "SegmentationScores",
    "add_counts",
    "all_foreground_scores",
    "attention_auc",
    "best_centre_box_scores",
    "box_iou",
    "mean_box_iou",
    "mean_iou_per_image",
    "pooled_counts",
    "scores_from_counts",
    "tight_box",
]

ArrayLike = np.ndarray | torch.Tensor
Masks = ArrayLike | Sequence[ArrayLike]
#: a box on the pixel grid: (r0, c0, r1, c1), half-open rows r0..r1-1 and columns c0..c1-1; None is no box
PixelBox = tuple[int, int, int, int]


class Counts(TypedDict):
    """Pixel confusion counts (foreground is the positive class)."""

    tp: int
    fp: int
    fn: int
    tn: int


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _as_bool(x: Any) -> np.ndarray:
    """Bool view of a mask; integer masks must hold only 0/1. Floats are refused (threshold them first)."""
    array = _to_numpy(x)
    if array.dtype == bool:
        return array
    if np.issubdtype(array.dtype, np.integer):
        if array.size and (array.min() < 0 or array.max() > 1):
            raise ValueError("integer masks must contain only 0 and 1")
        return array.astype(bool)
    raise TypeError(f"expected a bool or 0/1 integer mask, got dtype {array.dtype}; threshold it first")


def _zip_images(values: Masks, truth: Masks, what: str) -> list[tuple[Any, Any]]:
    """Pair up per-image values and truths given as two arrays or two sequences of per-image arrays."""
    if isinstance(values, (list, tuple)) or isinstance(truth, (list, tuple)):
        if len(values) != len(truth):
            raise ValueError(f"{len(values)} {what} for {len(truth)} truths")
        return list(zip(values, truth, strict=True))
    return [(values, truth)]


def _pairs(pred: Masks, truth: Masks) -> list[tuple[np.ndarray, np.ndarray]]:
    """Pair up predictions and truths given as two arrays or two sequences of per-image arrays."""
    out = []
    for p, t in _zip_images(pred, truth, "predictions"):
        p, t = _as_bool(p), _as_bool(t)
        if p.shape != t.shape:
            raise ValueError(f"prediction shape {p.shape} != truth shape {t.shape}")
        out.append((p, t))
    return out


def _iou(hit: int, miss_a: int, miss_b: int) -> float:
    union = hit + miss_a + miss_b
    return 1.0 if union == 0 else hit / union


# --------------------------------------------------------------------------------------------------
# Pooled scores
# --------------------------------------------------------------------------------------------------


def pooled_counts(pred: Masks, truth: Masks) -> Counts:
    """tp/fp/fn/tn summed over all pixels of all images.

    Accepts bool (or 0/1 integer) numpy arrays or torch tensors: either one array pair of any shape
    (e.g. (N, H, W)) or two equal-length sequences of per-image arrays, whose sizes may differ.
    """
    tp = fp = fn = tn = 0
    for p, t in _pairs(pred, truth):
        tp += int(np.count_nonzero(p & t))
        fp += int(np.count_nonzero(p & ~t))
        fn += int(np.count_nonzero(~p & t))
        tn += int(np.count_nonzero(~p & ~t))
    return Counts(tp=tp, fp=fp, fn=fn, tn=tn)


def add_counts(a: Counts, b: Counts) -> Counts:
    """Sum of two count dicts, for accumulating over batches."""
    return Counts(tp=a["tp"] + b["tp"], fp=a["fp"] + b["fp"], fn=a["fn"] + b["fn"], tn=a["tn"] + b["tn"])


def scores_from_counts(counts: Counts) -> dict[str, float]:
    """acc, foreground iou, bg_iou and miou = mean(iou, bg_iou), as fractions.

    An empty union gives IoU 1.0 for that class. Raises ValueError when there are no pixels at all.
    """
    tp, fp, fn, tn = (int(counts[k]) for k in ("tp", "fp", "fn", "tn"))
    total = tp + fp + fn + tn
    if total == 0:
        raise ValueError("no pixels to score")
    iou = _iou(tp, fp, fn)
    bg_iou = _iou(tn, fp, fn)
    return {"acc": (tp + tn) / total, "iou": iou, "miou": (iou + bg_iou) / 2.0, "bg_iou": bg_iou}


def mean_iou_per_image(pred: Masks, truth: Masks) -> float:
    """Foreground IoU computed per image, then averaged (not the paper's pooling; for comparison).

    A 3-D array pair is read as (N, H, W); sequences as one entry per image.
    """
    ious = []
    for p, t in _pairs(pred, truth):
        images = zip(p, t, strict=True) if p.ndim == 3 else [(p, t)]
        for pi, ti in images:
            c = pooled_counts(pi, ti)
            ious.append(_iou(c["tp"], c["fp"], c["fn"]))
    if not ious:
        raise ValueError("no images to score")
    return float(np.mean(ious))


# --------------------------------------------------------------------------------------------------
# torchmetrics accumulator
# --------------------------------------------------------------------------------------------------


class SegmentationScores(Metric):
    """DDP-safe accumulator of pooled acc/iou/miou/bg_iou and of the per-image mean foreground IoU.

    update(preds, target): preds are bool masks or probabilities in [0, 1] (foreground where
    > threshold; logits are refused rather than silently squashed); target is a bool or 0/1 mask.
    Shapes: (H, W) is one image; otherwise the first axis is the batch, e.g. (N, H, W) or (N, 1, H, W).
    compute() returns tensors {acc, iou, miou, bg_iou, iou_per_image}.

    The counts are hand-written tensor sums: torchmetrics' samplewise `binary_stat_scores` (1.9) crashes
    for a batch of one image.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, threshold: float = 0.5, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.threshold = threshold
        for name in ("tp", "fp", "fn", "tn", "n_images"):
            self.add_state(name, default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("iou_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def _binarise(self, preds: torch.Tensor) -> torch.Tensor:
        if preds.dtype == torch.bool:
            return preds
        if preds.is_floating_point():
            if preds.numel() and (preds.min() < 0 or preds.max() > 1):
                raise ValueError("preds must be probabilities in [0, 1] (apply sigmoid to logits first)")
            return preds > self.threshold
        return preds != 0

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        preds, target = torch.as_tensor(preds), torch.as_tensor(target)
        if preds.shape != target.shape:
            raise ValueError(f"preds shape {tuple(preds.shape)} != target shape {tuple(target.shape)}")
        if preds.ndim == 2:
            preds, target = preds[None], target[None]
        pred = self._binarise(preds).reshape(preds.shape[0], -1)
        truth = target.to(torch.bool).reshape(target.shape[0], -1)

        tp = (pred & truth).sum(dim=1)
        fp = (pred & ~truth).sum(dim=1)
        fn = (~pred & truth).sum(dim=1)
        tn = (~pred & ~truth).sum(dim=1)
        union = tp + fp + fn
        iou = torch.where(union > 0, tp.double() / union.clamp(min=1).double(), torch.ones_like(union).double())

        self.tp += tp.sum()
        self.fp += fp.sum()
        self.fn += fn.sum()
        self.tn += tn.sum()
        self.iou_sum += iou.sum()
        self.n_images += pred.shape[0]

    def compute(self) -> dict[str, torch.Tensor]:
        counts = Counts(tp=int(self.tp), fp=int(self.fp), fn=int(self.fn), tn=int(self.tn))
        scores = scores_from_counts(counts)
        scores["iou_per_image"] = float(self.iou_sum) / max(int(self.n_images), 1)
        return {k: torch.tensor(v, dtype=torch.float64) for k, v in scores.items()}


# --------------------------------------------------------------------------------------------------
# Attention maps
# --------------------------------------------------------------------------------------------------


def attention_auc(maps: Masks, truths: Masks, *, max_pixels: int | None = 10_000_000, seed: int = 0) -> float:
    """Pixel AUC-ROC of float attention maps against bool truths, pixels pooled over all images.

    Maps are float (any dtype, any range) and must already have the truths' shape (the caller upsamples).
    Exact (sklearn's roc_auc_score, ties handled) up to `max_pixels` pooled pixels, about 6 s at 1e7 on one
    core; above that a deterministic uniform subsample of `max_pixels` pixels (seeded by `seed`) is scored.

    Returns:
        The AUC in [0, 1]; NaN, with a logged warning, when the scored truth pixels hold a single class (all
        background or all object) or none, where AUC is undefined. That is a property of the data split, not an error,
        and it must not crash a stage whose maps are already written.
    Raises:
        ValueError: non-finite map values (a fault upstream, not of the data), or a map and truth of different
            shapes.
    """
    scores, labels = [], []
    for m, t in _zip_images(maps, truths, "maps"):
        m, t = _to_numpy(m).astype(np.float64, copy=False), _as_bool(t)
        if m.shape != t.shape:
            raise ValueError(f"map shape {m.shape} != truth shape {t.shape}; upsample the map first")
        scores.append(m.ravel())
        labels.append(t.ravel())
    score, label = np.concatenate(scores), np.concatenate(labels)
    if not np.isfinite(score).all():
        raise ValueError("attention maps contain non-finite values")
    if max_pixels is not None and score.size > max_pixels:
        keep = np.random.default_rng(seed).choice(score.size, size=max_pixels, replace=False)
        score, label = score[keep], label[keep]
    # Checked after subsampling: the pixels actually scored are the ones that must hold both classes.
    if label.all() or not label.any():
        kind = "object" if label.size and label.all() else "background"
        logger.warning("attention AUC is undefined (all %d truth pixels are %s): reporting NaN", label.size, kind)
        return float("nan")
    return float(roc_auc_score(label, score))


# --------------------------------------------------------------------------------------------------
# Baselines and box-scored data sets
# --------------------------------------------------------------------------------------------------


def _truth_list(truths: Masks) -> list[np.ndarray]:
    if isinstance(truths, (list, tuple)):
        return [_as_bool(t) for t in truths]
    array = _as_bool(truths)
    return [array] if array.ndim == 2 else list(array)


def best_centre_box_scores(
    truths: Masks, fractions: Iterable[float] = np.linspace(0.1, 1.0, 19)
) -> tuple[dict[str, float], float]:
    """The "best centred square" baseline: pooled scores of `centre_box_mask` predictions, for the
    fraction with the highest pooled foreground IoU (the smallest such fraction on ties).

    `truths` is an (N, H, W) array or a sequence of (H, W) masks (sizes may differ).
    Returns (scores, best_fraction).
    """
    # Images of one size share every box, so summing their truths per pixel once makes each fraction
    # cost one box sum per size instead of one pass over all images.
    by_shape: dict[tuple[int, int], tuple[np.ndarray, int]] = {}
    for t in _truth_list(truths):
        if t.ndim != 2:
            raise ValueError(f"each truth must be (H, W), got {t.shape}")
        total, n = by_shape.get(t.shape, (np.zeros(t.shape, dtype=np.int64), 0))
        by_shape[t.shape] = (total + t, n + 1)
    if not by_shape:
        raise ValueError("no truths given")

    best: tuple[float, float, dict[str, float]] | None = None
    for fraction in fractions:
        tp = fp = fn = tn = 0
        for (h, w), (truth_sum, n) in by_shape.items():
            box = centre_box_mask(h, w, float(fraction))
            hit = int(truth_sum[box].sum())
            positives = int(truth_sum.sum())
            box_pixels = n * int(box.sum())
            tp += hit
            fp += box_pixels - hit
            fn += positives - hit
            tn += n * h * w - box_pixels - (positives - hit)
        scores = scores_from_counts(Counts(tp=tp, fp=fp, fn=fn, tn=tn))
        if best is None or scores["iou"] > best[0]:
            best = (scores["iou"], float(fraction), scores)
    if best is None:
        raise ValueError("fractions must not be empty")
    return best[2], best[1]


def all_foreground_scores(truths: Masks) -> dict[str, float]:
    """Pooled scores of predicting every pixel as foreground."""
    masks = _truth_list(truths)
    return scores_from_counts(pooled_counts([np.ones_like(t) for t in masks], masks))


# --------------------------------------------------------------------------------------------------
# Box protocol: the box around the predicted mask against the truth's box
# --------------------------------------------------------------------------------------------------


def tight_box(mask: ArrayLike) -> PixelBox | None:
    """The smallest pixel box holding every foreground pixel of a bool (or 0/1) (H, W) mask: (r0, c0, r1, c1),
    half-open, ints with 0 <= r0 < r1 <= H and 0 <= c0 < c1 <= W; None for an empty mask.

    All foreground counts, not only the largest connected component: the truth box it is compared with is the
    union box of all of an image's truth boxes (docs/METHOD.md, "Scoring", says why).
    Raises ValueError for a mask that is not 2-D, TypeError for a float mask (threshold it first).
    """
    array = _as_bool(mask)
    if array.ndim != 2:
        raise ValueError(f"expected an (H, W) mask, got shape {array.shape}")
    found = ndimage.find_objects(array.astype(np.int8))  # one label (1): one slice pair, or none when empty
    if not found:
        return None
    rows, cols = found[0]
    return (int(rows.start), int(cols.start), int(rows.stop), int(cols.stop))


def _box_area(box: PixelBox) -> int:
    r0, c0, r1, c1 = box
    if r1 < r0 or c1 < c0:
        raise ValueError(f"a pixel box needs r0 <= r1 and c0 <= c1, got {box}")
    return (r1 - r0) * (c1 - c0)


def box_iou(a: PixelBox | None, b: PixelBox | None) -> float:
    """IoU in [0, 1] of two pixel boxes (r0, c0, r1, c1) (half-open), by pixel counts: |a n b| / |a u b|.

    None (or a box of no pixels) is the empty box: two empty boxes give 1.0 (an empty union, the module's
    convention), one empty box 0.0. Raises ValueError for a box with r1 < r0 or c1 < c0.
    """
    area_a = 0 if a is None else _box_area(a)
    area_b = 0 if b is None else _box_area(b)
    if area_a == 0 or area_b == 0:
        return 1.0 if area_a == area_b == 0 else 0.0
    rows = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    cols = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = rows * cols
    return inter / (area_a + area_b - inter)


def mean_box_iou(preds: Masks, truth_boxes: Sequence[PixelBox | None]) -> float:
    """The box protocol's "iou_box": the mean over images of box_iou(tight_box(prediction), truth box).

    `preds`: a sequence of bool (H, W) masks, or an (N, H, W) array; `truth_boxes`: one pixel box (or None)
    per image, on the prediction's grid (for box-scored data sets, the union box of an image's truth boxes,
    rasterised as the truth masks are: data/geometry.py `union_pixel_box`). An empty prediction scores 0 against
    a truth box and 1 where the truth has no box. Unlike the pooled IoU, every image weighs the same, as in
    detection-style box scoring. Returns a fraction in [0, 1].
    Raises ValueError when the counts differ or there are no images.
    """
    masks = list(preds) if isinstance(preds, (list, tuple)) else list(_as_bool(preds).reshape(-1, *np.shape(preds)[-2:]))
    if len(masks) != len(truth_boxes):
        raise ValueError(f"{len(masks)} predictions for {len(truth_boxes)} truth boxes")
    if not masks:
        raise ValueError("no images to score")
    return float(np.mean([box_iou(tight_box(m), t) for m, t in zip(masks, truth_boxes, strict=True)]))
