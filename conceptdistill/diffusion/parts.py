"""`DiffusionParts`: the parts of a latent text-to-image diffusion model (denoiser, VAE, text encoders,
tokenizers, noise scheduler) with the conversions every stage needs: pixels <-> scaled latents, prompts ->
conditioning, the forward noising process and training target, the denoiser call, and the samplers' grids.

This base class is the Stable Diffusion 1.x/2.x family (a UNet, one CLIP text encoder, a variance-preserving
noise process predicting epsilon or v). Other families subclass it where they differ and are registered by
the name their diffusers pipeline class has (diffusion/families/): SDXL, Stable Diffusion 3 / 3.5 and FLUX.
Stages only use the methods here, never a family's own parts, so every stage runs every family.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

#: pipeline class name (model_index.json's `_class_name`) -> DiffusionParts subclass; filled by `register_family`
FAMILIES: dict[str, type[DiffusionParts]] = {}


def register_family(*pipeline_classes: str):
    """Class decorator: the family loads folders whose model_index.json names one of `pipeline_classes`."""

    def register(cls: type[DiffusionParts]) -> type[DiffusionParts]:
        for name in pipeline_classes:
            FAMILIES[name] = cls
        return cls

    return register


#: a text conditioning: batch-first tensors the denoiser takes besides latents and time (names per family)
Conditioning = dict[str, torch.Tensor]


def concat_conditioning(*conds: Conditioning) -> Conditioning:
    """Stack conditionings along the batch axis (the two branches of classifier-free guidance)."""
    return {key: torch.cat([c[key] for c in conds]) for key in conds[0]}


@register_family("StableDiffusionPipeline", "StableDiffusionInpaintPipeline")
@dataclass
class DiffusionParts:
    """The parts of a latent text-to-image diffusion model, plus the conversions all stages share.

    Component names follow diffusers' pipelines (`text_encoder_2`, `tokenizer_3`, ...); a family uses the ones
    its pipeline has and leaves the others None. `settings` holds the family's options from the `diffusion`
    config group (e.g. `max_sequence_length`). The helpers run without gradient tracking: the VAE and text
    encoders are frozen in every stage of the method (only the denoiser is fine-tuned).
    """

    denoiser: Any  # diffusers UNet2DConditionModel (SD, SDXL) or transformer (SD3, FLUX)
    vae: Any  # diffusers.AutoencoderKL or SpaceToDepthAutoencoder
    text_encoder: Any
    tokenizer: Any
    scheduler: Any
    text_encoder_2: Any = None
    tokenizer_2: Any = None
    text_encoder_3: Any = None
    tokenizer_3: Any = None
    settings: dict = field(default_factory=dict)

    #: family name used in messages, configs and the README's table
    family: ClassVar[str] = "sd"
    #: the stock diffusers pipeline class of this family (LoRA export and loading go through it)
    pipeline_class: ClassVar[str] = "StableDiffusionPipeline"
    #: the denoiser's folder and LoRA key prefix in diffusers' layout
    denoiser_name: ClassVar[str] = "unet"
    #: the family's forward process: "vp" (variance preserving, DDPM) or "flow" (rectified flow matching)
    noise_process: ClassVar[str] = "vp"
    #: where stage 1 may read the concept's maps (`masks.module.attention_space`): "cross", the probability image
    #: positions give the concept's text tokens (every family); "output", ConceptAttention's attention-output
    #: similarity (the MMDiT families, diffusion/concept_attention.py)
    attention_spaces: ClassVar[tuple[str, ...]] = ("cross",)

    #: the `diffusion.options` this family reads, with their checks (option -> (description of valid values, test))
    OPTIONS: ClassVar[dict[str, tuple[str, Any]]] = {}

    @classmethod
    def check_options(cls, settings: dict) -> None:
        """Refuse unknown or invalid `diffusion.options` before anything is loaded (a misspelt option would
        otherwise be ignored and the model run with its default).

        Raises:
            SettingsError: naming the option and what is valid.
        """
        from conceptdistill.checks import SettingsError

        for key, value in settings.items():
            if key not in cls.OPTIONS:
                known = ", ".join(sorted(cls.OPTIONS)) or "none"
                raise SettingsError(f"diffusion.options.{key}: not an option of {cls.family} models (options: {known})")
            valid, test = cls.OPTIONS[key]
            if not test(value):
                raise SettingsError(f"diffusion.options.{key}={value!r}: must be {valid} for {cls.family} models")

    @classmethod
    def optional_components(cls, settings: dict) -> tuple[str, ...]:
        """Components the settings leave out: not loaded, even when their folders are on disk."""
        return ()

    @classmethod
    def components(cls, settings: dict | None = None) -> tuple[str, ...]:
        """The subfolders a model folder of this family must have (given its settings)."""
        return ("unet", "vae", "text_encoder", "tokenizer", "scheduler")

    # ----- devices, precision and shapes -----------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.denoiser.device

    @property
    def dtype(self) -> torch.dtype:
        return self.denoiser.dtype

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        """The loaded text encoders (a family's optional encoder left out is not listed)."""
        return [m for m in (self.text_encoder, self.text_encoder_2, self.text_encoder_3) if m is not None]

    @property
    def latent_scale(self) -> float:
        """Multiplier applied to VAE latents before they enter the denoiser (0.18215 for SD 1.x)."""
        return float(self.vae.config.scaling_factor)

    @property
    def latent_shift(self) -> float:
        """Subtracted from VAE latents before scaling (SD3 and FLUX VAEs set `shift_factor`; 0 otherwise)."""
        return float(getattr(self.vae.config, "shift_factor", None) or 0.0)

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell along each side (8 for SD), computed as diffusers pipelines do."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_multiple(self) -> int:
        """Latent sides must be multiples of this (2 for transformers that cut latents into 2x2 patches)."""
        return 1

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def denoiser_in_channels(self) -> int:
        """Denoiser input channels: latent_channels, or more for an inpainting UNet (latent + mask + masked latent)."""
        return int(self.denoiser.config.in_channels)

    @property
    def native_image_size(self) -> int:
        """The image side the denoiser was configured for (its sample_size x vae_scale_factor: 512 for SD 1.x,
        768 for SD 2.1-v, 1024 for SDXL, SD3 and FLUX). Informational only: stages derive shapes from latents."""
        size = getattr(self.denoiser.config, "sample_size", None) or 128
        return int(size if isinstance(size, int) else size[0]) * self.vae_scale_factor

    def latent_shape_for(self, image_size: int) -> tuple[int, int, int]:
        """(C, H, W) of the latent of a square `image_size` image (4x64x64 for SD 1.x at 512 px).

        Raises:
            ValueError: naming `data.image_size` when the VAE and denoiser cannot take it.
        """
        check_image_size(self, image_size)
        side = int(image_size) // self.vae_scale_factor
        return (self.latent_channels, side, side)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> DiffusionParts:
        """Move (and optionally cast) the networks in place; returns self for chaining."""
        # Only pass what is given: diffusers' ModelMixin.to warns whenever a dtype keyword is present.
        kwargs = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
        for module in (self.denoiser, self.vae, *self.text_encoders):
            module.to(**kwargs)
        return self

    # ----- pixels <-> latents ------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(
        self, images: torch.Tensor, *, sample: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """(B, 3, H, W) images in [0, 1] -> scaled latents (B, C, H/f, W/f) on the denoiser's device and dtype:
        (z - shift_factor) * scaling_factor, as diffusers' pipelines and training scripts do.

        Uses the posterior mean unless ``sample=True`` (which draws from it, as SD's training scripts do).
        """
        x = images.to(device=self.vae.device, dtype=self.vae.dtype) * 2.0 - 1.0
        dist = self.vae.encode(x).latent_dist
        latents = dist.sample(generator=generator) if sample else dist.mode()
        latents = (latents - self.latent_shift) * self.latent_scale
        return latents.to(device=self.device, dtype=self.dtype)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> (B, 3, H, W) float32 images in [0, 1]."""
        z = latents.to(device=self.vae.device, dtype=self.vae.dtype) / self.latent_scale + self.latent_shift
        images = self.vae.decode(z).sample
        return ((images.float() + 1.0) / 2.0).clamp(0.0, 1.0)

    # ----- text -------------------------------------------------------------------------------------------
    def tokenize(self, prompts: list[str] | str) -> torch.Tensor:
        """Token ids (B, model_max_length), padded and truncated as Stable Diffusion does."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        return self.tokenizer(
            prompts, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True,
            return_tensors="pt",
        ).input_ids

    def encode_prompts(self, prompts: list[str] | str, *, grad: bool = False) -> Conditioning:
        """Prompts -> the denoiser's text conditioning. SD: {"encoder_hidden_states": (B, 77, D)}, the CLIP text
        encoder's last hidden state. Without gradients unless `grad` (only the shapes world trains its encoder)."""
        ids = self.tokenize(prompts).to(self.text_encoder.device)
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            embeddings = self.text_encoder(ids)[0]
        return {"encoder_hidden_states": embeddings.to(device=self.device, dtype=self.dtype)}

    def cached_conditioning(self, prompts: list[str] | str, encode_one) -> Conditioning:
        """`encode_one(prompt) -> Conditioning` (batch of one) for each distinct prompt once, then from a cache:
        the families whose text encoders are always frozen (the method uses a handful of prompts; T5-XXL costs
        more than the denoiser pass it conditions). Tensors come back on the denoiser's device and dtype."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        cache = self.__dict__.setdefault("_prompt_cache", {})
        for prompt in dict.fromkeys(prompts):
            if prompt not in cache:
                cache[prompt] = {key: value.detach() for key, value in encode_one(prompt).items()}
        return {
            key: torch.cat([cache[p][key] for p in prompts]).to(device=self.device, dtype=self.dtype)
            for key in cache[prompts[0]]
        }

    def denoiser_constant(self, key: tuple, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        """A small denoiser input that depends only on `key` (size, device, dtype: SDXL's time ids, FLUX's
        position ids), made by `make()` once: made from host numbers per call, it would be a host-to-GPU copy
        before every pass, which waits until the device has finished all the work queued before it."""
        cache = self.__dict__.setdefault("_denoiser_constants", {})
        if key not in cache:
            cache[key] = make()
        return cache[key]

    def capturing_processors(self, store) -> dict[str, tuple[Any, Any]]:
        """{layer name: (attention module, capturing processor)} for the text-attention layers `store` wants:
        a UNet's cross-attention (attn2) layers (diffusion/processors.py)."""
        from conceptdistill.diffusion.processors import unet_capturing_processors

        return unet_capturing_processors(self.denoiser, store)

    def check_attention_space(self, space: str) -> None:
        """Raise ValueError naming `masks.module.attention_space` (and this family) unless this family's maps
        can be read in `space`."""
        if space not in ("cross", "output"):
            raise ValueError(f"masks.module.attention_space={space!r}: choose cross (cross-attention "
                             "probabilities) or output (ConceptAttention, SD 3 / 3.5 and FLUX)")
        if space not in self.attention_spaces:
            raise ValueError(
                f"masks.module.attention_space={space} needs an MMDiT with a text stream (SD 3 / 3.5, FLUX), but this "
                f"model is of the {self.family} family ({type(self.denoiser).__name__}), which has cross-attention "
                "only: use masks.module.attention_space=cross"
            )

    def concept_token_indices(self, prompt: str, words: str | list[str]) -> list[int]:
        """Positions of the concept word(s) in the text sequence the denoiser attends to (see
        diffusion/tokenizer.py's whole-word rule); raises ValueError naming the word when it is not a whole word
        of the prompt in every tokenizer whose tokens enter attention."""
        from conceptdistill.diffusion.tokenizer import concept_token_indices

        return concept_token_indices(self.tokenizer, prompt, words)

    # ----- the denoiser -------------------------------------------------------------------------------------
    def predict(
        self, latents: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning,
        extra_input: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The denoiser's output for noisy latents (B, C, h, w) at `timesteps` (B,) in the scheduler's units
        (integers for VP families, sigma x 1000 for flow matching); same shape as `latents`. `extra_input`
        (mask + masked latent, B x (1 + C) x h x w) is concatenated on channels for 9-channel UNets."""
        model_input = latents if extra_input is None else torch.cat([latents, extra_input], dim=1)
        return self.denoiser(model_input, timesteps, encoder_hidden_states=cond["encoder_hidden_states"]).sample

    # ----- the forward (noising) process and the training target ----------------------------------------
    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    @property
    def prediction_type(self) -> str:
        """What the denoiser predicts: "epsilon", "v_prediction" or "flow" (checked when the model is loaded)."""
        return str(self.scheduler.config.get("prediction_type", "epsilon"))

    @property
    def noise_scheduler(self):
        """The model's variance-preserving forward process as a diffusers `DDPMScheduler` built from the
        folder's scheduler config (betas, timestep count, prediction type).

        Folders ship PNDM, DDIM, Euler, LMS or DPM-Solver configs; they share the training noise schedule but
        not `add_noise`: Euler-family schedulers noise as x0 + sigma * eps and expect `scale_model_input`
        before the UNet. Noising for attention capture and for the training loss must be the process the UNet
        was trained on, x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps (DDPM, Ho et al. 2020),
        whatever class the folder names, so it always goes through this scheduler.
        """
        cached = self.__dict__.get("_noise_scheduler")
        if cached is None or cached[0] is not self.scheduler:
            from diffusers import DDPMScheduler

            cached = (self.scheduler, DDPMScheduler.from_config(self.scheduler.config))
            self.__dict__["_noise_scheduler"] = cached
        return cached[1]

    def training_timesteps(self, generators: list[torch.Generator]) -> torch.Tensor:
        """One training time per sample, uniform over the model's training grid, from the sample's generator:
        (B,) int64 in [0, num_train_timesteps) on the denoiser's device."""
        from conceptdistill.utils.seeding import per_sample_randint

        return per_sample_randint(generators, self.num_train_timesteps).to(self.device)

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_t of the forward process for clean latents (B, C, h, w), standard normal noise of the same shape
        and timesteps (B,) in the scheduler's units; same dtype and device as `latents`."""
        return self.noise_scheduler.add_noise(latents, noise, timesteps.to(latents.device))

    def training_target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the denoiser output is regressed on: the noise (epsilon prediction) or the velocity
        v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x0 (v-prediction, Salimans & Ho 2022), by diffusers'
        `get_velocity`. Shapes as in `add_noise`."""
        if self.prediction_type == "epsilon":
            return noise
        return self.noise_scheduler.get_velocity(latents, noise, timesteps.to(latents.device))

    # ----- samplers -----------------------------------------------------------------------------------------
    def sampler(self, steps: int, latent_shape: tuple[int, ...], setting: str = "num_steps"):
        """A deterministic sampler over `steps` steps with the model's own schedule: DDIM (eta 0) for VP families.
        Its grid stays on the host (every family): the loops move it to the device once (sampling.py).

        Raises:
            SettingsError: naming `setting` when the grid does not fit the model's timesteps.
        """
        from diffusers import DDIMScheduler

        from conceptdistill.checks import SettingsError, check_grid_range

        total = self.num_train_timesteps
        if not 1 <= int(steps) <= total:
            raise SettingsError(f"{setting}={steps}: a sampler grid needs 1 to {total} steps (the model's training timesteps)")
        scheduler = DDIMScheduler.from_config(self.scheduler.config)
        scheduler.set_timesteps(int(steps))
        check_grid_range(scheduler.timesteps, total, setting)
        return scheduler

    def attention_timesteps(self, num_steps: int, start_step: int, latent_shape: tuple[int, ...]) -> torch.Tensor:
        """The timesteps at which stage 1 reads attention: the last `start_step` of the `num_steps` sampler grid
        (for SD's 1000-step schedule, T=50 and T0=40: 781, 761, ..., 1), on the host.

        Raises:
            ValueError: naming `masks.module.num_steps` / `masks.module.start_step` unless
                1 <= start_step <= num_steps <= the model's number of training timesteps.
        """
        from conceptdistill.checks import check_timestep_grid

        check_timestep_grid(num_steps, start_step, self.num_train_timesteps)
        grid = self.sampler(num_steps, latent_shape, setting="masks.module.num_steps")
        return grid.timesteps[num_steps - start_step :].clone()

    def sampler_input(self, scheduler, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The latents as the denoiser takes them at step `t` (schedulers that scale their input do it here)."""
        return scheduler.scale_model_input(latents, t)

    def sampler_step(self, scheduler, output: torch.Tensor, t: torch.Tensor, latents: torch.Tensor, *, last: bool):
        """One sampler step; the last one returns the predicted clean latent (a DDIM grid whose final alpha is
        below one would otherwise leave a little noise in every sample and every inpainted region)."""
        result = scheduler.step(output, t, latents)
        return result.pred_original_sample if last else result.prev_sample

    def renoise(self, scheduler, clean: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Clean latents noised to the level of sampler step `t` (latent blending in inpainting)."""
        return scheduler.add_noise(clean, noise, t.reshape(1))


def register_parts(module: torch.nn.Module, parts: DiffusionParts) -> None:
    """Make the parts' networks submodules of a LightningModule, so that Lightning moves them to its device
    (each DDP rank to its own GPU) and `parts.device` follows."""
    module.denoiser = parts.denoiser
    module.vae = parts.vae
    module.text_encoders = torch.nn.ModuleList(parts.text_encoders)


def check_image_size(parts: DiffusionParts, image_size: int) -> None:
    """Raise SettingsError (a ValueError) naming `data.image_size` unless the VAE maps it to a whole latent grid
    (and, for transformers that cut latents into patches, to a whole number of patches)."""
    from conceptdistill.checks import SettingsError

    factor = parts.vae_scale_factor * parts.latent_multiple
    if int(image_size) <= 0 or int(image_size) % factor:
        raise SettingsError(
            f"data.image_size={image_size} is not a positive multiple of {factor} (this {parts.family} model's VAE "
            f"downsampling factor {parts.vae_scale_factor}"
            + (f" times its patch size {parts.latent_multiple}" if parts.latent_multiple > 1 else "")
            + f"): choose e.g. {max(factor, round(int(image_size) / factor) * factor)} (the model's native size is "
            f"{parts.native_image_size})"
        )
