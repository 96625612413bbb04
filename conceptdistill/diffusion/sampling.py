"""Sampling and inpainting loops over a `DiffusionParts` set, with diffusers' DDIM scheduler.

We drive the UNet ourselves instead of calling StableDiffusionPipeline because the method needs things the
stock pipelines do not offer together: per-sample noise streams (results independent of batch size and
device count), latent blending with a re-noised known region at every step, concept-distillation guidance
(the background prompt as the unconditional branch), and the optional 9-channel inpainting input.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from diffusers import DDIMScheduler
from diffusers.utils.torch_utils import randn_tensor

from conceptdistill.checks import SettingsError, check_grid_range

if TYPE_CHECKING:
    from conceptdistill.diffusion.parts import DiffusionParts


def ddim_scheduler(parts: DiffusionParts, steps: int, setting: str = "num_steps") -> DDIMScheduler:
    """A DDIM scheduler (eta 0) with the model's own noise schedule, prediction type (epsilon or v) and
    clipping settings, whatever scheduler class the model folder names.

    Raises:
        SettingsError: naming `setting` when the grid does not fit the model's timesteps.
    """
    total = int(parts.scheduler.config.num_train_timesteps)
    if not 1 <= int(steps) <= total:
        raise SettingsError(f"{setting}={steps}: a sampler grid needs 1 to {total} steps (the model's training timesteps)")
    scheduler = DDIMScheduler.from_config(parts.scheduler.config)
    scheduler.set_timesteps(steps, device=parts.device)
    check_grid_range(scheduler.timesteps, total, setting)
    return scheduler


def predict_noise(
    parts, latents: torch.Tensor, timestep: torch.Tensor | int, text: torch.Tensor,
    uncond_text: torch.Tensor | None = None, guidance_scale: float = 1.0, extra_input: torch.Tensor | None = None,
) -> torch.Tensor:
    """The UNet's output (epsilon or v, as the model was trained), with classifier-free guidance when
    `uncond_text` is given and scale != 1 (guidance is linear, so it applies to either parametrisation).

    `extra_input` (mask + masked-image latent) is concatenated on the channel axis for 9-channel UNets.
    """
    model_input = latents if extra_input is None else torch.cat([latents, extra_input], dim=1)
    if uncond_text is None or guidance_scale == 1.0:
        return parts.unet(model_input, timestep, encoder_hidden_states=text).sample
    both = parts.unet(
        torch.cat([model_input, model_input]), timestep, encoder_hidden_states=torch.cat([uncond_text, text])
    ).sample
    uncond, cond = both.chunk(2)
    return uncond + guidance_scale * (cond - uncond)


@torch.no_grad()
def sample_latents(
    parts, prompts: list[str], generators: list[torch.Generator], *, steps: int = 50, guidance_scale: float = 1.0,
    negative_prompt: str = "", latent_shape: tuple[int, int, int],
) -> torch.Tensor:
    """Text-to-image sampling; returns clean latents (B, *latent_shape). `negative_prompt` is the unconditional
    branch (the paper's concept-distillation guidance uses the background prompt here). `latent_shape` is
    (C, h, w), e.g. `parts.latent_shape_for(image_size)`: any size the VAE accepts, not only the native one."""
    shape = tuple(latent_shape)
    scheduler = ddim_scheduler(parts, steps)
    latents = randn_tensor((len(generators), *shape), generator=generators, device=parts.device, dtype=parts.dtype)
    latents = latents * scheduler.init_noise_sigma
    text = parts.encode_prompts(prompts)
    uncond = parts.encode_prompts([negative_prompt] * len(prompts)) if guidance_scale != 1.0 else None
    extra = _text_to_image_extra_input(parts, latents)
    for index, t in enumerate(scheduler.timesteps):
        noise = predict_noise(parts, scheduler.scale_model_input(latents, t), t, text, uncond, guidance_scale, extra)
        latents = _denoise(scheduler, noise, t, latents, last=index + 1 == len(scheduler.timesteps))
    return latents


@torch.no_grad()
def inpaint_latents(
    parts, known_latents: torch.Tensor, unknown_mask: torch.Tensor, prompts: list[str],
    generators: list[torch.Generator], *, steps: int = 50, guidance_scale: float = 1.0, negative_prompt: str = "",
) -> torch.Tensor:
    """Repaint the region `unknown_mask` (B, 1, h, w; 1 = repaint) of `known_latents` (B, C, h, w).

    Latent blending: after every DDIM step the known region is replaced by the clean latent noised to the
    step's level, so the model only invents the unknown region. A 9-channel UNet also receives the mask and
    the masked latent as input, as diffusers' inpainting models do.
    """
    scheduler = ddim_scheduler(parts, steps)
    mask = unknown_mask.to(device=parts.device, dtype=parts.dtype)
    known_latents = known_latents.to(device=parts.device, dtype=parts.dtype)
    shape = tuple(known_latents.shape[1:])
    latents = randn_tensor((len(generators), *shape), generator=generators, device=parts.device, dtype=parts.dtype) * scheduler.init_noise_sigma
    text = parts.encode_prompts(prompts)
    uncond = parts.encode_prompts([negative_prompt] * len(prompts)) if guidance_scale != 1.0 else None
    extra = torch.cat([mask, known_latents * (1 - mask)], dim=1) if parts.unet_in_channels > shape[0] else None
    timesteps = scheduler.timesteps
    for index, t in enumerate(timesteps):
        noise = predict_noise(parts, scheduler.scale_model_input(latents, t), t, text, uncond, guidance_scale, extra)
        latents = _denoise(scheduler, noise, t, latents, last=index + 1 == len(timesteps))
        if index + 1 < len(timesteps):
            fresh = randn_tensor((len(generators), *shape), generator=generators, device=parts.device, dtype=parts.dtype)
            known = scheduler.add_noise(known_latents, fresh, timesteps[index + 1 : index + 2])
        else:
            known = known_latents
        latents = mask * latents + (1 - mask) * known
    return latents


def _denoise(scheduler: DDIMScheduler, noise: torch.Tensor, t, latents: torch.Tensor, *, last: bool) -> torch.Tensor:
    """One DDIM step (the scheduler converts an epsilon or v output itself); the last step returns the
    predicted clean latent. (A schedule whose final alpha is
    below one would otherwise leave a little noise in every sample, and in every inpainted region.)"""
    output = scheduler.step(noise, t, latents)
    return output.pred_original_sample if last else output.prev_sample


def _text_to_image_extra_input(parts: DiffusionParts, latents: torch.Tensor) -> torch.Tensor | None:
    """For a 9-channel UNet, plain sampling means 'repaint everything': mask of ones, empty masked latent."""
    if parts.unet_in_channels <= latents.shape[1]:
        return None
    ones = torch.ones_like(latents[:, :1])
    return torch.cat([ones, torch.zeros_like(latents)], dim=1)
