"""Checks of the composed configuration that run before any data is read or any model is loaded.

Each failure is a `SettingsError` whose message names the setting, the value given and the values that are
valid, so that a mistyped override fails in a second instead of after an hour of work.
"""

from __future__ import annotations

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

#: the mask sources stage segment can train a segmenter on (`segment.sources`)
MASK_SOURCES = ("preliminary", "refined", "refined+synthetic", "truth")


class SettingsError(ValueError):
    """A setting has a value this project cannot run with; the message names it and what is valid."""


def check_timestep_grid(num_steps: int, start_step: int, train_timesteps: int | None = None) -> None:
    """The masks stage's grid (T = masks.module.num_steps, T0 = masks.module.start_step): 1 <= T0 <= T, and T at most the
    model's number of training timesteps when that is known.

    Raises:
        SettingsError: naming the setting that is out of range.
    """
    if int(num_steps) < 1 or (train_timesteps is not None and int(num_steps) > train_timesteps):
        limit = f"1 to {train_timesteps} (the model's training timesteps)" if train_timesteps else "at least 1"
        raise SettingsError(f"masks.module.num_steps={num_steps}: the sampler grid T needs {limit} steps (the paper: 50)")
    if not 1 <= int(start_step) <= int(num_steps):
        raise SettingsError(
            f"masks.module.start_step={start_step}: T0 must be between 1 and masks.module.num_steps={num_steps} (the paper: T0=40 "
            "of T=50); it is how many of the grid's steps, counted from the end, are used"
        )


def check_grid_range(timesteps, train_timesteps: int, setting: str) -> None:
    """A sampler grid must stay inside the model's timesteps 0 .. train_timesteps - 1. (A grid of all 1000
    steps with SD's steps_offset=1 reaches timestep 1000, one past the end of the noise schedule.)

    Raises:
        SettingsError: naming `setting` (e.g. "inpaint.module.num_steps").
    """
    values = [int(t) for t in timesteps]
    if values and (max(values) >= train_timesteps or min(values) < 0):
        raise SettingsError(
            f"{setting}={len(values)}: this grid reaches timestep {max(values)}, outside the model's 0..{train_timesteps - 1} "
            f"(its scheduler's steps_offset shifts the grid); use fewer steps (the paper: 50)"
        )


def concept_words(value) -> list[str]:
    """`concept` as a list of words: a plain string (``concept=cat``) is ONE word, never its letters.

    Raises:
        SettingsError: for an empty concept or a non-string entry.
    """
    words = [value] if isinstance(value, str) else list(value) if isinstance(value, (list, tuple, ListConfig)) else None
    if not words or not all(isinstance(w, str) and w.strip() for w in words):
        raise SettingsError(f"concept={value!r}: give one word (concept=bird) or a list of words (concept=[human,arms,legs])")
    return [w.strip() for w in words]


def _inpainter_repaints(cfg: DictConfig) -> bool:
    """Whether `inpaint.module` repaints with the diffusion model (not the M_crop baseline)."""
    from conceptdistill.pipeline.config import inpainter_class

    return OmegaConf.select(cfg, "inpaint.module._target_") is None or inpainter_class(cfg).repaints_with_model


def check_settings(cfg: DictConfig) -> DictConfig:
    """Validate `cfg` and return it with `concept` normalised to a list of words.

    Raises:
        SettingsError: for the first setting that cannot work (timestep grids, step counts, the concept, a GPU
            trainer on a machine without one).
    """
    with open_dict(cfg):
        cfg.concept = concept_words(OmegaConf.to_object(cfg.concept) if OmegaConf.is_config(cfg.concept) else cfg.concept)
    stages = set(cfg.get("stages") or [])
    if "masks" in cfg and stages & {"masks", "synthesize"}:
        check_timestep_grid(cfg.masks.module.num_steps, cfg.masks.module.start_step)
        space = OmegaConf.select(cfg, "masks.module.attention_space")
        if space is not None and space not in ("cross", "output"):
            raise SettingsError(f"masks.module.attention_space={space}: choose cross (cross-attention probabilities, "
                                "the paper) or output (ConceptAttention, SD 3 / 3.5 and FLUX)")
    for key in ("inpaint.module.num_steps", "synthesize.module.num_steps", "finetune.sample_steps"):
        value = OmegaConf.select(cfg, key)
        if key.startswith("inpaint.") and not _inpainter_repaints(cfg):
            continue  # M_crop (inpaint=crop) runs no sampler: its num_steps is ignored
        if value is not None and int(value) < 1:
            raise SettingsError(f"{key}={value}: a sampler needs at least 1 step")
    # Lightning reads max_steps=-1 as "no limit" (then trains for 1000 epochs); 0 fine-tuning steps keep the base
    # model and 0 world steps measure a given model, but 0 segmenter steps would score untrained U-Nets
    for key, least in (("finetune.max_steps", 0), ("segment.max_steps", 1), ("world.max_steps", 0)):
        value = OmegaConf.select(cfg, key)
        if value is not None and int(value) < least:
            raise SettingsError(f"{key}={value}: a training budget is a number of steps, at least {least}")
    for key in ("data.num_train", "data.num_test"):  # the shapes world's split sizes
        value = OmegaConf.select(cfg, key)
        if value is not None and int(value) < 1:
            raise SettingsError(f"{key}={value}: the method needs at least one image in that split")
    samples = OmegaConf.select(cfg, "synthesize.num_samples")
    wants_synthetic = "refined+synthetic" in (OmegaConf.select(cfg, "segment.sources") or [])
    if samples is not None and int(samples) < 1 and wants_synthetic:
        raise SettingsError(f"synthesize.num_samples={samples}: segment source refined+synthetic trains on the "
                            "synthetic set D'_s; draw at least 1 sample or leave that source out of segment.sources")
    sources = OmegaConf.select(cfg, "segment.sources")
    if sources is not None:
        unknown = [s for s in sources if s not in MASK_SOURCES]
        if unknown or not len(sources):
            raise SettingsError(f"segment.sources={list(sources)}: {unknown or 'none given'}; choose from "
                                f"{', '.join(MASK_SOURCES)}")
    image_size = OmegaConf.select(cfg, "data.image_size")
    if image_size is not None and int(image_size) < 1:
        raise SettingsError(f"data.image_size={image_size}: must be a positive number of pixels")
    return cfg


def check_hardware(cfg: DictConfig, stages_to_run) -> None:
    """A GPU trainer needs a GPU: say so (and what to set instead) before any model is loaded.

    Raises:
        SettingsError: naming trainer.accelerator when it asks for a GPU that torch cannot see.
    """
    accelerator = str(OmegaConf.select(cfg, "trainer.accelerator") or "cpu")
    if accelerator in ("gpu", "cuda") and set(stages_to_run) - {"report"}:
        import torch

        if not torch.cuda.is_available():
            raise SettingsError(
                f"trainer.accelerator={accelerator} (trainer=gpu or trainer=ddp, which the Stable Diffusion "
                "experiments set) but this machine has no CUDA GPU that torch can use: add trainer=cpu to run on "
                "the CPU (slow for full-size models), or run on a GPU machine"
            )
