"""Callbacks of the training stages: sample images during fine-tuning, and the loss curve."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch

from conceptdistill.utils.seeding import sample_generators


class SampleImagesCallback(pl.Callback):
    """Every `every` steps: object-prompt samples and background-prompt inpaintings of a few training
    images (their M_pre repainted), saved under the stage folder and sent to the logger as image panels."""

    def __init__(self, folder: Path, examples: dict, *, every: int, steps: int, seed: int) -> None:
        self.folder, self.examples, self.every, self.steps, self.seed = Path(folder), examples, every, steps, seed

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_index) -> None:
        step = trainer.global_step
        if self.every and step % self.every == 0 and trainer.is_global_zero:
            self.render(trainer, module, step)

    def on_train_end(self, trainer, module) -> None:
        if trainer.is_global_zero:
            self.render(trainer, module, trainer.global_step)

    @torch.no_grad()
    def render(self, trainer, module, step: int) -> Path:
        from conceptdistill.diffusion.sampling import inpaint_latents, sample_latents
        from conceptdistill.figures import save_grid

        parts, hp = module.parts, module.hparams
        ids = [f"sample-{i}" for i in range(len(self.examples["id"]))]
        was_training = module.training
        module.eval()
        images = self.examples["image"].to(parts.device)
        generated = parts.decode_latents(sample_latents(
            parts, [hp.foreground_prompt] * len(ids), sample_generators(self.seed, ids, "finetune-samples"),
            steps=self.steps, latent_shape=parts.latent_shape_for(images.shape[-1])))
        unknown = self.examples["prelim_mask"].to(parts.device, parts.dtype)[:, None]
        backgrounds = parts.decode_latents(inpaint_latents(
            parts, parts.encode_images(images), unknown, [hp.background_prompt] * len(ids),
            sample_generators(self.seed, ids, "finetune-inpaint"), steps=self.steps))
        module.train(was_training)
        path = save_grid(self.folder / f"step_{step:06d}.png", {
            "object prompt": list(generated.float().cpu().numpy()),
            "image": list(images.float().cpu().numpy()),
            "M_pre": list(self.examples["prelim_mask"].numpy()),
            "background prompt": list(backgrounds.float().cpu().numpy()),
        })
        logger = trainer.logger
        if logger is not None and hasattr(logger, "log_image"):
            logger.log_image(key="train/samples", images=[str(path)], step=step)
        return path


class LossHistory(pl.Callback):
    """Keeps (step, loss) pairs so the stage can record its loss curve."""

    def __init__(self) -> None:
        self.history: list[tuple[int, float]] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_index) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.history.append((trainer.global_step, float(loss)))

    # Carried in the checkpoint, so a resumed run's curve covers the steps before the interruption too.
    def state_dict(self) -> dict:
        return {"history": list(self.history)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = [tuple(pair) for pair in state_dict.get("history", [])]


def loss_curve_summary(history: list[tuple[int, float]]) -> dict:
    """Mean loss over the first and the last tenth of training: the curve should go down."""
    if not history:
        return {}
    losses = np.array([loss for _, loss in history])
    tenth = max(1, len(losses) // 10)
    return {"loss_first_tenth": float(losses[:tenth].mean()), "loss_last_tenth": float(losses[-tenth:].mean())}
