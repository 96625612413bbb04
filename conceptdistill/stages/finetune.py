"""Stage "finetune": concept-distillation fine-tuning of the diffusion UNet (docs/METHOD.md, stage 2).

Trains the fine-tuner (modules/finetuner.py, config `finetune.module`) on the training images with their
M_pre, for `finetune.max_steps` steps, resumably (`finetune/checkpoints/last.ckpt`, removed once the stage
finishes), and exports the weights in the adapter's format (diffusion/adapters.py) to `finetune/weights`, where
later stages load them.
"""

from __future__ import annotations

import pytorch_lightning as pl
from hydra.utils import instantiate

from conceptdistill.data.base import collate_samples
from conceptdistill.data.stream import step_loader
from conceptdistill.modules.callbacks import LossHistory, SampleImagesCallback, loss_curve_summary
from conceptdistill.pipeline.artifacts import WithArtifacts
from conceptdistill.pipeline.context import RunContext
from conceptdistill.pipeline.registry import TRAINING_HARDWARE, register_stage
from conceptdistill.utils.checkpoints import (
    TrainingClock,
    drop_resume_checkpoint,
    resumable_checkpoints,
    resume_checkpoint,
)
from conceptdistill.utils.io import write_json


@register_stage(
    "finetune", inputs=("masks",), uses_model=True,
    settings=("seed", "prompts", "diffusion", "data", "finetune", *TRAINING_HARDWARE),
    figures={"finetune_samples.png": "samples/step_*.png"},
)
def run_finetune(ctx: RunContext) -> dict:
    cfg, ft = ctx.cfg, ctx.cfg.finetune
    folder = ctx.stage_dir("finetune")
    module = instantiate(ft.module, _convert_="all")(ctx.load_parts())
    pl.seed_everything(cfg.seed, workers=True)  # the data order too, so a rerun trains the same model
    dataset = WithArtifacts(ctx.datamodule.dataset("train"), {"prelim_mask": (ctx.layout.mask_store("train"), "mask")})
    examples = collate_samples([dataset[i] for i in range(min(ft.sample_count, len(dataset)))])
    history = LossHistory()
    checkpoints = ctx.layout.checkpoints("finetune")
    clock = TrainingClock()
    callbacks = [
        resumable_checkpoints(checkpoints, ft.checkpoint_every), clock,
        SampleImagesCallback(folder / "samples", examples, every=ft.sample_every, steps=ft.sample_steps, seed=cfg.seed),
        history,
    ]
    trainer = ctx.trainer("finetune", max_steps=ft.max_steps, gradient_clip_val=ft.gradient_clip_val,
                          callbacks=callbacks, log_every_n_steps=10)
    last = checkpoints / "last.ckpt"
    resume = resume_checkpoint(last, "finetune")
    # batches and augmentations follow the step, so a resumed run trains on what an uninterrupted one would
    loader = step_loader(ctx.datamodule, dataset, batch_size=ft.batch_size, seed=cfg.seed, salt="finetune",
                         start_step=resume.step, trainer=trainer)
    trainer.fit(module, loader, ckpt_path=resume.ckpt_path)
    trained = sum(p.numel() for p in module.trainable_parameters())  # before export merges an inpaint9 LoRA
    weights = module.export(ctx.layout.finetuned_weights())
    write_json(folder / "loss.json", {"step_loss": history.history})
    drop_resume_checkpoint(last)
    return {"adapter": module.hparams.adapter, "steps": int(trainer.global_step),
            "weights": str(weights.relative_to(ctx.run_dir)),
            "trainable_parameters": trained,
            **loss_curve_summary(history.history), **clock.summary()}
