"""A fixed, lossless "autoencoder" for the shapes world: space-to-depth instead of a trained VAE.

The embedded shapes-world model works on pixel_unshuffle'd images (32x32x3 -> 16x16x12): the latent map is
free, exact and needs no training, which a small CPU budget cannot spare for a VAE. The class mimics the parts
of `diffusers.AutoencoderKL` that our stages and the stock diffusers pipelines touch, so every code path that
works with Stable Diffusion's VAE works with it unchanged:

- ``encode(x).latent_dist.sample()`` / ``.mode()`` (a deterministic "distribution"),
- ``decode(z).sample`` and ``decode(z, return_dict=False)[0]``,
- ``config.scaling_factor``, ``config.latent_channels`` and ``config.block_out_channels`` (whose length gives
  diffusers' ``vae_scale_factor = 2 ** (len(block_out_channels) - 1)``),
- ``save_pretrained`` / ``from_pretrained`` (config only: there are no weights).
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput
from diffusers.models.modeling_outputs import AutoencoderKLOutput


class DeterministicLatentDistribution:
    """A point mass at ``mean``: the `DiagonalGaussianDistribution` interface with zero variance.

    `sample` accepts (and ignores) a generator so that diffusers' ``retrieve_latents`` can call it.
    """

    def __init__(self, mean: torch.Tensor) -> None:
        self.mean = mean
        self.std = torch.zeros_like(mean)
        self.var = torch.zeros_like(mean)
        self.deterministic = True

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.mean

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self, other: Any = None) -> torch.Tensor:
        # A training loop that adds a KL term must see "no penalty", one value per sample.
        return torch.zeros(self.mean.shape[0], device=self.mean.device, dtype=self.mean.dtype)


class SpaceToDepthAutoencoder(ModelMixin, ConfigMixin):
    """Lossless latent map: ``encode = pixel_unshuffle(factor)``, ``decode = pixel_shuffle(factor)``.

    Images are expected in [-1, 1] with shape (B, in_channels, H, W), H and W divisible by ``factor``; latents
    have shape (B, in_channels * factor**2, H / factor, W / factor). ``scaling_factor`` plays the role of SD's
    0.18215: callers multiply latents by it after encoding and divide before decoding.

    ``latent_channels`` and ``block_out_channels`` are derived; they are accepted as arguments only so that a
    saved config (which records them for diffusers' benefit) loads back, and they are checked for consistency.
    """

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        factor: int = 2,
        scaling_factor: float = 1.0,
        latent_channels: int | None = None,
        block_out_channels: tuple[int, ...] | list[int] | None = None,
    ) -> None:
        super().__init__()
        if factor < 1 or factor & (factor - 1):
            raise ValueError(f"factor must be a power of two (diffusers derives it from a block count), got {factor}")
        expected_latent = in_channels * factor * factor
        # One "block" per halving, plus one: exactly how AutoencoderKL's config encodes its downsampling factor.
        expected_blocks = int(math.log2(factor)) + 1
        if latent_channels is not None and latent_channels != expected_latent:
            raise ValueError(f"latent_channels={latent_channels} contradicts in_channels*factor**2={expected_latent}")
        if block_out_channels is not None and len(block_out_channels) != expected_blocks:
            raise ValueError(
                f"block_out_channels must have log2(factor)+1={expected_blocks} entries, got {list(block_out_channels)}"
            )
        # Store the derived values in the config, where diffusers pipelines look for them.
        self.register_to_config(
            latent_channels=expected_latent,
            block_out_channels=[expected_latent] * expected_blocks,
        )
        # A parameter-free ModelMixin cannot report its dtype/device (diffusers looks at parameters, then
        # buffers); a non-persistent scalar buffer gives `.dtype`/`.device` a tensor to follow `.to()` with,
        # and stays out of the (empty) state dict.
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)

    def encode(self, x: torch.Tensor, return_dict: bool = True) -> AutoencoderKLOutput | tuple:
        """(B, C, H, W) image in [-1, 1] -> deterministic latent distribution over (B, C*f*f, H/f, W/f)."""
        f = self.config.factor
        if x.shape[-2] % f or x.shape[-1] % f:
            raise ValueError(f"image size {tuple(x.shape[-2:])} is not divisible by the space-to-depth factor {f}")
        dist = DeterministicLatentDistribution(F.pixel_unshuffle(x, f))
        if not return_dict:
            return (dist,)
        return AutoencoderKLOutput(latent_dist=dist)

    def decode(
        self,
        z: torch.Tensor,
        return_dict: bool = True,
        generator: torch.Generator | None = None,
    ) -> DecoderOutput | tuple:
        """(B, C*f*f, h, w) latent -> (B, C, h*f, w*f) image. `generator` is accepted for pipeline compatibility."""
        image = F.pixel_shuffle(z, self.config.factor)
        if not return_dict:
            return (image,)
        return DecoderOutput(sample=image)

    def forward(self, sample: torch.Tensor, return_dict: bool = True, **_: Any) -> DecoderOutput | tuple:
        """Encode then decode (the identity, exactly), like AutoencoderKL.forward."""
        return self.decode(self.encode(sample).latent_dist.mode(), return_dict=return_dict)

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any
    ) -> SpaceToDepthAutoencoder:
        """Build from ``config.json`` alone; there are no weights to read.

        Accepts the keyword arguments diffusers passes when loading a pipeline component; the hub-resolution
        ones are forwarded to `load_config`, ``torch_dtype`` casts the (weightless) model, the rest are ignored.
        """
        hub_keys = ("subfolder", "cache_dir", "local_files_only", "revision", "token", "force_download", "proxies")
        config = cls.load_config(pretrained_model_name_or_path, **{k: kwargs[k] for k in hub_keys if k in kwargs})
        model = cls.from_config(config)
        dtype = kwargs.get("torch_dtype")
        if isinstance(dtype, torch.dtype):
            # nn.Module.to: diffusers' own `to` warns about float32-only modules whenever a dtype is given
            model = torch.nn.Module.to(model, dtype=dtype)
        return model.eval()
