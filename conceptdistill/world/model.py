"""The shapes world's own text-to-image latent diffusion model: the stand-in for Stable Diffusion.

Built from random weights with the same diffusers classes Stable Diffusion uses, so every later stage runs
the same code on it. Two choices differ from SD, both measured in the feasibility study:
- The latent map is a fixed, lossless space-to-depth (pixel_unshuffle x2: 32x32x3 -> 16x16x12) instead of a
  trained VAE: free, exact, and it keeps cross-attention at 16x16 where masks need it.
- The text encoder has no transformer layers (token + position embeddings only), so a word's token is the
  only route by which that word reaches the UNet: its cross-attention map then carries the word's object.
  A causal multi-layer encoder lets later tokens absorb earlier words and smears that signal.
"""

from __future__ import annotations

from pathlib import Path

import torch


def world_vocabulary(shapes: list[str], colours: list[str]) -> list[str]:
    return ["a", "photo", "of", "and", "background", *shapes, *colours]


def build_world_parts(
    folder: str | Path,
    *,
    shapes: list[str],
    colours: list[str],
    image_size: int = 32,
    block_out_channels: tuple[int, ...] = (48, 96, 96),
    layers_per_block: int = 1,
    attention_heads: int = 4,
    text_dim: int = 64,
    text_layers: int = 0,
    max_tokens: int = 16,
    seed: int = 0,
):
    """A randomly initialised world model; the tokenizer files are written into `folder`/tokenizer."""
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from conceptdistill.diffusion.latent import SpaceToDepthAutoencoder
    from conceptdistill.diffusion.parts import DiffusionParts
    from conceptdistill.diffusion.tokenizer import write_word_tokenizer

    torch.manual_seed(seed)
    tokenizer = write_word_tokenizer(Path(folder) / "tokenizer", world_vocabulary(shapes, colours), model_max_length=max_tokens)
    vae = SpaceToDepthAutoencoder(in_channels=3, factor=2)
    latent_channels = vae.config.latent_channels
    levels = len(block_out_channels)
    unet = UNet2DConditionModel(
        sample_size=image_size // 2,
        in_channels=latent_channels,
        out_channels=latent_channels,
        layers_per_block=layers_per_block,
        block_out_channels=tuple(block_out_channels),
        # cross-attention at every resolution but the coarsest, plus the middle block
        down_block_types=("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1),
        cross_attention_dim=text_dim,
        attention_head_dim=attention_heads,  # diffusers reads this as the number of heads
        norm_num_groups=16,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=text_dim, intermediate_size=2 * text_dim,
            num_hidden_layers=text_layers, num_attention_heads=2, max_position_embeddings=max_tokens,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    # A cosine schedule and x0 clipping: in a pixel-like latent space sampling diverges without clipping.
    scheduler = DDIMScheduler(
        num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=True, clip_sample_range=1.0,
        prediction_type="epsilon", steps_offset=1, set_alpha_to_one=False,
    )
    return DiffusionParts(denoiser=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)
