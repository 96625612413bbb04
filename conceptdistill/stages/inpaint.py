"""Stage "inpaint": remove the object, then refine the mask (docs/METHOD.md, stage 3), with trainer.predict.

Runs the inpainter (modules/inpainter.py, config `inpaint.module`) with the fine-tuned model over every image
that has an M_pre, writes its background B and refined mask M (pipeline/layout.py), and scores M; on the shapes
world it also judges how often B holds no object (`object_removal_rate`, evaluation.object_removal).
"""

from __future__ import annotations

from hydra.utils import instantiate

from conceptdistill.evaluation import evaluate_inpaint_stage, split_label
from conceptdistill.pipeline.artifacts import SampleWriter, WithArtifacts, pending, split_counts
from conceptdistill.pipeline.config import inpainter_class, refined_mask_name
from conceptdistill.pipeline.context import RunContext
from conceptdistill.pipeline.registry import PREDICTION_HARDWARE, register_stage

SETTINGS = ("seed", "prompts", "diffusion", "data", "splits", "inpaint", *PREDICTION_HARDWARE)


def inpaint_inputs(cfg) -> tuple[str, ...]:
    """M_pre always; the fine-tuned weights when the inpainter repaints with them (not the M_crop baseline)."""
    return ("finetune", "masks") if inpainter_class(cfg).repaints_with_model else ("masks",)


def inpaint_settings(cfg) -> tuple[str, ...]:
    """Everything under `inpaint` for a repainting inpainter; for one that needs no model (M_crop) only the
    module keys it declares, so that the sampler's settings and the prompts do not redo it."""
    inpainter = inpainter_class(cfg)
    if inpainter.repaints_with_model:
        return SETTINGS
    own = inpainter.settings
    return (*(s for s in SETTINGS if s not in ("prompts", "inpaint")), "inpaint.batch_size",
            "inpaint.figure_samples", *(f"inpaint.module.{key}" for key in own))


def inpaint_rows(cfg) -> dict[str, str]:
    """The refined masks' row: M, or M_crop for the baseline (pipeline.config.refined_mask_name)."""
    name = refined_mask_name(cfg)
    return split_label(cfg, {"refined_masks": f"refined masks {name}" + (" (no inpainting model)" if name != "M" else "")})


@register_stage(
    "inpaint", inputs=inpaint_inputs, uses_model=True, settings=inpaint_settings, rows=inpaint_rows,
    scalars={"object_removal_rate": "object removal rate (backgrounds B that hold no object)"},
    figures={"inpaint_grid.png": "inpaint_grid.png"},
)
def run_inpaint(ctx: RunContext) -> dict:
    cfg = ctx.cfg
    parts = ctx.load_parts(finetuned=True) if inpainter_class(cfg).repaints_with_model else None
    module = instantiate(cfg.inpaint.module, _convert_="all")(parts)
    summary: dict = {}
    for split in cfg.splits:
        store = ctx.layout.inpaint_store(split)
        dataset = WithArtifacts(ctx.datamodule.dataset(split), {"prelim_mask": (ctx.layout.mask_store(split), "mask")})
        todo = pending(dataset, store)
        if len(todo):
            trainer = ctx.trainer("inpaint", callbacks=[SampleWriter(store)], logger=False)
            trainer.predict(module, ctx.datamodule.loader(todo, batch_size=cfg.inpaint.batch_size), return_predictions=False)
        summary[split] = split_counts(store, dataset.missing)
    summary.update(evaluate_inpaint_stage(ctx))
    return summary
