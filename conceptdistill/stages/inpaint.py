"""Stage "inpaint": remove the object, then refine the mask (docs/METHOD.md, stage 3), with trainer.predict.

Runs the inpainter (modules/inpainter.py, config `inpaint.module`) with the fine-tuned model over every image
that has an M_pre, writes its background B and refined mask M (pipeline/layout.py), and scores M; on the shapes
world it also judges how often B holds no object (`object_removal_rate`, evaluation.object_removal).
"""

from __future__ import annotations

from hydra.utils import instantiate

from conceptdistill.evaluation import evaluate_inpaint_stage
from conceptdistill.pipeline.artifacts import SampleWriter, WithArtifacts, pending, split_counts
from conceptdistill.pipeline.context import RunContext
from conceptdistill.pipeline.registry import PREDICTION_HARDWARE, register_stage


@register_stage(
    "inpaint", inputs=("finetune", "masks"), uses_model=True,
    settings=("seed", "prompts", "diffusion", "data", "splits", "inpaint", *PREDICTION_HARDWARE),
    rows={"refined_masks": "refined masks M"},
    scalars={"object_removal_rate": "object removal rate (backgrounds B that hold no object)"},
    figures={"inpaint_grid.png": "inpaint_grid.png"},
)
def run_inpaint(ctx: RunContext) -> dict:
    cfg = ctx.cfg
    module = instantiate(cfg.inpaint.module, _convert_="all")(ctx.load_parts(finetuned=True))
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
