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

`build_from_configs` instead builds every component at the real width from the hub config files kept in
model_configs/ (see the README there), with random weights and optionally fewer blocks, for slow tests and
benchmarks on hardware that can hold them.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import string
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from conceptdistill.diffusion.tiny import DEFAULT_WORDS
from conceptdistill.diffusion.tokenizer import EOS_TOKEN, SENTENCEPIECE_WORD_START, write_word_tokenizer

#: families `save_tiny_model` builds
TINY_FAMILIES: tuple[str, ...] = ("sdxl", "sd3", "sd35", "flux")
#: families with real configs in model_configs/, for `build_from_configs`
CONFIG_FAMILIES: tuple[str, ...] = ("sd15", "sdxl", "sd3", "sd35", "flux")
MODEL_CONFIGS = Path(__file__).resolve().parent / "model_configs"

# T5's special pieces and their ids (sentencepiece's <pad>=0, </s>=1, <unk>=2).
T5_PAD, T5_EOS, T5_UNK = "<pad>", "</s>", "<unk>"

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


# ---------------------------------------------------------------- tokenizers


def _clean_words(words: Iterable[str], *, lower: bool) -> list[str]:
    clean: list[str] = []
    for word in words:
        word = word.strip().lower() if lower else word.strip()
        if not (word.isascii() and word.isalpha()):
            raise ValueError(f"tokenizer words must be non-empty and made of ASCII letters, got {word!r}")
        if word not in clean:
            clean.append(word)
    return clean


def write_t5_tokenizer(
    folder: str | os.PathLike,
    words: Iterable[str],
    *,
    model_max_length: int = 32,
) -> Any:
    """Write a T5-style sentencepiece (Unigram) tokenizer to `folder` and load it as a `T5TokenizerFast`.

    Built offline with the `tokenizers` library the way transformers converts T5's sentencepiece model: a Unigram
    model (``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2), whitespace split then a Metaspace pre-tokenizer that writes
    a word's leading space as "▁", a Metaspace decoder, and a post-processor appending ``</s>``. The vocabulary:
    the three special pieces, "▁", each word of `words` as ONE piece "▁word", then every printable ASCII
    character with and without "▁" (scored far below whole words), so any other ASCII word falls back to several
    pieces ("zebra" -> ▁z e b r a) as rare words do in T5. Case is kept (T5 does not lower-case). No sentinel
    (``<extra_id_N>``) tokens. Writes tokenizer.json and tokenizer_config.json; that is what
    ``T5TokenizerFast.from_pretrained(folder)`` reads, as the SD3 and FLUX pipelines load their T5 tokenizer.

    Returns:
        The loaded tokenizer; ``len(tokenizer)`` is its vocabulary size (ids 0 .. len - 1).
    Raises:
        ValueError: a word that is empty or not made of ASCII letters only.
        RuntimeError: a word that does not come back as its single piece (a bug here, never expected).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    clean = _clean_words(words, lower=False)
    start = SENTENCEPIECE_WORD_START
    # Unigram picks the segmentation with the highest summed score: a whole word (-1) always beats characters.
    pieces: list[tuple[str, float]] = [(T5_PAD, 0.0), (T5_EOS, 0.0), (T5_UNK, 0.0), (start, -2.0)]
    pieces += [(start + word, -1.0) for word in clean]
    characters = string.ascii_letters + string.digits + string.punctuation
    seen = {piece for piece, _ in pieces}
    for piece in [start + c for c in characters] + list(characters):
        if piece not in seen:
            seen.add(piece)
            pieces.append((piece, -10.0))

    backend = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement=start, prepend_scheme="always")]
    )
    backend.decoder = decoders.Metaspace(replacement=start, prepend_scheme="always")
    backend.post_processor = processors.TemplateProcessing(
        single=["$A", T5_EOS], pair=["$A", T5_EOS, "$B", T5_EOS], special_tokens=[(T5_EOS, 1)]
    )
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (T5_PAD, T5_EOS, T5_UNK)])
    backend.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "T5Tokenizer",  # as the hub repos write it; transformers maps it to the fast class
        "model_max_length": model_max_length,
        "eos_token": T5_EOS,
        "unk_token": T5_UNK,
        "pad_token": T5_PAD,
        "extra_ids": 0,
        "additional_special_tokens": [],
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")

    tokenizer = T5TokenizerFast.from_pretrained(str(folder), local_files_only=True)
    for word in clean:
        tokens = tokenizer.tokenize(word)
        if tokens != [start + word]:
            raise RuntimeError(f"word {word!r} tokenizes to {tokens}, expected one piece {start + word!r}")
    return tokenizer


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
    words = _clean_words(words, lower=False)
    with tempfile.TemporaryDirectory(prefix="tiny-tokenizers-") as tmp, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if family == "sdxl":
            pipeline = _tiny_sdxl(Path(tmp), words, sample_size, clip_max_length)
        elif family in ("sd3", "sd35"):
            pipeline = _tiny_sd3(family, Path(tmp), words, sample_size, clip_max_length, t5_max_length)
        else:
            pipeline = _tiny_flux(Path(tmp), words, sample_size, clip_max_length, t5_max_length)
        return _save_pipeline(pipeline, folder)


# ---------------------------------------------------------------- real sizes


def _reduce_depth(name: str, config: dict[str, Any], num_layers: int) -> dict[str, Any]:
    """`config` with every stack of repeated blocks cut to at most `num_layers` (widths unchanged)."""
    config = dict(config)
    cls = config.get("_class_name") or (config.get("architectures") or [""])[0]
    if cls == "UNet2DConditionModel":
        config["layers_per_block"] = min(config["layers_per_block"], num_layers)
        per_block = config.get("transformer_layers_per_block", 1)
        if isinstance(per_block, int):
            config["transformer_layers_per_block"] = min(per_block, num_layers)
        else:
            config["transformer_layers_per_block"] = [min(n, num_layers) for n in per_block]
    elif cls == "SD3Transformer2DModel":
        config["num_layers"] = min(config["num_layers"], num_layers)
        config["dual_attention_layers"] = [i for i in config.get("dual_attention_layers", ()) if i < num_layers]
    elif cls == "FluxTransformer2DModel":
        config["num_layers"] = min(config["num_layers"], num_layers)
        config["num_single_layers"] = min(config["num_single_layers"], num_layers)
    elif config.get("model_type") == "clip_text_model":
        config["num_hidden_layers"] = min(config["num_hidden_layers"], num_layers)
    elif config.get("model_type") == "t5":
        config["num_layers"] = min(config["num_layers"], num_layers)
        config["num_decoder_layers"] = min(config.get("num_decoder_layers", num_layers), num_layers)
    # The VAE keeps its depth: 84M parameters at every size, and its blocks set the down-sampling factor.
    return config


def _component(family: str, name: str, library: str, cls_name: str, num_layers: int | None) -> Any:
    """One component built from model_configs/<family>/<name>/ (random weights), depth optionally reduced."""
    import diffusers
    import transformers

    folder = MODEL_CONFIGS / family / name
    if library == "diffusers":
        cls = getattr(diffusers, cls_name)
        config = dict(cls.load_config(folder))
        config = _reduce_depth(name, config, num_layers) if num_layers else config
        return cls.from_config(config)
    cls = getattr(transformers, cls_name)
    config = _load_json(folder / "config.json")
    # The dtype the hub weights were saved in: transformers would build sub-models in it (float16 for SDXL's
    # encoders), instead of the default dtype the caller chose.
    config.pop("torch_dtype", None)
    config.pop("dtype", None)
    config = _reduce_depth(name, config, num_layers) if num_layers else config
    return cls(cls.config_class.from_dict(config))


def _parameter_counts(family: str, num_layers: int | None = None) -> dict[str, int]:
    """Parameters per component of `family` built from its configs, instantiated on the meta device (no memory)."""
    _check_family(family, CONFIG_FAMILIES)
    index = _load_json(MODEL_CONFIGS / family / "model_index.json")
    counts: dict[str, int] = {}
    for name, value in index.items():
        if isinstance(value, list) and (MODEL_CONFIGS / family / name / "config.json").is_file():
            with torch.device("meta"):
                module = _component(family, name, value[0], value[1], num_layers)
            counts[name] = sum(p.numel() for p in module.parameters())
    return counts


def build_from_configs(
    family: str,
    folder: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.bfloat16,
    num_layers: int | None = None,
    words: Sequence[str] = DEFAULT_WORDS,
    seed: int = 0,
) -> Path:
    """Instantiate every component of `family` from the real hub configs in model_configs/<family>/ with random
    weights and save a diffusers-layout folder with the stock pipeline's ``save_pretrained``: the layout of a
    user's download, loadable with the family's pipeline class (``StableDiffusionPipeline``,
    ``StableDiffusionXLPipeline``, ``StableDiffusion3Pipeline``, ``FluxPipeline``) ``.from_pretrained(folder)``.

    Widths, heads, channel counts, vocabulary sizes, VAE and scheduler are the real ones. `num_layers` cuts
    every stack of repeated blocks to at most that many (UNet ``layers_per_block`` and each entry of
    ``transformer_layers_per_block``; the transformers' ``num_layers`` and FLUX's ``num_single_layers``, SD3.5's
    ``dual_attention_layers`` kept below it; the CLIP and T5 encoder layers); the VAE is never cut. Tokenizers
    are the offline ones: CLIP `write_word_tokenizer` with model_max_length 77, padding with "!" where the hub's
    tokenizer does (bigG, tokenizer_2 of sdxl/sd3/sd35); T5 `write_t5_tokenizer` with model_max_length 512. Their
    ids all fall below the real embedding tables (49408 CLIP, 32128 T5 ids), which keep their real size.

    Memory of the weights at full depth in bfloat16 (parameters x 2 bytes; the same doubled in float32 while
    building, which happens under `dtype` as torch's default, so no float32 copy is made):

    ======  ==============================================  ===============  ========
    family  denoiser + text encoders + VAE (parameters)      total            bf16
    ======  ==============================================  ===============  ========
    sd15    UNet 859.5M + CLIP-L 123.1M + VAE 83.7M          1,066,235,307    2.0 GiB
    sdxl    UNet 2,567.5M + CLIP-L 123.1M + bigG 694.7M      3,468,837,867    6.5 GiB
            + VAE 83.7M
    sd3     MMDiT 2,028.3M + CLIP-L 123.7M + bigG 694.7M     7,692,768,483    14.3 GiB
            + T5-XXL 4,762.3M + VAE 83.8M
    sd35    MMDiT 8,056.6M (3.5 large) + the same encoders   13,721,068,003   25.6 GiB
            and VAE as sd3
    flux    transformer 11,901.4M + CLIP-L 123.1M            16,870,599,139   31.4 GiB
            + T5-XXL 4,762.3M + VAE 83.8M
    ======  ==============================================  ===============  ========

    Counted by instantiating on ``torch.device("meta")``; model_configs/README.md has the per-component table.
    Building runs the modules' own initialisation on the CPU (minutes at full depth) and saving writes the
    bytes above, so at full depth this is for a machine with that much memory and disk free; on a laptop CPU
    use `num_layers` (sdxl with 1 layer: about 650M parameters, 1.3 GB).

    Args:
        family: ``"sd15"``, ``"sdxl"``, ``"sd3"``, ``"sd35"`` (3.5 large) or ``"flux"`` (FLUX.1-dev).
        dtype: the weights' dtype, as saved.
        num_layers: at least 1, or None for the real depth.
        seed: the same seed gives the same weights (seeded locally; the caller's RNG stream is left alone).

    Returns:
        `folder`, as a Path.
    Raises:
        ValueError: an unknown family, `num_layers` below 1, or tokenizer words that are not ASCII letters.
        FileExistsError: `folder` exists and is not empty.
    """
    import diffusers

    _check_family(family, CONFIG_FAMILIES)
    if num_layers is not None and num_layers < 1:
        raise ValueError(f"num_layers must be at least 1 (or None for the real depth), got {num_layers}")
    words = _clean_words(words, lower=False)
    index = _load_json(MODEL_CONFIGS / family / "model_index.json")
    components: dict[str, Any] = {}
    settings: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="tokenizers-") as tmp:
        with torch.random.fork_rng(devices=[]), _default_dtype(dtype):
            torch.manual_seed(seed)
            for name, value in index.items():
                if name.startswith("_"):
                    continue
                if not isinstance(value, list):
                    settings[name] = value  # pipeline settings such as force_zeros_for_empty_prompt
                elif name == "scheduler":
                    components[name] = _real_scheduler(family)
                elif (MODEL_CONFIGS / family / name / "config.json").is_file():
                    module = _component(family, name, value[0], value[1], num_layers).eval()
                    # Built under `dtype` already; only buffers made in float32 on purpose (e.g. sin-cos tables)
                    # differ, and they are cast as from_pretrained(torch_dtype=dtype) would.
                    tensors = (*module.parameters(), *module.buffers())
                    if any(t.is_floating_point() and t.dtype != dtype for t in tensors):
                        module = module.to(dtype)
                    components[name] = module
        for name, value in index.items():
            if not isinstance(value, list) or name in components:
                continue
            if value[1] == "CLIPTokenizer":
                components[name] = _clip_tokenizer(Path(tmp) / name, words, CLIP_MAX_LENGTH, _pad_token(family, name))
            elif value[1] in ("T5Tokenizer", "T5TokenizerFast"):
                components[name] = write_t5_tokenizer(Path(tmp) / name, words, model_max_length=T5_MAX_LENGTH)
            else:
                components[name] = None  # safety checker, feature extractor: not part of what we build
        for name, tokenizer in components.items():
            encoder = components.get(name.replace("tokenizer", "text_encoder")) if "tokenizer" in name else None
            if encoder is not None and len(tokenizer) > encoder.config.vocab_size:
                raise ValueError(f"{name} has {len(tokenizer)} ids, more than {encoder.config.vocab_size} embeddings")
        if "safety_checker" in index:
            settings["requires_safety_checker"] = False
        pipeline_class = getattr(diffusers, index["_class_name"])
        pipeline = pipeline_class(**components, **settings)
        return _save_pipeline(pipeline, folder)
