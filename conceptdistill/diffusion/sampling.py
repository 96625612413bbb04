"""Sampling and inpainting loops over a `DiffusionParts` set, with the family's own deterministic sampler
(DDIM for variance-preserving models, flow-matching Euler for SD3 and FLUX; `DiffusionParts.sampler`).

We drive the denoiser ourselves instead of calling the stock pipelines because the method needs things they
do not offer together: per-sample noise streams (results independent of batch size and device count), latent
blending with a re-noised known region at every step, concept-distillation guidance (the background prompt as
the unconditional branch), and the optional 9-channel inpainting input.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from diffusers.utils.torch_utils import randn_tensor

from conceptdistill.diffusion.parts import Conditioning, concat_conditioning

if TYPE_CHECKING:
    from conceptdistill.diffusion.parts import DiffusionParts


def predict_noise(
    parts: DiffusionParts, latents: torch.Tensor, timestep: torch.Tensor, cond: Conditioning,
    uncond: Conditioning | None = None, guidance_scale: float = 1.0, extra_input: torch.Tensor | None = None,
) -> torch.Tensor:
    """The denoiser's output (epsilon, v or flow velocity, as the model was trained), with classifier-free
    guidance when `uncond` is given and scale != 1 (guidance is linear, so it applies to every parametrisation).

    `timestep` is a scalar tensor of the sampler's grid; `extra_input` (mask + masked-image latent) is
    concatenated on the channel axis for 9-channel UNets.
    """
    batch = latents.shape[0]
    if uncond is None or guidance_scale == 1.0:
        return parts.predict(latents, timestep.expand(batch), cond, extra_input)
    extra = None if extra_input is None else torch.cat([extra_input, extra_input])
    both = parts.predict(torch.cat([latents, latents]), timestep.expand(2 * batch), concat_conditioning(uncond, cond), extra)
    unconditional, conditional = both.chunk(2)
    return unconditional + guidance_scale * (conditional - unconditional)


@torch.no_grad()
def sample_latents(
    parts: DiffusionParts, prompts: list[str], generators: list[torch.Generator], *, steps: int = 50,
    guidance_scale: float = 1.0, negative_prompt: str = "", latent_shape: tuple[int, int, int],
) -> torch.Tensor:
    """Text-to-image sampling; returns clean latents (B, *latent_shape). `negative_prompt` is the unconditional
    branch (the paper's concept-distillation guidance uses the background prompt here). `latent_shape` is
    (C, h, w), e.g. `parts.latent_shape_for(image_size)`: any size the VAE accepts, not only the native one."""
    shape = tuple(latent_shape)
    scheduler = parts.sampler(steps, shape)
    latents = randn_tensor((len(generators), *shape), generator=generators, device=parts.device, dtype=parts.dtype)
    latents = latents * getattr(scheduler, "init_noise_sigma", 1.0)
    cond = parts.encode_prompts(prompts)
    uncond = parts.encode_prompts([negative_prompt] * len(prompts)) if guidance_scale != 1.0 else None
    extra = _text_to_image_extra_input(parts, latents)
    grid = _grid(parts, scheduler)
    for index, (t_host, t) in enumerate(grid):
        model_input = parts.sampler_input(scheduler, latents, t)
        output = predict_noise(parts, model_input, t, cond, uncond, guidance_scale, extra)
        latents = parts.sampler_step(scheduler, output, t_host, latents, last=index + 1 == len(grid))
    return latents


@torch.no_grad()
def inpaint_latents(
    parts: DiffusionParts, known_latents: torch.Tensor, unknown_mask: torch.Tensor, prompts: list[str],
    generators: list[torch.Generator], *, steps: int = 50, guidance_scale: float = 1.0, negative_prompt: str = "",
) -> torch.Tensor:
    """Repaint the region `unknown_mask` (B, 1, h, w; 1 = repaint) of `known_latents` (B, C, h, w).

    Latent blending: after every step the known region is replaced by the clean latent noised to the next
    step's level, so the model only invents the unknown region. A 9-channel UNet also receives the mask and
    the masked latent as input, as diffusers' inpainting models do.
    """
    mask = unknown_mask.to(device=parts.device, dtype=parts.dtype)
    known_latents = known_latents.to(device=parts.device, dtype=parts.dtype)
    shape = tuple(known_latents.shape[1:])
    scheduler = parts.sampler(steps, shape)
    latents = randn_tensor((len(generators), *shape), generator=generators, device=parts.device, dtype=parts.dtype)
    latents = latents * getattr(scheduler, "init_noise_sigma", 1.0)
    cond = parts.encode_prompts(prompts)
    uncond = parts.encode_prompts([negative_prompt] * len(prompts)) if guidance_scale != 1.0 else None
    extra = torch.cat([mask, known_latents * (1 - mask)], dim=1) if parts.denoiser_in_channels > shape[0] else None
    grid = _grid(parts, scheduler)
    # the known region's fresh noise for every step after the first, drawn in step order and moved in one copy
    fresh = noise_draws(len(grid) - 1, generators, shape, parts.device, parts.dtype)
    for index, (t_host, t) in enumerate(grid):
        model_input = parts.sampler_input(scheduler, latents, t)
        output = predict_noise(parts, model_input, t, cond, uncond, guidance_scale, extra)
        latents = parts.sampler_step(scheduler, output, t_host, latents, last=index + 1 == len(grid))
        known = known_latents if index + 1 == len(grid) else parts.renoise(scheduler, known_latents, fresh[index], grid[index + 1][1])
        latents = mask * latents + (1 - mask) * known
    return latents


def _grid(parts: DiffusionParts, scheduler) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The sampler's timesteps as (host, device) pairs of scalar tensors: the scheduler's own arithmetic looks
    its tables up with the host one, the denoiser takes the device one. (Indexing with a GPU scalar reads it
    back, and on a GPU each read back waits for all queued work, once per step.)"""
    return list(zip(scheduler.timesteps, scheduler.timesteps.to(parts.device), strict=True))


def noise_draws(
    count: int, generators: list[torch.Generator], shape: tuple[int, ...], device: torch.device, dtype: torch.dtype,
) -> torch.Tensor:
    """(count, B, *shape) standard normal draws on `device`: draw k of sample i is the k-th draw of `generators[i]`
    (the same values as `count` successive `randn_tensor` calls). Made on the generators' device and moved in
    one copy: a copy per step would make a GPU wait for the host before every step."""
    host = generators[0].device
    draws = [randn_tensor((len(generators), *shape), generator=generators, device=host, dtype=dtype) for _ in range(count)]
    return (torch.stack(draws) if draws else torch.empty(0, len(generators), *shape, dtype=dtype)).to(device)


def _text_to_image_extra_input(parts: DiffusionParts, latents: torch.Tensor) -> torch.Tensor | None:
    """For a 9-channel UNet, plain sampling means 'repaint everything': mask of ones, empty masked latent."""
    if parts.denoiser_in_channels <= latents.shape[1]:
        return None
    ones = torch.ones_like(latents[:, :1])
    return torch.cat([ones, torch.zeros_like(latents)], dim=1)
