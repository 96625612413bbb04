"""Stage "synthesize": a synthetic data set D'_s from the fine-tuned model (docs/METHOD.md, stage 3.3).

The generator (modules/synthesizer.py, config `synthesize.module`) draws each image, then runs the masker and
the inpainter on it, built from the same configs (`masks.module`, `inpaint.module`) the masks and inpaint
stages use. Every sample's randomness comes from (seed, sample id): the set is the same whatever the number
of devices or the batch size.
"""

from __future__ import annotations

from hydra.utils import instantiate

from conceptdistill.figures import save_grid
from conceptdistill.modules.synthesizer import SyntheticIds
from conceptdistill.pipeline.artifacts import SampleWriter, pending
from conceptdistill.pipeline.context import RunContext
from conceptdistill.pipeline.layout import SYNTHETIC_OUTPUTS
from conceptdistill.pipeline.registry import PREDICTION_HARDWARE, register_stage


def build_generator(cfg, parts):
    """The generator with its masker and inpainter, all on `parts` (the fine-tuned model)."""
    masker = instantiate(cfg.masks.module, _convert_="all")(parts, background_prompt=cfg.prompts.background)
    inpainter = instantiate(cfg.inpaint.module, _convert_="all")(parts)
    return instantiate(cfg.synthesize.module, _convert_="all")(parts, masker=masker, inpainter=inpainter)


@register_stage(
    "synthesize", inputs=("finetune",), uses_model=True,
    # it draws images, then runs the masks and inpaint logic on them: it reads those stages' settings too
    settings=("seed", "concept", "prompts", "diffusion", "data.image_size", "masks", "inpaint", "synthesize",
              *PREDICTION_HARDWARE),
    figures={"synthetic_grid.png": "synthetic_grid.png"},
)
def run_synthesize(ctx: RunContext) -> dict:
    syn = ctx.cfg.synthesize
    store = ctx.layout.synthetic_store()
    todo = pending(SyntheticIds(syn.num_samples), store)
    if len(todo):
        module = build_generator(ctx.cfg, ctx.load_parts(finetuned=True))
        trainer = ctx.trainer("synthesize", callbacks=[SampleWriter(store)], logger=False)
        trainer.predict(module, ctx.datamodule.loader(todo, batch_size=syn.batch_size), return_predictions=False)
    ids = store.ids("mask")[: syn.figure_samples]
    save_grid(ctx.stage_dir("synthesize") / "synthetic_grid.png",
              {name: [store.load(name, sid) for sid in ids] for name in SYNTHETIC_OUTPUTS})
    masks = [store.load("mask", sid) for sid in store.ids("mask")]
    skipped = store.skipped()
    return {"samples": len(masks), "skipped_in_stage": len(skipped), **({"skipped_ids": skipped} if skipped else {}),
            "mean_mask_fraction": float(sum(m.mean() for m in masks) / max(len(masks), 1)),
            "empty_masks": int(sum(not m.any() for m in masks))}
