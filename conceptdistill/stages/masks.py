"""Stage "masks": preliminary masks M_pre from cross-attention (docs/METHOD.md, stage 1), with trainer.predict.

Runs the masker (modules/masker.py, config `masks.module`) over every image of the configured splits, writes
A and M_pre per image (pipeline/layout.py), and scores them where the data set has ground truth.
"""

from __future__ import annotations

from hydra.utils import instantiate
from omegaconf import OmegaConf

from conceptdistill.evaluation import evaluate_mask_stage, split_label
from conceptdistill.pipeline.artifacts import SampleWriter, pending, split_counts
from conceptdistill.pipeline.context import RunContext
from conceptdistill.pipeline.registry import PREDICTION_HARDWARE, register_stage

SETTINGS = ("seed", "concept", "prompts.foreground", "diffusion", "data", "splits", "masks", *PREDICTION_HARDWARE)


def masks_settings(cfg) -> tuple[str, ...]:
    """The stage's settings; ConceptAttention (masks.module.attention_space=output) also reads the background
    prompt, whose content words are the concepts the concept competes with. Cross-attention masks do not depend on
    it, so that changing it (for the fine-tuning) does not redo them."""
    reads_background = OmegaConf.select(cfg, "masks.module.attention_space") == "output"
    return (*SETTINGS, *(("prompts.background",) if reads_background else ()))


def masks_rows(cfg) -> dict[str, str]:
    return split_label(cfg, {"baseline_all_foreground": "baseline: all foreground",
                             "baseline_centre_box": "baseline: best centred square",
                             "preliminary_masks": "preliminary masks M_pre"})


@register_stage(
    "masks", uses_model=True, settings=masks_settings, rows=masks_rows,
    figures={"masks_grid.png": "masks_grid.png"},
)
def run_masks(ctx: RunContext) -> dict:
    cfg = ctx.cfg
    background = OmegaConf.select(cfg, "prompts.background")  # in the view only when the masker reads it
    module = instantiate(cfg.masks.module, _convert_="all")(ctx.load_parts(), background_prompt=background)
    summary: dict = {}
    for split in cfg.splits:
        store = ctx.layout.mask_store(split)
        todo = pending(ctx.datamodule.dataset(split), store)
        if len(todo):
            loader = ctx.datamodule.loader(todo, batch_size=cfg.masks.batch_size)
            trainer = ctx.trainer("masks", callbacks=[SampleWriter(store)], logger=False)
            trainer.predict(module, loader, return_predictions=False)
        summary[split] = split_counts(store)
    data_stats = ctx.datamodule.stats()  # real data: per split, images kept / skipped as unreadable / converted
    if data_stats:
        summary["data"] = data_stats
    summary.update(evaluate_mask_stage(ctx, module))
    return summary
