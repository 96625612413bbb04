"""Loading and saving the parts of a Stable-Diffusion-style latent diffusion model, strictly offline.

Every stage works with the same five parts (UNet, VAE, text encoder, tokenizer, noise scheduler) rather than a
pipeline object, because stages 1 and 2 call the UNet directly; they are bundled as `DiffusionParts`
(diffusion/parts.py). This module checks what a folder claims before anything is loaded (layout, family,
scheduler, prediction type, variant) and loads, saves and fingerprints it.

Weights are never downloaded here: `source` is a folder in diffusers layout or a hub id already in the local
Hugging Face cache. The same code path loads real Stable Diffusion and the tiny random models the tests save.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from conceptdistill.diffusion.parts import DiffusionParts

# The parts of a diffusers-layout folder, and the file(s) whose presence shows each part is there.
SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
_CONFIG_FILES = {
    "unet": ("config.json",),
    "transformer": ("config.json",),
    "vae": ("config.json",),
    "text_encoder": ("config.json",),
    "tokenizer": ("tokenizer_config.json", "vocab.json", "tokenizer.json"),  # any one of them
    "scheduler": ("scheduler_config.json",),
}


#: what the UNet may be trained to predict; anything else is refused when the model is loaded
SUPPORTED_PREDICTION_TYPES = ("epsilon", "v_prediction")


class ModelNotFoundError(FileNotFoundError):
    """The diffusion model's files are not on this machine (we never download them)."""


class UnsupportedModelError(ValueError):
    """The model folder is readable but describes a model this project cannot run correctly."""


def _not_found(source: str, problem: str) -> ModelNotFoundError:
    return ModelNotFoundError(
        f"Could not load a diffusion model from {source!r}: {problem}. "
        "Expected a local folder in diffusers layout (model_index.json plus one subfolder per component with its "
        "config and weights: unet/ or transformer/, vae/, text_encoder/ (and _2, _3 for SDXL, SD3, FLUX), "
        "tokenizer/ (likewise) and scheduler/), or a Hugging Face hub id whose files are already in the local "
        "Hugging Face cache; nothing is downloaded. To provide one, on a machine with internet run e.g. "
        "`huggingface-cli download <hub id> --local-dir /path/to/model` (accepting the model's licence on the hub "
        "first), copy the folder here, and point the config at it with `diffusion.path=/path/to/model` or the "
        "environment variable the diffusion config names (SD14_PATH, SD15_PATH, SD21_PATH, SDXL_PATH, SD3_PATH, "
        "SD35_PATH, FLUX_PATH)."
    )


def _resolve_source(source: str, revision: str | None, local_files_only: bool) -> Path:
    """A local folder for `source`: the folder itself, or the hub id's snapshot in the local HF cache."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    # Only "name" or "owner/name" can be a hub id; anything else (absolute, ./relative, deeper paths) is a
    # folder that does not exist.
    if re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?", source) is None:
        raise _not_found(source, f"the folder {str(path)!r} does not exist")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(source, revision=revision, local_files_only=local_files_only))
    except (LocalEntryNotFoundError, OSError, ValueError) as err:
        raise _not_found(
            source, f"it is not a local folder, and the hub id is not in the local Hugging Face cache ({err})"
        ) from err


def _check_layout(folder: Path, source: str, subfolders: tuple[str, ...] = SUBFOLDERS) -> None:
    missing = []
    for sub in subfolders:
        files = _CONFIG_FILES[sub.rstrip("_23")]
        if not (folder / sub).is_dir():
            missing.append(f"{sub}/")
        elif not any((folder / sub / name).is_file() for name in files):
            missing.append(f"{sub}/{' or '.join(files)}")
    if missing:
        hint = ""
        if any(name.startswith(("text_encoder_3", "tokenizer_3")) for name in missing):
            hint = " (SD3 runs without its T5 encoder with diffusion.options.text_encoder_3=false)"
        raise _not_found(source, f"the folder {str(folder)!r} lacks {', '.join(missing)}{hint}")


def _family(folder: Path, source: str) -> type[DiffusionParts]:
    """The `DiffusionParts` class for the folder's pipeline: by model_index.json's `_class_name`, else (a folder
    assembled by hand) by its subfolders.

    Raises:
        UnsupportedModelError: a pipeline class no family is registered for, naming it and the supported ones.
    """
    from conceptdistill.diffusion.families import load_all
    from conceptdistill.diffusion.parts import FAMILIES

    load_all()
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text()) if index_path.is_file() else {}
    name = index.get("_class_name")
    if name is None:
        has = {sub for sub in ("unet", "transformer", "text_encoder_2", "text_encoder_3") if (folder / sub).is_dir()}
        if "transformer" in has:
            name = "StableDiffusion3Pipeline" if "text_encoder_3" in has else "FluxPipeline"
        else:
            name = "StableDiffusionXLPipeline" if "text_encoder_2" in has else "StableDiffusionPipeline"
    if name not in FAMILIES:
        supported = ", ".join(sorted(FAMILIES))
        raise UnsupportedModelError(
            f"{source!r} is a {name} (model_index.json's _class_name); supported pipelines: {supported} "
            "(diffusion=sd14, sd15, sd21, sd21_base, sdxl, sd3, sd35 or flux)"
        )
    return FAMILIES[name]


def _check_scheduler(folder: Path, family: type[DiffusionParts] = DiffusionParts) -> type:
    """The scheduler class named in scheduler_config.json, after checking that it is the family's noise process
    and (variance-preserving families) what the UNet predicts.

    Raises UnsupportedModelError for a prediction type outside SUPPORTED_PREDICTION_TYPES (e.g. "sample"), a
    flow-matching scheduler in a UNet family or a variance-preserving one in a flow family, and ValueError for
    a class diffusers does not know.
    """
    import diffusers

    path = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text())
    name = config.get("_class_name", "")
    if family.noise_process == "flow":
        if "FlowMatch" not in name:
            raise UnsupportedModelError(
                f"{path} names {name!r}, but a {family.family} model is trained with flow matching: its folder "
                "must name a FlowMatch* scheduler (e.g. FlowMatchEulerDiscreteScheduler)"
            )
        if getattr(diffusers, name, None) is None:
            raise UnsupportedModelError(f"unknown scheduler class {name!r} in {path}")
        return getattr(diffusers, name)
    if "FlowMatch" in name:
        raise UnsupportedModelError(
            f"{path} names {name}: a flow-matching model (x_t = (1 - sigma) x0 + sigma eps), which this version "
            f"does not support for a {family.family} (UNet) model; flow matching is supported for SD3 and FLUX pipelines"
        )
    prediction_type = config.get("prediction_type", "epsilon")
    if prediction_type not in SUPPORTED_PREDICTION_TYPES:
        raise UnsupportedModelError(
            f"{path} sets prediction_type={prediction_type!r}; supported: {', '.join(SUPPORTED_PREDICTION_TYPES)}"
        )
    scheduler_cls = getattr(diffusers, name, None)
    if scheduler_cls is None:
        raise ValueError(f"unknown scheduler class {name!r} in {path}")
    return scheduler_cls


def _variant_hint(folder: Path, variant: str | None) -> str | None:
    """When weights are missing because they are stored as a variant (``*.fp16.safetensors``), say which
    `diffusion.variant` to set; None when that is not the problem."""
    found: set[str] = set()
    for sub in ("unet", "transformer", "vae", "text_encoder"):
        if not (folder / sub).is_dir():
            continue
        weights = [p.name for p in (folder / sub).glob("*") if p.suffix in (".safetensors", ".bin")]
        if any(name.count(".") == 1 for name in weights):
            continue  # this part has plain weights: a variant is not what is missing
        # diffusion_pytorch_model.fp16.safetensors / model.fp16.safetensors -> "fp16"
        found.update(name.split(".")[-2] for name in weights if name.count(".") >= 2)
    found.discard(str(variant))
    if not found:
        return None
    names = ", ".join(sorted(found))
    current = "not set" if variant is None else f"{variant!r}"
    return (
        f"the weights in {str(folder)!r} are stored as variant(s) {names} (files named *.{sorted(found)[0]}.safetensors) "
        f"and diffusion.variant is {current}: set diffusion.variant={sorted(found)[0]}"
    )


def _vae_class(folder: Path) -> type:
    """The VAE class named in vae/config.json: AutoencoderKL for SD, SpaceToDepthAutoencoder for shapes."""
    import diffusers

    from conceptdistill.diffusion.latent import SpaceToDepthAutoencoder

    name = json.loads((folder / "vae" / "config.json").read_text()).get("_class_name", "AutoencoderKL")
    if name == SpaceToDepthAutoencoder.__name__:
        return SpaceToDepthAutoencoder
    cls = getattr(diffusers, name, None)
    if cls is None:
        raise ValueError(f"unknown VAE class {name!r} in {folder / 'vae' / 'config.json'}")
    return cls


def load_diffusion_parts(
    source: str | os.PathLike,
    *,
    revision: str | None = None,
    variant: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    local_files_only: bool = True,
    settings: dict | None = None,
) -> DiffusionParts:
    """Load a diffusion model's parts from a diffusers-layout folder or cached hub id, as the `DiffusionParts`
    subclass of its family (SD 1.x/2.x, SDXL, SD3 / 3.5, FLUX: model_index.json's pipeline class).

    SD 1.x/2.x parts are loaded one by one with their own classes (the VAE and scheduler classes from their
    configs' ``_class_name``, so the shapes world's own latent loads too); the other families through their
    stock diffusers pipeline's `from_pretrained`, leaving out SD3's T5 encoder when `settings` says
    ``text_encoder_3: false``. ``local_files_only=False`` lets huggingface_hub fetch a missing hub snapshot; the
    project never passes it (no machine it runs on may download weights). `settings` are the family's options
    (diffusion.options: max_sequence_length, guidance, ...), kept on the parts.

    With ``dtype=torch.float16`` the VAE is kept in float32 when its config asks for it (``force_upcast``,
    true by default; the SD 2.x and SDXL VAEs overflow in half precision), as diffusers' pipelines do.

    Raises:
        ModelNotFoundError: when the folder or cached snapshot is missing or lacks a part, or a part's weights
            cannot be read; the message says what layout is expected and how to provide the weights (for a
            folder holding only ``*.<variant>.safetensors`` files: which ``diffusion.variant`` to set).
        UnsupportedModelError: a pipeline class no family supports, a prediction type other than epsilon or
            v_prediction, or a scheduler that is not the family's noise process; the message names what was found.
    """
    source = str(source)
    settings = dict(settings or {})
    folder = _resolve_source(source, revision, local_files_only)
    family = _family(folder, source)
    family.check_options(settings)
    if family is not DiffusionParts:
        return _load_with_pipeline(family, folder, source, variant=variant, dtype=dtype, settings=settings).to(device)
    _check_layout(folder, source)
    scheduler_cls = _check_scheduler(folder)
    import diffusers
    from transformers import CLIPTextModel, CLIPTokenizer

    # From here on everything is a local folder: no hub look-ups, whatever the environment says.
    common = {"local_files_only": True}
    vae_dtype = torch.float32 if dtype == torch.float16 and _vae_config(folder).get("force_upcast", True) else dtype
    try:
        unet = diffusers.UNet2DConditionModel.from_pretrained(
            folder, subfolder="unet", torch_dtype=dtype, variant=variant, **common
        )
        vae = _vae_class(folder).from_pretrained(
            folder, subfolder="vae", torch_dtype=vae_dtype, variant=variant, **common
        )
        text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", dtype=dtype, variant=variant, **common)
        tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer", **common)
        scheduler = scheduler_cls.from_pretrained(folder, subfolder="scheduler", **common)
    except OSError as err:  # diffusers/transformers raise OSError (EnvironmentError) for missing weight files
        raise _unreadable(folder, source, variant, err) from err
    parts = DiffusionParts(denoiser=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
                           settings=settings)
    return parts.to(device=device)


def _vae_config(folder: Path) -> dict:
    return json.loads((folder / "vae" / "config.json").read_text())


def _unreadable(folder: Path, source: str, variant: str | None, err: Exception) -> ModelNotFoundError:
    hint = _variant_hint(folder, variant)
    return _not_found(source, hint or f"a part could not be read from {str(folder)!r} ({err})")


def _load_with_pipeline(
    family: type[DiffusionParts], folder: Path, source: str, *, variant: str | None, dtype: torch.dtype,
    settings: dict,
) -> DiffusionParts:
    """Load an SDXL, SD3 or FLUX folder with the family's stock diffusers pipeline and keep its components."""
    import diffusers

    subfolders = family.components(settings)
    _check_layout(folder, source, subfolders)
    _check_scheduler(folder, family)
    skipped = dict.fromkeys(family.optional_components(settings))  # e.g. SD3 without T5: not read from disk
    try:
        pipeline = getattr(diffusers, family.pipeline_class).from_pretrained(
            folder, dtype=dtype, variant=variant, local_files_only=True, **skipped
        )
    except OSError as err:
        raise _unreadable(folder, source, variant, err) from err
    if dtype == torch.float16 and pipeline.vae.config.get("force_upcast", True):
        pipeline.vae.to(dtype=torch.float32)
    parts = family(
        denoiser=getattr(pipeline, family.denoiser_name), vae=pipeline.vae, scheduler=pipeline.scheduler,
        **{name: getattr(pipeline, name, None) for name in (
            "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3")},
        settings=settings,
    )
    if "force_zeros_for_empty_prompt" in pipeline.config:
        parts.settings.setdefault("force_zeros_for_empty_prompt", bool(pipeline.config.force_zeros_for_empty_prompt))
    return parts


def save_diffusion_parts(parts: DiffusionParts, folder: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write `parts` as a diffusers-layout folder that `load_diffusion_parts` reads back.

    SDXL, SD3 and FLUX parts are written by their stock pipeline's `save_pretrained`. SD parts with an
    AutoencoderKL are a stock `StableDiffusionPipeline` save (no safety checker), so
    ``StableDiffusionPipeline.from_pretrained(folder)`` loads it too. With the space-to-depth latent the parts
    are written one by one plus a model_index.json naming our VAE class by its module path.

    The folder is assembled beside the target and renamed into place, so an interrupted save never leaves a
    half-written model where a resumed run would take it for a finished one.
    """
    from diffusers import AutoencoderKL, StableDiffusionPipeline

    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()) and not overwrite:
        raise FileExistsError(f"{folder} exists and is not empty (pass overwrite=True to replace it)")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".partial"))
    try:
        if hasattr(parts, "stock_pipeline"):  # SDXL, SD3, FLUX: the family's stock pipeline writes the folder
            parts.stock_pipeline().save_pretrained(staging)
        elif isinstance(parts.vae, AutoencoderKL):
            pipeline = StableDiffusionPipeline(
                vae=parts.vae,
                text_encoder=parts.text_encoder,
                tokenizer=parts.tokenizer,
                unet=parts.denoiser,
                scheduler=parts.scheduler,
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            )
            pipeline.save_pretrained(staging)
        else:
            _save_parts_individually(parts, staging)
        _drop_load_paths(staging)
        if folder.exists():
            trash = folder.with_name(f".{folder.name}.old")
            shutil.rmtree(trash, ignore_errors=True)
            folder.rename(trash)
            staging.rename(folder)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            staging.rename(folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def _drop_load_paths(folder: Path) -> None:
    """Remove the "_name_or_path" that diffusers keeps in a loaded model's config and writes back on save:
    it is where the model was read from on one machine (an absolute path), not a property of the model."""
    for config in folder.glob("*/config.json"):
        values = json.loads(config.read_text())
        if values.pop("_name_or_path", None) is not None:
            config.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")


def _library_and_class(obj: Any) -> list[str]:
    """The [library, class] pair diffusers records in model_index.json for a component."""
    module = type(obj).__module__
    top = module.split(".")[0]
    # diffusers/transformers classes are found by top-level package; our own by full module path.
    return [top if top in ("diffusers", "transformers") else module, type(obj).__name__]


def _save_parts_individually(parts: DiffusionParts, folder: Path) -> None:
    import diffusers

    parts.denoiser.save_pretrained(folder / "unet")
    parts.vae.save_pretrained(folder / "vae")
    parts.text_encoder.save_pretrained(folder / "text_encoder")
    parts.tokenizer.save_pretrained(folder / "tokenizer")
    parts.scheduler.save_pretrained(folder / "scheduler")
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "image_encoder": [None, None],
    }
    for name in SUBFOLDERS:
        index[name] = _library_and_class(parts.denoiser if name == "unet" else getattr(parts, name))
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
