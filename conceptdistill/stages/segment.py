"""Stage "segment": train a segmentation U-Net on label-free masks and score it (docs/METHOD.md, stage 4).

One model per mask source, each trained for the same fixed budget with no tuning, as the paper does:
`preliminary` (D, M_pre), `refined` (D, M), `refined+synthetic` (D, M) u D'_s, and `truth` (the supervised
upper bound, where the data set has masks). The segmenter is modules/segmenter.py (config `segment.module`);
each is scored on the test split with pixels pooled over the split (accuracy, foreground IoU, mIoU at the
threshold) and the per-image mean IoU beside them; on box-scored data sets also by both box protocols
(`iou_mask_vs_box` = the pooled IoU against the rasterised boxes, `iou_box`: docs/METHOD.md, "Scoring").
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from hydra.utils import instantiate
from torch.utils.data import ConcatDataset, Dataset

from conceptdistill.checks import MASK_SOURCES
from conceptdistill.data.geometry import union_pixel_box
from conceptdistill.data.masked import MaskedImages
from conceptdistill.data.stream import step_loader
from conceptdistill.evaluation import log_results
from conceptdistill.figures import save_grid
from conceptdistill.metrics import mean_box_iou
from conceptdistill.modules.segmenter import SegmentationModel
from conceptdistill.pipeline.artifacts import SampleIds, with_output
from conceptdistill.pipeline.config import refined_mask_name
from conceptdistill.pipeline.context import RunContext, finish_loggers
from conceptdistill.pipeline.registry import TRAINING_HARDWARE, register_stage
from conceptdistill.utils.checkpoints import (
    TrainingClock,
    drop_resume_checkpoint,
    resumable_checkpoints,
    resume_checkpoint,
    resumed_seconds,
)
from conceptdistill.utils.io import read_json, write_json
from conceptdistill.utils.seeding import sample_seed

log = logging.getLogger(__name__)

SOURCES = MASK_SOURCES
#: each source's row in the results table, with its label (M: the refined masks' name, see segment_rows)
ROWS = {"unet_preliminary": "U-Net on (D, M_pre)", "unet_refined": "U-Net on (D, M)",
        "unet_refined_synthetic": "U-Net on (D, M) u D'_s", "unet_truth": "supervised U-Net (upper bound)"}
ROW_NAMES = dict(zip(SOURCES, ROWS, strict=True))


def segment_rows(cfg) -> dict[str, str]:
    """ROWS, with M renamed M_crop when the refined masks (and the synthetic set's) come from the baseline."""
    name = refined_mask_name(cfg)
    return {key: label.replace("(D, M)", f"(D, {name})") for key, label in ROWS.items()}


def training_set(ctx: RunContext, source: str) -> Dataset:
    """The (image, mask) pairs of one mask source, resized (and augmented) for the segmenter.

    Raises:
        ValueError: for an unknown source, or `truth` on a data set without ground-truth masks.
    """
    seg = ctx.cfg.segment
    train = ctx.datamodule.dataset("train")
    options = {"size": seg.image_size, "augment": seg.augment}
    # Only images whose masks exist: one skipped upstream (a non-finite latent, say) has none.
    if source == "preliminary":
        store = ctx.layout.mask_store("train")
        return MaskedImages(with_output(train, store, "mask"), store, **options)
    if source in ("refined", "refined+synthetic"):
        store = ctx.layout.inpaint_store("train")
        refined = MaskedImages(with_output(train, store, "mask"), store, **options)
        if source == "refined":
            return refined
        synthetic = ctx.layout.synthetic_store()
        return ConcatDataset([refined, MaskedImages(SampleIds(synthetic.ids("mask")), synthetic, image_store=synthetic,
                                                    **options)])
    if source == "truth":
        if ctx.datamodule.truth != "mask":
            raise ValueError("segment source 'truth' needs a data set with ground-truth masks")
        return MaskedImages(train, None, **options)
    raise ValueError(f"unknown segment source {source!r}; choose from {SOURCES}")


def segment_inputs(cfg) -> tuple[str, ...]:
    """The stages whose masks the configured sources read (masks also for the evaluation split)."""
    needed = {"masks"}
    for source in cfg.segment.sources:
        needed |= {"refined": {"inpaint"}, "refined+synthetic": {"inpaint", "synthesize"}}.get(source, set())
    return tuple(stage for stage in ("masks", "inpaint", "synthesize") if stage in needed)


def train_segmenter(ctx: RunContext, source: str) -> tuple[SegmentationModel, float]:
    """Train (or resume, or load when finished) the segmenter of one mask source; also the seconds earlier,
    killed runs of the stage trained it (all of its training when one of them finished it; 0.0 when none)."""
    seg = ctx.cfg.segment
    source_dir = ctx.layout.segmenter_dir(source)
    final = ctx.layout.segmenter_checkpoint(source)
    record = final.with_name("training.json")  # its training seconds: final.ckpt holds weights only
    if final.exists():  # finished by a run of this stage that was killed later (a finished stage is not rerun)
        trained = float(read_json(record)["seconds"]) if record.exists() else 0.0
        return SegmentationModel.load_from_checkpoint(final), trained
    # Initial weights from (seed, source) alone, never from what ran earlier in the process.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(sample_seed(ctx.cfg.seed, source, "segment-init"))
        # the training size travels with the weights: a checkpoint alone says how to prepare new images
        model = instantiate(seg.module, image_size=int(seg.image_size), _convert_="all")
    checkpoints = resumable_checkpoints(source_dir, seg.checkpoint_every)
    clock = TrainingClock()
    trainer = ctx.trainer(f"segment-{source}", max_steps=seg.max_steps, callbacks=[checkpoints, clock],
                          log_every_n_steps=20, default_root_dir=str(source_dir))
    last = source_dir / "last.ckpt"
    resume = resume_checkpoint(last, f"segment-{source}")
    loader = step_loader(ctx.datamodule, training_set(ctx, source), batch_size=seg.batch_size,
                         seed=ctx.cfg.seed, salt=f"segment-{source}", start_step=resume.step,
                         trainer=trainer)
    trainer.fit(model, loader, ckpt_path=resume.ckpt_path)
    # the record first: a final.ckpt (what marks the source finished) never stands without it
    write_json(record, {"seconds": round(clock.total(), 2), "steps": int(trainer.global_step)})
    trainer.save_checkpoint(final, weights_only=True)  # the result: weights and hyper-parameters, no optimizer
    drop_resume_checkpoint(last)
    finish_loggers()  # one logger run per mask source
    return model, clock.earlier


@register_stage(
    "segment", inputs=segment_inputs,
    settings=("seed", "data", "segment", *TRAINING_HARDWARE),
    rows=segment_rows, figures={"segment_grid.png": "segment_grid.png"},
)
def run_segment(ctx: RunContext) -> dict:
    seg = ctx.cfg.segment
    test = MaskedImages(ctx.datamodule.dataset("test"), None, size=seg.image_size, augment=False) \
        if ctx.datamodule.truth else None
    rows, figure_columns, earlier = {}, {}, 0.0
    for source in seg.sources:
        if source == "truth" and ctx.datamodule.truth != "mask":
            log.info("segment: no ground-truth masks, skipping the supervised upper bound")
            continue
        model, seconds_before_resume = train_segmenter(ctx, source)
        earlier += seconds_before_resume
        if test is not None:
            tester = ctx.trainer(f"segment-{source}", logger=False, default_root_dir=str(ctx.layout.segmenter_dir(source)))
            scores = tester.test(model, ctx.datamodule.loader(test, batch_size=seg.batch_size), verbose=False)[0]
            rows[ROW_NAMES[source]] = {k.removeprefix("test/"): float(v) for k, v in scores.items()}
            if ctx.datamodule.truth == "box":
                row = rows[ROW_NAMES[source]]
                row["iou_mask_vs_box"] = row["iou"]
                row["iou_box"] = box_iou_of(model, ctx.datamodule.loader(test, batch_size=seg.batch_size))
            figure_columns[source] = _predictions(model, test, seg.figure_samples)
    summary = {"rows": rows, **resumed_seconds(earlier)}
    figures = {}
    if figure_columns:
        samples = [test[i] for i in range(min(seg.figure_samples, len(test)))]
        figures["segment_grid"] = save_grid(
            ctx.stage_dir("segment") / "segment_grid.png",
            {"image": [s["image"].numpy() for s in samples], **figure_columns, "truth": [s["mask"].numpy() for s in samples]},
        )
    log_results(ctx, "segment", summary, figures)
    return summary


@torch.no_grad()
def _predictions(model: SegmentationModel, dataset: Dataset, count: int) -> list[np.ndarray]:
    model.eval()
    images = torch.stack([dataset[i]["image"] for i in range(min(count, len(dataset)))])
    return list((model.cpu()(images) > model.hparams.threshold).numpy())


@torch.no_grad()
def box_iou_of(model: SegmentationModel, loader) -> float:
    """The box protocol's `iou_box` of a segmenter on a box-scored test set (metrics.mean_box_iou): the box
    around each thresholded prediction against the union box of the sample's truth "boxes" (carried by
    MaskedImages at the segmenter's size), averaged over images; a fraction in [0, 1].

    The segmenter's own test step scores masks only, so this is one more pass over the test set, in float32 on
    the device the model is on. Every process of a multi-GPU run scores the whole set, so all agree.
    """
    model.eval()
    device = next(model.parameters()).device
    ious, images = 0.0, 0
    for batch in loader:
        masks = (model(batch["image"].to(device)) > model.hparams.threshold).cpu().numpy()
        boxes = [union_pixel_box(*mask.shape, image_boxes) for mask, image_boxes in zip(masks, batch["boxes"], strict=True)]
        ious += mean_box_iou(list(masks), boxes) * len(masks)
        images += len(masks)
    return ious / images
