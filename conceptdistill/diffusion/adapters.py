"""What fine-tuning changes in a denoiser (UNet or transformer), and the files it is saved as (next to the
loader, diffusion/loading.py).

Adapters (config `finetune.module.adapter`):
- ``lora``: peft LoRA on the denoiser's attention projections; saved as one diffusers LoRA file
  (`pytorch_lora_weights.safetensors`, written by the family's stock pipeline class, so that pipeline's
  `load_lora_weights` loads it: StableDiffusion(XL)Pipeline, StableDiffusion3Pipeline, FluxPipeline);
- ``full``: every denoiser weight; saved as a whole `unet/` or `transformer/` folder;
- ``inpaint9``: LoRA plus a UNet input widened to noisy latent + mask + masked latent (the new input weights
  zero-initialised); saved as a whole `unet/` folder with the LoRA merged in, so the folder stands alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from conceptdistill.diffusion.parts import DiffusionParts


LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
ADAPTERS = ("lora", "full", "inpaint9")


class NonFiniteLossError(FloatingPointError):
    """A training loss (or the weights it moved) became NaN or inf; raised with the step and the sample ids."""


def widen_unet_input(unet, extra_channels: int) -> None:
    """Give the UNet `extra_channels` more input channels whose weights start at zero, so the widened
    model computes exactly what the original did until training moves them."""
    old = unet.conv_in
    new = torch.nn.Conv2d(
        old.in_channels + extra_channels, old.out_channels, old.kernel_size, old.stride, old.padding,
        device=old.weight.device, dtype=old.weight.dtype,
    )
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, : old.in_channels] = old.weight
        new.bias.copy_(old.bias)
    unet.conv_in = new
    unet.register_to_config(in_channels=new.in_channels)


def add_adapter(unet, adapter: str, *, rank: int, alpha: float, targets: tuple[str, ...], seed: int) -> None:
    """Make the weights `adapter` trains trainable (and only those), in float32 even when the frozen base is
    half precision (diffusers' `cast_training_params`). `unet` is the denoiser (a UNet or a transformer).

    Raises:
        ValueError: naming `finetune.module.adapter` for an adapter not in ADAPTERS, or ``inpaint9`` for a transformer.
    """
    if adapter not in ADAPTERS:
        raise ValueError(f"finetune.module.adapter={adapter!r}: choose one of {ADAPTERS}")
    if adapter == "inpaint9" and not hasattr(unet, "conv_in"):
        raise ValueError(f"finetune.module.adapter=inpaint9 widens a UNet's input; this {type(unet).__name__} has "
                         "none: use finetune=lora or finetune=full")
    from diffusers.training_utils import cast_training_params

    if adapter == "full":
        # Every weight trains: float32 master weights even when the model was loaded in half precision (AdamW's
        # small updates vanish in float16/bfloat16; mixed precision runs the forward in half precision anyway).
        unet.requires_grad_(True)
        cast_training_params(unet, dtype=torch.float32)
        return
    from peft import LoraConfig

    unet.requires_grad_(False)
    if adapter == "inpaint9":
        widen_unet_input(unet, unet.config.in_channels + 1)
    # LoRA's random init is seeded by the run seed (and leaves the caller's RNG stream alone).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet.add_adapter(
            LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(targets))
        )
    if adapter == "inpaint9":
        unet.conv_in.requires_grad_(True)
    cast_training_params(unet, dtype=torch.float32)


def save_finetuned(parts: DiffusionParts, adapter: str, folder: str | Path) -> Path:
    """Write what `adapter` trained of `parts.denoiser` into `folder`; returns the LoRA file or the
    `unet/` / `transformer/` folder.

    Raises:
        NonFiniteLossError: when any weight holds NaN or inf (such weights are never exported; the run's
            checkpoints stay for inspection).
    """
    folder = Path(folder)
    denoiser, name = parts.denoiser, parts.denoiser_name
    broken = [key for key, p in denoiser.named_parameters() if not torch.isfinite(p).all()]
    if broken:
        raise NonFiniteLossError(f"{len(broken)} fine-tuned weight tensor(s) hold NaN or inf (e.g. {broken[0]}); "
                                 "not saving them")
    folder.mkdir(parents=True, exist_ok=True)
    if adapter == "lora":
        import diffusers
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(denoiser))
        # The adapter's config (rank, lora_alpha, targets) travels as safetensors metadata: without it loaders
        # assume lora_alpha == rank and a model trained with lora_alpha != lora_rank comes back scaled wrongly.
        metadata = denoiser.peft_config["default"].to_dict()
        getattr(diffusers, parts.pipeline_class).save_lora_weights(
            folder, safe_serialization=True, **{f"{name}_lora_layers": layers, f"{name}_lora_adapter_metadata": metadata}
        )
        return folder / LORA_WEIGHTS
    if adapter == "inpaint9":
        denoiser.fuse_lora()
        denoiser.unload_lora()
    denoiser.save_pretrained(folder / name, safe_serialization=True)
    return folder / name


def load_finetuned(parts: DiffusionParts, folder: str | Path) -> DiffusionParts:
    """Apply what `save_finetuned` wrote to a freshly loaded `DiffusionParts` set (in place); returns it.

    Raises:
        FileNotFoundError: when `folder` holds neither a LoRA file nor a `unet/` / `transformer/` folder.
    """
    folder = Path(folder)
    name = parts.denoiser_name
    if (folder / LORA_WEIGHTS).exists():
        parts.denoiser.load_lora_adapter(str(folder), weight_name=LORA_WEIGHTS, prefix=name, adapter_name="concept")
        parts.denoiser.fuse_lora()
    elif (folder / name / "config.json").exists():
        denoiser = type(parts.denoiser).from_pretrained(folder / name, torch_dtype=parts.dtype)
        parts.denoiser = denoiser.to(parts.device).eval()
    else:
        raise FileNotFoundError(
            f"no fine-tuned weights in {folder}: expected {LORA_WEIGHTS} or {name}/. Run the finetune stage first "
            "(stages=[finetune]) or point the run at a run folder where it finished."
        )
    return parts
