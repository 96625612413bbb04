"""Stage "world": train the shapes world's own text-to-image diffusion model from random weights.

The stand-in for Stable Diffusion, trained by the text-to-image trainer (modules/text_to_image.py, config
`world.module`: every UNet weight and the text encoder, each image's own caption, caption dropout for
classifier-free guidance, an EMA of the UNet weights). The result is saved as a diffusers-layout folder (`world/pipeline`) that the ordinary
loader reads; later stages of the same run use it. `make world-model` copies it into the package, which
is how the committed model was made. Its prompt fidelity is measured with a classifier on true labels
(conceptdistill.world.fidelity) and recorded in the folder's training.json. `world.max_steps=0` with
`world.init_from` measures an existing model again without training it, keeping its training record.
"""

from __future__ import annotations

import datetime
import json
import logging
import shutil
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate

from conceptdistill.data.stream import step_loader
from conceptdistill.evaluation import log_results
from conceptdistill.figures import save_grid
from conceptdistill.pipeline.context import RunContext, command_line
from conceptdistill.pipeline.registry import TRAINING_HARDWARE, register_stage
from conceptdistill.utils.checkpoints import (
    TrainingClock,
    drop_resume_checkpoint,
    resumable_checkpoints,
    resume_checkpoint,
)
from conceptdistill.utils.io import write_json
from conceptdistill.world.datamodule import ShapesWorldDataModule

log = logging.getLogger(__name__)
#: what a fidelity measurement writes into training.json (redone when a model is measured again)
FIDELITY_KEYS = ("prompt_fidelity", "shape_fidelity", "colour_fidelity", "background_fidelity", "word_fidelity",
                 "classifier_accuracy", "fidelity_settings")


@register_stage("world", settings=("seed", "data", "world", "diffusion.batch_size", *TRAINING_HARDWARE),
                figures={"world_samples.png": "samples_grid.png"})
def run_world(ctx: RunContext) -> dict:
    from conceptdistill.diffusion.loading import save_diffusion_parts
    from conceptdistill.world.fidelity import draw_fidelity_samples, fidelity_scores, train_classifier
    from conceptdistill.world.model import build_world_parts

    cfg, world_cfg = ctx.cfg, ctx.cfg.world
    datamodule = ctx.datamodule
    if not isinstance(datamodule, ShapesWorldDataModule):
        raise RuntimeError("stage world trains the shapes world's model; it needs data=shapes (the shapes world)")
    folder = ctx.stage_dir("world")
    shapes, colours = list(datamodule.world.shapes), list(datamodule.world.colours)
    arch = world_cfg.architecture
    # max_steps 0: measure an existing model; it keeps its weights and the record of how it was trained.
    measure_only = world_cfg.max_steps <= 0
    if measure_only and not world_cfg.get("init_from"):
        raise ValueError("world.max_steps=0 measures an existing model without training it: set world.init_from too")
    source = None
    if world_cfg.get("init_from"):
        # Continue training (or measure) an existing world model, with its own architecture and vocabulary,
        # e.g. the packaged one on a machine with more compute; the optimizer state starts fresh.
        from conceptdistill.diffusion.loading import load_diffusion_parts
        from conceptdistill.diffusion.registry import PACKAGED_WORLD_MODEL

        source = PACKAGED_WORLD_MODEL if world_cfg.init_from == "packaged" else world_cfg.init_from
        parts = load_diffusion_parts(str(source))
    else:
        parts = build_world_parts(
            folder / "build", shapes=shapes, colours=colours, image_size=datamodule.image_size,
            block_out_channels=tuple(arch.block_out_channels), layers_per_block=arch.layers_per_block,
            attention_heads=arch.attention_heads, text_dim=arch.text_dim, text_layers=arch.text_layers, seed=cfg.seed,
        )
    training = _training_record(source) if measure_only else _train(ctx, parts, folder)
    parts.denoiser.eval(), parts.text_encoder.eval()

    fid = world_cfg.fidelity
    classifier, classifier_accuracy = train_classifier(
        datamodule, lambda **kw: ctx.trainer("world", logger=False, **kw), num_images=fid.classifier_images,
        epochs=fid.classifier_epochs, seed=cfg.seed,
    )
    drawn = draw_fidelity_samples(
        parts, classifier.to(parts.device), shapes=shapes, colours=colours, num_samples=fid.num_samples,
        num_background_samples=fid.num_background_samples, steps=fid.steps, guidance_scale=fid.guidance_scale,
        seed=cfg.seed, image_size=datamodule.image_size, batch_size=cfg.diffusion.batch_size,
    )
    # one column per prompt (the fidelity prompts cycle through every colour-shape pair), 8 samples each
    columns: dict[str, list] = {}
    for sample, prompt in zip(drawn["samples"].numpy(), drawn["prompts"], strict=True):
        column = columns.setdefault(prompt.removeprefix("a photo of a "), [])
        if len(column) < 8:
            column.append(sample)
    grid = save_grid(folder / "samples_grid.png", columns, cell=48)
    summary = {
        **training,
        **fidelity_scores(drawn["asked"], drawn["labels"]),
        "classifier_accuracy": classifier_accuracy,
        "fidelity_settings": {"steps": fid.steps, "guidance_scale": fid.guidance_scale, "samples": fid.num_samples,
                              "command": command_line(), "date": datetime.date.today().isoformat()},
        "parameters": {"unet": sum(p.numel() for p in parts.denoiser.parameters()),
                       "text_encoder": sum(p.numel() for p in parts.text_encoder.parameters())},
    }
    if measure_only:  # unchanged weights: copy the model's files as they are, byte for byte
        pipeline = ctx.layout.world_model()
        shutil.rmtree(pipeline, ignore_errors=True)
        shutil.copytree(source, pipeline)
    else:
        pipeline = save_diffusion_parts(parts, ctx.layout.world_model(), overwrite=True)
    write_json(pipeline / "training.json", summary)
    drop_resume_checkpoint(ctx.layout.checkpoints("world") / "last.ckpt")
    log_results(ctx, "world", summary, {"world_samples": grid})
    return summary


def _plain(node):
    from omegaconf import OmegaConf

    return OmegaConf.to_container(node, resolve=True)


def _train(ctx: RunContext, parts, folder) -> dict:
    """Train `parts` in place (text encoder and UNet; EMA weights applied at the end, parts left on the
    training device); returns what the training record keeps."""
    cfg, world_cfg = ctx.cfg, ctx.cfg.world
    module = instantiate(world_cfg.module, _convert_="all")(parts)
    pl.seed_everything(cfg.seed, workers=True)  # the data order too, so a rerun trains the same model
    images = ctx.datamodule.caption_dataset(world_cfg.num_images)
    checkpoints = resumable_checkpoints(ctx.layout.checkpoints("world"), world_cfg.checkpoint_every)
    clock = TrainingClock()
    trainer = ctx.trainer(
        "world", max_steps=world_cfg.max_steps, gradient_clip_val=world_cfg.gradient_clip_val, callbacks=[checkpoints, clock],
        log_every_n_steps=20, max_time=datetime.timedelta(minutes=world_cfg.max_minutes) if world_cfg.get("max_minutes") else None,
    )
    last = ctx.layout.checkpoints("world") / "last.ckpt"
    resume = resume_checkpoint(last, "world")
    loader = step_loader(ctx.datamodule, images, batch_size=world_cfg.batch_size, seed=cfg.seed, salt="world",
                         start_step=resume.step, trainer=trainer)
    started = time.perf_counter()
    trainer.fit(module, loader, ckpt_path=resume.ckpt_path)
    train_seconds = time.perf_counter() - started
    module.apply_ema()
    parts.to(trainer.strategy.root_device)
    return {
        "final_loss": float(trainer.callback_metrics.get("train/loss", torch.tensor(float("nan")))),
        "steps": int(trainer.global_step),
        "train_seconds": round(clock.earlier + train_seconds, 1),  # with the killed runs' part, when resumed
        **clock.summary(),
        "device": str(trainer.strategy.root_device),
        "command": command_line(),
        "seed": cfg.seed,
        "settings": _plain(world_cfg),
    }


def _training_record(model_folder) -> dict:
    """How an existing model was trained (its training.json), without the measurements that get redone."""
    path = Path(model_folder) / "training.json"
    if not path.exists():
        return {}
    record = json.loads(path.read_text())
    return {k: v for k, v in record.items() if k not in FIDELITY_KEYS}
