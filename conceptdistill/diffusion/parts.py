"""`DiffusionParts`: the five parts of a latent diffusion model (UNet, VAE, text encoder, tokenizer, noise
scheduler) with the conversions every stage needs (pixels <-> scaled latents, prompts -> text embeddings, the
forward noising process and the training target). Loaded and saved by diffusion/loading.py."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class DiffusionParts:
    """The five parts of a latent text-to-image diffusion model, plus the conversions all stages share.

    The helpers run without gradient tracking: the VAE and text encoder are frozen in every stage of the method
    (only the UNet is fine-tuned), and not storing their activations keeps training memory down.
    """

    unet: Any  # diffusers.UNet2DConditionModel
    vae: Any  # diffusers.AutoencoderKL or SpaceToDepthAutoencoder
    text_encoder: Any  # transformers.CLIPTextModel
    tokenizer: Any  # transformers.CLIPTokenizer
    scheduler: Any  # a diffusers scheduler

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def latent_scale(self) -> float:
        """Multiplier applied to VAE latents before they enter the UNet (0.18215 for SD 1.x)."""
        return float(self.vae.config.scaling_factor)

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell along each side (8 for SD), computed as diffusers pipelines do."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def unet_in_channels(self) -> int:
        """UNet input channels: latent_channels, or more for an inpainting UNet (latent + mask + masked latent)."""
        return int(self.unet.config.in_channels)

    @property
    def native_image_size(self) -> int:
        """The image side the UNet was configured for (unet.config.sample_size x vae_scale_factor; 512 for SD 1.x,
        768 for SD 2.1-v). Informational only: every stage derives its shapes from the actual latents, so any
        image size the VAE accepts works."""
        size = self.unet.config.sample_size
        return int(size if isinstance(size, int) else size[0]) * self.vae_scale_factor

    def latent_shape_for(self, image_size: int) -> tuple[int, int, int]:
        """(C, H, W) of the latent of a square `image_size` image (4x64x64 for SD 1.x at 512 px).

        Raises:
            ValueError: naming `data.image_size` when it is not a multiple of the VAE's downsampling factor.
        """
        check_image_size(self, image_size)
        side = int(image_size) // self.vae_scale_factor
        return (self.latent_channels, side, side)

    # ----- the forward (noising) process and the training target --------------------------------
    @property
    def prediction_type(self) -> str:
        """What the UNet predicts: "epsilon" or "v_prediction" (checked when the model is loaded)."""
        return str(self.scheduler.config.get("prediction_type", "epsilon"))

    @property
    def noise_scheduler(self):
        """The model's variance-preserving forward process as a diffusers `DDPMScheduler` built from the
        folder's scheduler config (betas, timestep count, prediction type).

        Folders ship PNDM, DDIM, Euler, LMS or DPM-Solver configs; they share the training noise schedule but
        not `add_noise`: Euler-family schedulers noise as x0 + sigma * eps and expect `scale_model_input`
        before the UNet. Noising for attention capture and for the training loss must be the process the UNet
        was trained on, x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps (DDPM, Ho et al. 2020),
        whatever class the folder names, so it always goes through this scheduler.
        """
        cached = self.__dict__.get("_noise_scheduler")
        if cached is None or cached[0] is not self.scheduler:
            from diffusers import DDPMScheduler

            cached = (self.scheduler, DDPMScheduler.from_config(self.scheduler.config))
            self.__dict__["_noise_scheduler"] = cached
        return cached[1]

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_t of the forward process for clean latents (B, C, h, w), standard normal noise of the same shape
        and integer timesteps (B,) in [0, num_train_timesteps); same dtype and device as `latents`."""
        return self.noise_scheduler.add_noise(latents, noise, timesteps.to(latents.device))

    def training_target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the UNet output is regressed on: the noise (epsilon prediction) or the velocity
        v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x0 (v-prediction, Salimans & Ho 2022), by diffusers'
        `get_velocity`. Shapes as in `add_noise`."""
        if self.prediction_type == "epsilon":
            return noise
        return self.noise_scheduler.get_velocity(latents, noise, timesteps.to(latents.device))

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> DiffusionParts:
        """Move (and optionally cast) the three networks in place; returns self for chaining."""
        # Only pass what is given: diffusers' ModelMixin.to warns whenever a dtype keyword is present.
        kwargs = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
        for module in (self.unet, self.vae, self.text_encoder):
            module.to(**kwargs)
        return self

    @torch.no_grad()
    def encode_images(
        self, images: torch.Tensor, *, sample: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """(B, 3, H, W) images in [0, 1] -> scaled latents (B, C, H/f, W/f) on the UNet's device and dtype.

        Uses the posterior mean unless ``sample=True`` (which draws from it, as SD's training scripts do).
        """
        x = images.to(device=self.vae.device, dtype=self.vae.dtype) * 2.0 - 1.0
        dist = self.vae.encode(x).latent_dist
        latents = dist.sample(generator=generator) if sample else dist.mode()
        return (latents * self.latent_scale).to(device=self.device, dtype=self.dtype)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> (B, 3, H, W) float32 images in [0, 1]."""
        z = latents.to(device=self.vae.device, dtype=self.vae.dtype) / self.latent_scale
        images = self.vae.decode(z).sample
        return ((images.float() + 1.0) / 2.0).clamp(0.0, 1.0)

    def tokenize(self, prompts: list[str] | str) -> torch.Tensor:
        """Token ids (B, model_max_length), padded and truncated as Stable Diffusion does."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        return self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids

    def encode_prompts(self, prompts: list[str] | str, *, grad: bool = False) -> torch.Tensor:
        """Prompts -> text embeddings (B, L, D): the text encoder's last hidden state, the UNet's context.

        Without gradients unless `grad` (only the shapes world's own model trains its text encoder).
        """
        ids = self.tokenize(prompts).to(self.text_encoder.device)
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            embeddings = self.text_encoder(ids)[0]
        return embeddings.to(device=self.device, dtype=self.dtype)


def register_parts(module: torch.nn.Module, parts: DiffusionParts) -> None:
    """Make the parts' networks submodules of a LightningModule, so that Lightning moves them to its device
    (each DDP rank to its own GPU) and `parts.device` follows."""
    module.unet = parts.unet
    module.vae = parts.vae
    module.text_encoder = parts.text_encoder


def check_image_size(parts: DiffusionParts, image_size: int) -> None:
    """Raise ValueError naming `data.image_size` unless the VAE maps it to a whole latent grid."""
    factor = parts.vae_scale_factor
    if int(image_size) <= 0 or int(image_size) % factor:
        raise ValueError(
            f"data.image_size={image_size} is not a positive multiple of this model's VAE downsampling factor "
            f"{factor}: choose e.g. {max(factor, round(int(image_size) / factor) * factor)} (the model's native "
            f"size is {parts.native_image_size})"
        )
