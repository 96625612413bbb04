"""A text-to-image diffusion trainer: the denoising loss of a `DiffusionParts` set (any family) on captioned images.

It trains the shapes world's own model from random weights (stage world: `full` adapter, text encoder too,
each image's caption, caption dropout, EMA), and it is the base of the concept-distillation fine-tuner
(modules/finetuner.py), which adds the background task. The loss is the diffusers training scripts' one:
noise the latent with the model's forward process, regress the denoiser's output on what the model predicts
(epsilon, v = `get_velocity`, or the flow velocity eps - x0 for SD3 and FLUX), mean squared error over the
latent pixels a loss mask selects.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytorch_lightning as pl
import torch
from diffusers.utils.torch_utils import randn_tensor

from conceptdistill.diffusion.adapters import NonFiniteLossError, add_adapter, save_finetuned
from conceptdistill.diffusion.parts import register_parts
from conceptdistill.utils.seeding import sample_generators, sample_seed

if TYPE_CHECKING:
    from conceptdistill.diffusion.parts import DiffusionParts


def masked_mse(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the masked latent pixels of each sample, averaged over samples.

    `prediction` and `target` are (B, C, h, w); `mask` is (B, 1, h, w) in {0, 1} and broadcasts over channels;
    a sample with an empty mask contributes zero. Computed in float32; returns a scalar.
    """
    squared = (prediction.float() - target.float()) ** 2 * mask
    per_sample = squared.flatten(1).sum(1) / (mask.flatten(1).sum(1) * prediction.shape[1]).clamp(min=1)
    return per_sample.mean()


class TextToImageTrainer(pl.LightningModule):
    """Trains the UNet (and optionally the text encoder) of a `DiffusionParts` set on captioned images.

    A batch is a dict with "image" (B, 3, H, W) float in [0, 1], "id" (B sample ids) and, with
    `use_batch_captions`, "caption" (B strings); otherwise every sample is captioned `prompt`. Randomness
    (noise, timestep, caption dropout) is drawn per sample from (seed, sample id, step), so results do not
    depend on batch composition or device count, and a resumed run continues exactly.
    """

    def __init__(
        self,
        parts: DiffusionParts,
        *,
        adapter: str = "lora",
        lora_rank: int = 4,
        lora_alpha: float = 4.0,
        lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0"),
        learning_rate: float = 1e-4,
        weight_decay: float = 1e-2,
        warmup_steps: int = 0,
        prompt: str = "",
        use_batch_captions: bool = False,
        caption_dropout: float = 0.0,
        train_text_encoder: bool = False,
        ema_decay: float | None = None,
        gradient_checkpointing: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["parts"])
        self.parts = parts
        register_parts(self, parts)
        self.vae.requires_grad_(False)
        self.text_encoders.requires_grad_(train_text_encoder)
        add_adapter(self.denoiser, adapter, rank=lora_rank, alpha=lora_alpha, targets=tuple(lora_targets), seed=seed)
        if gradient_checkpointing:  # diffusers' own: each block's activations are recomputed in the backward pass
            self.denoiser.enable_gradient_checkpointing()
        self.ema = None
        if ema_decay:
            from conceptdistill.modules.ema import ForeachEMA

            self.ema = ForeachEMA(self.denoiser.parameters(), decay=ema_decay)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        modules = [self.denoiser] + ([self.text_encoders] if self.hparams.train_text_encoder else [])
        return [p for module in modules for p in module.parameters() if p.requires_grad]

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = torch.optim.AdamW(self.trainable_parameters(), lr=hp.learning_rate, weight_decay=hp.weight_decay)
        if not hp.warmup_steps:
            return optimizer
        # Linear warm-up from lr/warmup_steps on the first step. diffusers' `get_scheduler("constant_with_warmup")`
        # starts at lr 0, which makes the first optimizer step a no-op; the recorded results use this schedule.
        warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / hp.warmup_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": warmup, "interval": "step"}}

    # ----- what each sample is trained on ---------------------------------------------------------------
    def sample_rng(self, sample_id: str) -> np.random.Generator:
        """The sample's generator at this step: reproducible, and exact after resuming from a checkpoint."""
        return np.random.default_rng(sample_seed(self.hparams.seed, f"{sample_id}@{self.global_step}", "finetune"))

    def plan_sample(self, batch: dict, index: int, rng: np.random.Generator, loss_mask: np.ndarray) -> str:
        """The caption of sample `index`; may fill its loss mask (1, h, w), which starts as all ones (the whole
        image is learnt). Here: its own caption or `prompt`, replaced by "" with probability `caption_dropout`
        (the unconditional branch classifier-free guidance needs)."""
        hp = self.hparams
        caption = batch["caption"][index] if hp.use_batch_captions else hp.prompt
        if hp.caption_dropout and rng.random() < hp.caption_dropout:
            caption = ""
        return caption

    def plan_batch(self, batch: dict, latent_size: tuple[int, int]) -> tuple[list[str], torch.Tensor]:
        """Per sample: the caption and the loss mask (B, 1, h, w) float32 on the latent grid `latent_size` = (h, w),
        which is also what a 9-channel UNet is told to repaint."""
        h, w = latent_size
        loss_masks = np.ones((len(batch["id"]), 1, h, w), dtype=np.float32)
        captions = [self.plan_sample(batch, i, self.sample_rng(sample_id), loss_masks[i])
                    for i, sample_id in enumerate(batch["id"])]
        return captions, torch.from_numpy(loss_masks).to(self.device)

    def training_step(self, batch: dict, batch_index: int) -> torch.Tensor:
        ids = batch["id"]
        with torch.no_grad():
            latents = self.parts.encode_images(batch["image"])
        captions, loss_mask = self.plan_batch(batch, tuple(latents.shape[-2:]))
        generators = sample_generators(self.hparams.seed, [f"{i}@{self.global_step}" for i in ids], "finetune-noise")
        noise = randn_tensor(tuple(latents.shape), generator=generators, device=self.device, dtype=latents.dtype)
        timesteps = self.parts.training_timesteps(generators)
        noisy = self.parts.add_noise(latents, noise, timesteps)  # the model's own forward process (VP or flow)
        cond = self.parts.encode_prompts(captions, grad=self.hparams.train_text_encoder)
        extra = None
        if self.parts.denoiser_in_channels > latents.shape[1]:
            # 9-channel input: what to repaint (the loss region) and the latent with that region blanked.
            extra = torch.cat([loss_mask, latents * (1 - loss_mask)], dim=1)
        prediction = self.parts.predict(noisy, timesteps, cond, extra)
        target = self.parts.training_target(latents, noise, timesteps)  # epsilon, v or flow velocity
        loss = masked_mse(prediction, target, loss_mask)
        if not torch.isfinite(loss):
            # Stop before the optimizer spreads NaN into every weight; the last checkpoint stays as it was.
            raise NonFiniteLossError(
                f"fine-tuning loss is {float(loss)} at step {self.global_step} for the batch {list(ids)}: stopping "
                "(the last good checkpoint is kept; check those images, the learning rate, or the precision)"
            )
        self.log_losses(prediction, target, loss_mask, captions)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(ids))
        return loss

    def log_losses(self, prediction, target, loss_mask, captions: list[str]) -> None:
        """Hook for losses of groups of samples (the fine-tuner logs its two tasks apart)."""

    # ----- EMA of the UNet weights --------------------------------------------------------------------
    def on_fit_start(self) -> None:
        if self.ema is not None:
            self.ema.to(self.device)  # the shadow weights live where the weights train

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        # Here rather than in on_train_batch_end: Lightning runs callbacks' on_train_batch_end (ModelCheckpoint's
        # save) before the module's, so a checkpoint would miss this step's EMA update; and with gradient
        # accumulation the EMA follows optimizer steps, not micro-batches.
        if self.ema is not None:
            self.ema.step(self.denoiser.parameters())

    # EMA weights are not parameters; carry them in the Lightning checkpoint so a resume is exact.
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.ema is not None:
            checkpoint["ema"] = self.ema.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.ema is not None and "ema" in checkpoint:
            self.ema.load_state_dict(checkpoint["ema"])

    def apply_ema(self) -> None:
        if self.ema is not None:
            self.ema.copy_to(self.denoiser.parameters())

    def export(self, folder: str | Path) -> Path:
        """Write the trained weights in the adapter's format (diffusion/adapters.py); returns the file or folder.

        Raises:
            NonFiniteLossError: when a weight holds NaN or inf.
        """
        return save_finetuned(self.parts, self.hparams.adapter, folder)
