"""Tiny, randomly initialised, Stable-Diffusion-SHAPED model parts for tests (no weights are ever downloaded).

Same classes and the same wiring as SD 1.x (UNet2DConditionModel with cross-attention, AutoencoderKL, CLIP
text encoder and tokenizer, DDIM with SD's betas), scaled down until building them takes well under a second
on two CPU cores. Every test that needs "a diffusion model" builds one of these, optionally saves it with
`save_diffusion_parts` and loads it back through the real loading path.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from typing import Literal

import torch

from conceptdistill.diffusion.parts import DiffusionParts
from conceptdistill.diffusion.tokenizer import write_word_tokenizer

DEFAULT_WORDS: tuple[str, ...] = (
    "a", "photo", "of", "the", "background",
    "bird", "dog", "car", "human", "with", "arms", "and", "legs",
    "circle", "square", "triangle",
    "red", "green", "blue", "yellow", "purple", "white",
    "chest", "finding",
)  # fmt: skip

# SD 1.x's training noise schedule.
SD_BETA_START = 0.00085
SD_BETA_END = 0.012


def build_tiny_parts(
    *,
    words: Sequence[str] = DEFAULT_WORDS,
    sample_size: int = 16,
    seed: int = 0,
    latent: Literal["kl", "space_to_depth"] = "kl",
    unet_in_channels: int | None = None,
    cross_attention_dim: int = 32,
    text_layers: int = 2,
    model_max_length: int = 16,
    tokenizer_folder: str | os.PathLike | None = None,
    prediction_type: str = "epsilon",
    scheduler: str = "DDIMScheduler",
) -> DiffusionParts:
    """Build random-weight SD-shaped parts; the same `seed` gives bit-identical weights.

    Args:
        words: vocabulary; each becomes one token ``word</w>`` (others fall back to characters).
        sample_size: latent side length the UNet is configured for (images are 2x larger: both latents
            halve the resolution once).
        latent: ``"kl"`` for a tiny AutoencoderKL with 4 latent channels (like SD), ``"space_to_depth"`` for
            the shapes world's lossless 2x pixel_unshuffle (12 latent channels).
        unet_in_channels: override the UNet's input channels, e.g. 9 for an inpainting UNet
            (latent + mask + masked-image latent). Defaults to the latent's channel count.
        tokenizer_folder: where to write the tokenizer files; a temporary folder (deleted after loading) if
            None. The tokenizer holds everything in memory once loaded.
        prediction_type: "epsilon" or "v_prediction" (SD 2.x 768-v), written into the scheduler config.
        scheduler: the diffusers scheduler class the folder names (model folders ship DDIM, PNDM, Euler ...),
            all with SD's noise schedule.
    """
    # Imported here so that `import conceptdistill.diffusion` stays cheap.
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from conceptdistill.diffusion.latent import SpaceToDepthAutoencoder

    if tokenizer_folder is None:
        with tempfile.TemporaryDirectory(prefix="tiny-tokenizer-") as tmp:
            tokenizer = write_word_tokenizer(tmp, words, model_max_length=model_max_length)
    else:
        tokenizer = write_word_tokenizer(tokenizer_folder, words, model_max_length=model_max_length)

    # Seed locally so that building a model neither depends on nor disturbs the caller's RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if latent == "kl":
            vae = AutoencoderKL(
                in_channels=3,
                out_channels=3,
                down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
                block_out_channels=(16, 32),
                latent_channels=4,
                norm_num_groups=8,
                layers_per_block=1,
                sample_size=sample_size * 2,
                scaling_factor=0.18215,  # SD's value, so the scaling code path is exercised
            )
        elif latent == "space_to_depth":
            vae = SpaceToDepthAutoencoder(in_channels=3, factor=2, scaling_factor=1.0)
        else:
            raise ValueError(f"latent must be 'kl' or 'space_to_depth', got {latent!r}")
        latent_channels = vae.config.latent_channels
        unet = UNet2DConditionModel(
            sample_size=sample_size,
            in_channels=unet_in_channels or latent_channels,
            out_channels=latent_channels,
            layers_per_block=1,
            block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=cross_attention_dim,
            attention_head_dim=8,  # diffusers reads this as the number of heads for SD-style UNets
            norm_num_groups=8,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=cross_attention_dim,
                intermediate_size=2 * cross_attention_dim,
                num_hidden_layers=text_layers,
                num_attention_heads=2,
                max_position_embeddings=model_max_length,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    import diffusers

    ddim = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=SD_BETA_START,
        beta_end=SD_BETA_END,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,  # 0 triggers a deprecation warning in diffusers
        prediction_type=prediction_type,
    )
    scheduler = getattr(diffusers, scheduler).from_config(ddim.config)
    for module in (unet, vae, text_encoder):
        module.eval()
    return DiffusionParts(denoiser=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)
