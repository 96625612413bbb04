"""Random-weight models at the real sizes, built from the hub repos' own config files kept in model_configs/ (see
the README there): every component at its published width, optionally with fewer blocks, saved as the stock
pipeline saves a download. For slow tests and benchmarks on hardware that can hold them."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from conceptdistill.diffusion.t5_tokenizer import clean_words, write_t5_tokenizer
from conceptdistill.diffusion.tiny import DEFAULT_WORDS
from conceptdistill.diffusion.tiny_families import (  # the builders' shared helpers
    CLIP_MAX_LENGTH,
    CONFIG_FAMILIES,
    MODEL_CONFIGS,
    T5_MAX_LENGTH,
    _check_family,
    _clip_tokenizer,
    _default_dtype,
    _load_json,
    _pad_token,
    _real_scheduler,
    _save_pipeline,
)

#: families `save_tiny_model` builds
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
    words = clean_words(words, lower=False)
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
