"""Random-weight SDXL, Stable Diffusion 3 / 3.5 and FLUX model folders, tiny or at the real sizes (no download).

`save_tiny_model` writes a tiny pipeline folder per family with the stock diffusers pipeline's `save_pretrained`,
so that ``StableDiffusionXLPipeline`` / ``StableDiffusion3Pipeline`` / ``FluxPipeline.from_pretrained(folder)``
load it as they load the real download. Every component is the real class with the real wiring; only widths,
depths and vocabularies shrink, until a build takes well under a second and the folder a few MB. Shared by all
families: CLIP tokenizers written by `write_word_tokenizer` and T5 tokenizers by `write_t5_tokenizer` (each
listed word is one token), a 2-level AutoencoderKL (2x down instead of 8x) whose latent channels,
``scaling_factor``, ``shift_factor``, ``force_upcast`` and quant convs are read from the real VAE config, and the
real scheduler config itself (model_configs/<family>/scheduler/). Per family, what is kept of the real wiring:

- ``sdxl`` (stable-diffusion-xl-base-1.0): `UNet2DConditionModel` with SDXL's block layout (no attention at the
  highest resolution, cross-attention at the two lower ones and the mid block, several transformer layers at the
  lowest, linear projections) and its ``text_time`` added conditioning: ``projection_class_embeddings_input_dim``
  = text_encoder_2's projection dim + 6 x ``addition_time_embed_dim`` (pooled text + 6 size/crop numbers);
  ``cross_attention_dim`` = text_encoder's hidden + text_encoder_2's hidden (the pipeline concatenates the
  penultimate hidden states of CLIP ViT-L and OpenCLIP bigG: 768 + 1280 = 2048 in SDXL, 32 + 64 here);
  `CLIPTextModel` + `CLIPTextModelWithProjection`, tokenizer_2 padding with "!" as bigG's does;
  `EulerDiscreteScheduler` with SDXL's schedule; ``force_zeros_for_empty_prompt=True``.
- ``sd3`` (stable-diffusion-3-medium) and ``sd35`` (3.5): `SD3Transformer2DModel` (MMDiT, 2x2 patches),
  ``joint_attention_dim`` = T5's hidden size, ``caption_projection_dim`` = heads x head dim,
  ``pooled_projection_dim`` = CLIP-L + CLIP-G projection dims (768 + 1280 = 2048 there, 32 + 64 here), and the
  concatenated CLIP hidden states narrower than T5's so that the pipeline's zero-padding to T5's width is
  exercised (2048 -> 4096 there, 96 -> 128 here); two `CLIPTextModelWithProjection` and a `T5EncoderModel`
  (gated-GELU, relative attention buckets), tokenizer_3 a T5 tokenizer; 16 latent channels with SD3's
  shift/scale and no quant convs; `FlowMatchEulerDiscreteScheduler` (shift 3). ``sd35`` adds what SD 3.5
  changed: RMS q/k normalisation (both sizes) and, as 3.5 medium (MMDiT-X), one dual-attention layer.
- ``flux`` (FLUX.1-dev): `FluxTransformer2DModel` with patch_size 1 over 2x2-packed latents (``in_channels`` = 4
  x 16 latent channels), one double-stream and one single-stream block, guidance embedding (dev is
  guidance-distilled), 3-axis RoPE whose ``axes_dims_rope`` sum to the head dim (16+56+56 = 128 there, 4+6+6 =
  16 here), ``pooled_projection_dim`` = CLIP's hidden size (the pipeline feeds CLIP's pooled output, no
  projection) and ``joint_attention_dim`` = T5's; 16 latent channels with FLUX's shift/scale and no quant convs;
  the dynamic-shift flow-matching scheduler of FLUX.1-dev.

`build_from_configs` (diffusion/real_size.py) instead builds every component at the real width from the hub config files kept in
model_configs/ (see the README there), with random weights and optionally fewer blocks, for slow tests and
benchmarks on hardware that can hold them.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from conceptdistill.diffusion.t5_tokenizer import clean_words, write_t5_tokenizer
from conceptdistill.diffusion.tiny import DEFAULT_WORDS
from conceptdistill.diffusion.tokenizer import EOS_TOKEN, write_word_tokenizer

#: families `save_tiny_model` builds
TINY_FAMILIES: tuple[str, ...] = ("sdxl", "sd3", "sd35", "flux")
#: families with real configs in model_configs/, for `build_from_configs`
CONFIG_FAMILIES: tuple[str, ...] = ("sd15", "sdxl", "sd3", "sd35", "flux")
MODEL_CONFIGS = Path(__file__).resolve().parent / "model_configs"

# Tokenizer settings of the hub repos, from their tokenizer*/ configs (not copied: they come with vocabularies).
# CLIP's model_max_length is also its text encoder's max_position_embeddings; T5's is 512 in SD3 and FLUX.
CLIP_MAX_LENGTH = 77
T5_MAX_LENGTH = 512
# OpenCLIP ViT-bigG's tokenizer (tokenizer_2 of SDXL and SD 3/3.5) pads with "!", not with <|endoftext|>.
_PAD_WITH_BANG = {("sdxl", "tokenizer_2"), ("sd3", "tokenizer_2"), ("sd35", "tokenizer_2")}

# Widths of the tiny text encoders: CLIP ViT-L, OpenCLIP bigG and T5 stand-ins.
_CLIP_L = 32
_CLIP_G = 64
_T5 = 128




def _clip_tokenizer(folder: Path, words: Sequence[str], model_max_length: int, pad_token: str = EOS_TOKEN) -> Any:
    """`write_word_tokenizer`, with another padding token when the real tokenizer has one (bigG's "!")."""
    from transformers import CLIPTokenizer

    tokenizer = write_word_tokenizer(folder, words, model_max_length=model_max_length)
    if pad_token == EOS_TOKEN:
        return tokenizer
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["pad_token"] = pad_token
    config_file.write_text(json.dumps(config, indent=2), encoding="utf-8")
    return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)


def _pad_token(family: str, name: str) -> str:
    return "!" if (family, name) in _PAD_WITH_BANG else EOS_TOKEN


# ---------------------------------------------------------------- shared helpers


def _check_family(family: str, allowed: Sequence[str]) -> None:
    if family not in allowed:
        raise ValueError(f"family must be one of {', '.join(allowed)}; got {family!r}")


def _load_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def _real_scheduler(family: str) -> Any:
    """The family's real noise scheduler, built from its hub scheduler_config.json."""
    import diffusers

    config = _load_json(MODEL_CONFIGS / family / "scheduler" / "scheduler_config.json")
    return getattr(diffusers, config["_class_name"]).from_config(config)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _save_pipeline(pipeline: Any, folder: str | os.PathLike) -> Path:
    """`pipeline.save_pretrained` into a staging folder beside `folder`, renamed into place when complete (an
    interrupted save never leaves a half-written model), without the configs' "_name_or_path" (where a config
    was read from on this machine, not a property of the model)."""
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        raise FileExistsError(f"{folder} exists and is not empty")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".partial"))
    try:
        pipeline.save_pretrained(staging)
        for config_file in staging.glob("*/config.json"):
            values = _load_json(config_file)
            if values.pop("_name_or_path", None) is not None:
                config_file.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        if folder.exists():
            folder.rmdir()
        staging.rename(folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


# ---------------------------------------------------------------- tiny models


def _tiny_clip(tokenizer: Any, hidden: int, *, act: str, projection: bool) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        projection_dim=hidden,
        num_hidden_layers=2,  # SDXL and SD3 read the penultimate hidden state
        num_attention_heads=hidden // 16,
        max_position_embeddings=tokenizer.model_max_length,
        hidden_act=act,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _tiny_t5(tokenizer: Any) -> Any:
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=_T5,
        d_kv=32,
        d_ff=2 * _T5,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",  # T5 v1.1 (XXL), as SD3 and FLUX use
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return T5EncoderModel(config)


def _tiny_vae(family: str, sample_size: int) -> Any:
    """A 2-level AutoencoderKL (2x down) with the real VAE's latent channels, scaling, shift and quant convs."""
    from diffusers import AutoencoderKL

    real = _load_json(MODEL_CONFIGS / family / "vae" / "config.json")
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=real["latent_channels"],
        sample_size=2 * sample_size,
        scaling_factor=real.get("scaling_factor", 0.18215),  # diffusers' default, which SD 1.x relies on
        shift_factor=real.get("shift_factor"),
        force_upcast=real.get("force_upcast", True),
        use_quant_conv=real.get("use_quant_conv", True),
        use_post_quant_conv=real.get("use_post_quant_conv", True),
    )


def _tiny_sdxl(tmp: Path, words: Sequence[str], sample_size: int, clip_max_length: int) -> Any:
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    tokenizer = _clip_tokenizer(tmp / "tokenizer", words, clip_max_length, _pad_token("sdxl", "tokenizer"))
    tokenizer_2 = _clip_tokenizer(tmp / "tokenizer_2", words, clip_max_length, _pad_token("sdxl", "tokenizer_2"))
    text_encoder = _tiny_clip(tokenizer, _CLIP_L, act="quick_gelu", projection=False)
    text_encoder_2 = _tiny_clip(tokenizer_2, _CLIP_G, act="gelu", projection=True)
    vae = _tiny_vae("sdxl", sample_size)
    time_embed_dim = 8  # SDXL: 256
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=vae.config.latent_channels,
        out_channels=vae.config.latent_channels,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 32, 32),  # SDXL: 320, 640, 1280
        layers_per_block=1,  # SDXL: 2
        transformer_layers_per_block=(1, 1, 2),  # SDXL: 1, 2, 10
        attention_head_dim=(1, 2, 2),  # read as head counts by SD-style UNets: 16 wide; SDXL: 5, 10, 20 x 64
        norm_num_groups=8,
        use_linear_projection=True,
        cross_attention_dim=text_encoder.config.hidden_size + text_encoder_2.config.hidden_size,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=text_encoder_2.config.projection_dim + 6 * time_embed_dim,
    )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=_real_scheduler("sdxl"),
        force_zeros_for_empty_prompt=True,
    )


def _tiny_sd3(
    family: str, tmp: Path, words: Sequence[str], sample_size: int, clip_max_length: int, t5_max_length: int
) -> Any:
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    tokenizer = _clip_tokenizer(tmp / "tokenizer", words, clip_max_length, _pad_token(family, "tokenizer"))
    tokenizer_2 = _clip_tokenizer(tmp / "tokenizer_2", words, clip_max_length, _pad_token(family, "tokenizer_2"))
    tokenizer_3 = write_t5_tokenizer(tmp / "tokenizer_3", words, model_max_length=t5_max_length)
    text_encoder = _tiny_clip(tokenizer, _CLIP_L, act="quick_gelu", projection=True)
    text_encoder_2 = _tiny_clip(tokenizer_2, _CLIP_G, act="gelu", projection=True)
    text_encoder_3 = _tiny_t5(tokenizer_3)
    vae = _tiny_vae(family, sample_size)
    heads, head_dim = 2, 16  # SD3 medium: 24 x 64; SD3.5 large: 38 x 64
    sd35 = family == "sd35"
    transformer = SD3Transformer2DModel(
        sample_size=sample_size,
        patch_size=2,
        in_channels=vae.config.latent_channels,
        out_channels=vae.config.latent_channels,
        num_layers=2,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=text_encoder_3.config.d_model,
        caption_projection_dim=heads * head_dim,
        pooled_projection_dim=text_encoder.config.projection_dim + text_encoder_2.config.projection_dim,
        pos_embed_max_size=sample_size,  # in patches: images up to twice the default side
        qk_norm="rms_norm" if sd35 else None,
        dual_attention_layers=(0,) if sd35 else (),
    )
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=_real_scheduler(family),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )


def _tiny_flux(tmp: Path, words: Sequence[str], sample_size: int, clip_max_length: int, t5_max_length: int) -> Any:
    from diffusers import FluxPipeline, FluxTransformer2DModel

    tokenizer = _clip_tokenizer(tmp / "tokenizer", words, clip_max_length, _pad_token("flux", "tokenizer"))
    tokenizer_2 = write_t5_tokenizer(tmp / "tokenizer_2", words, model_max_length=t5_max_length)
    text_encoder = _tiny_clip(tokenizer, _CLIP_L, act="quick_gelu", projection=False)
    text_encoder_2 = _tiny_t5(tokenizer_2)
    vae = _tiny_vae("flux", sample_size)
    heads, head_dim = 2, 16  # FLUX.1: 24 x 128
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * vae.config.latent_channels,  # the pipeline packs 2x2 latent pixels into one token
        num_layers=1,  # FLUX.1: 19 double-stream blocks
        num_single_layers=1,  # FLUX.1: 38 single-stream blocks
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=text_encoder_2.config.d_model,
        pooled_projection_dim=text_encoder.config.hidden_size,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),  # FLUX.1: 16, 56, 56; they sum to the head dim
    )
    return FluxPipeline(
        scheduler=_real_scheduler("flux"),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )


def save_tiny_model(
    folder: str | os.PathLike,
    family: str,
    *,
    seed: int = 0,
    words: Sequence[str] = DEFAULT_WORDS,
    sample_size: int = 16,
    clip_max_length: int = 16,
    t5_max_length: int = 32,
) -> Path:
    """Build a tiny random-weight pipeline of `family` and save it to `folder` with the stock pipeline's
    ``save_pretrained`` (diffusers layout: model_index.json and one subfolder per component).

    The same `seed` gives bit-identical weights (seeded locally: the caller's RNG stream is neither used nor
    moved). The module docstring lists what each family keeps of the real wiring. A build takes well under a
    second and the folder holds under 5 MB.

    Args:
        family: ``"sdxl"``, ``"sd3"``, ``"sd35"`` or ``"flux"``.
        words: each becomes one token of every tokenizer (CLIP lower-cases them, T5 keeps case).
        sample_size: latent side the denoiser is configured for. The VAE halves the resolution once, so
            latents are (C, H/2, W/2) for an (H, W) image, C = 4 (sdxl) or 16; the default image is 2 x
            `sample_size` pixels square (32). Pipeline calls need H and W divisible by 4 for sd3/sd35 (VAE 2x
            times 2x2 patches) and flux (VAE 2x times 2x2 packing), by 8 for sdxl (its UNet halves twice),
            and at most 4 x `sample_size` for sd3/sd35 (the positional table covers `sample_size` patches).
        clip_max_length: the CLIP tokenizers' model_max_length and the CLIP encoders' positions (real: 77).
        t5_max_length: the T5 tokenizer's model_max_length (real: 512). The SD3 and FLUX pipelines pad T5
            prompts to their ``max_sequence_length`` argument instead (256 and 512 by default); T5's relative
            positions accept any length, but passing ``max_sequence_length=t5_max_length`` keeps calls fast.

    Returns:
        `folder`, as a Path.
    Raises:
        ValueError: an unknown family, a `sample_size` that is not a positive multiple of 4, or a word that is
            not made of ASCII letters.
        FileExistsError: `folder` exists and is not empty.
    """
    _check_family(family, TINY_FAMILIES)
    if sample_size <= 0 or sample_size % 4:
        raise ValueError(f"sample_size must be a positive multiple of 4 (the UNet halves it twice), got {sample_size}")
    words = clean_words(words, lower=False)
    with tempfile.TemporaryDirectory(prefix="tiny-tokenizers-") as tmp, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if family == "sdxl":
            pipeline = _tiny_sdxl(Path(tmp), words, sample_size, clip_max_length)
        elif family in ("sd3", "sd35"):
            pipeline = _tiny_sd3(family, Path(tmp), words, sample_size, clip_max_length, t5_max_length)
        else:
            pipeline = _tiny_flux(Path(tmp), words, sample_size, clip_max_length, t5_max_length)
        return _save_pipeline(pipeline, folder)
