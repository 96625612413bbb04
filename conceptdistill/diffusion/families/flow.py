"""The rectified-flow forward process of SD3 and FLUX (Esser et al. 2024; Lipman et al. 2023), its training
target and its samplers, through diffusers' `FlowMatchEulerDiscreteScheduler`.

x_t = (1 - sigma) x0 + sigma eps with sigma = t / num_train_timesteps in [0, 1]; the transformer predicts the
velocity eps - x0. Timesteps are the scheduler's: sigma x 1000 as floats, on the folder's (shifted) sigma grid.

The paper's grid (T0 = 40 of T = 50 DDIM steps) maps to the last `start_step` steps of the family's own
`num_steps`-step sampler grid (set_timesteps, with the folder's shift; FLUX's resolution-dependent shift mu as
its pipeline computes it): the same fraction of the sampling trajectory, from about sigma = 0.8 x its first
value down to the last step, instead of the same timestep numbers (which mean different noise levels here).
"""

from __future__ import annotations

import torch

from conceptdistill.diffusion.parts import DiffusionParts


def _token_count(value) -> bool:
    """A T5 sequence length the stock pipelines accept: 1 to 512 tokens."""
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 512


class FlowMatchingParts(DiffusionParts):
    """DiffusionParts with the flow-matching forward process; a transformer denoiser cutting latents into
    `patch_size` x `patch_size` patches. Subclassed by the SD3 and FLUX families."""

    noise_process = "flow"
    denoiser_name = "transformer"

    @property
    def prediction_type(self) -> str:
        return "flow"

    @property
    def latent_multiple(self) -> int:
        return int(getattr(self.denoiser.config, "patch_size", 2) or 2)

    def concept_stream_positions(self, word: str) -> list[int]:
        """Positions of `word`'s tokens in the text sequence of `word` encoded on its own, in the part of the
        sequence a concept token is taken from (`concept_token_states`)."""
        return self.concept_token_indices(word, word)

    def concept_token_states(self, words: list[str]) -> torch.Tensor:
        """ConceptAttention's concept tokens (diffusion/concept_attention.py): (len(words), D), one row per word,
        the text state of the word encoded on its own by the family's prompt encoding (cached per word), averaged
        over the word's pieces when the tokenizer cuts it (one token per word, so that each word counts once in
        the softmax over concepts), on the denoiser's device and dtype."""
        states = self.encode_prompts(list(words))["encoder_hidden_states"]
        rows = [states[i, self.concept_stream_positions(word)].float().mean(dim=0) for i, word in enumerate(words)]
        return torch.stack(rows).to(states.dtype)

    def flow_scheduler(self):
        """A fresh `FlowMatchEulerDiscreteScheduler` from the folder's scheduler config (its training grid)."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(self.scheduler.config)

    def training_timesteps(self, generators: list[torch.Generator]) -> torch.Tensor:
        """One training time per sample: a uniform index into the scheduler's training grid (the diffusers
        training scripts' `weighting_scheme="none"`), as (B,) float timesteps = sigma x 1000."""
        grid = self.flow_scheduler().timesteps
        indices = super().training_timesteps(generators).cpu()
        return grid[indices].to(self.device)

    def sigmas(self, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """(B,) timesteps -> (B, 1, 1, 1) sigmas in `like`'s dtype and device."""
        sigma = timesteps.to(device=like.device, dtype=torch.float32) / self.num_train_timesteps
        return sigma.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_t = (1 - sigma) x0 + sigma eps (the scheduler's `scale_noise` formula, for any sigma)."""
        sigma = self.sigmas(timesteps, latents)
        return (1.0 - sigma) * latents + sigma * noise

    def training_target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The flow velocity eps - x0."""
        return noise - latents

    def sampler(self, steps: int, latent_shape: tuple[int, ...], setting: str = "num_steps"):
        """Flow-matching Euler over `steps` steps on the folder's shifted sigma grid (with FLUX's dynamic shift
        mu for this latent size, as its pipeline computes it), ending at sigma 0.

        Raises:
            SettingsError: naming `setting` when `steps` is outside 1..num_train_timesteps.
        """
        from conceptdistill.checks import SettingsError

        if not 1 <= int(steps) <= self.num_train_timesteps:
            raise SettingsError(f"{setting}={steps}: a sampler grid needs 1 to {self.num_train_timesteps} steps")
        scheduler = self.flow_scheduler()
        kwargs = {}
        if scheduler.config.get("use_dynamic_shifting", False):
            from diffusers.pipelines.flux.pipeline_flux import calculate_shift

            patch = self.latent_multiple
            image_tokens = (int(latent_shape[-2]) // patch) * (int(latent_shape[-1]) // patch)
            config = scheduler.config
            kwargs["mu"] = calculate_shift(
                image_tokens, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                config.get("base_shift", 0.5), config.get("max_shift", 1.15),
            )
        scheduler.set_timesteps(int(steps), **kwargs)  # on the host, as DiffusionParts.sampler explains
        return scheduler

    def sampler_input(self, scheduler, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return latents  # flow-matching Euler does not scale its input

    def sampler_step(self, scheduler, output: torch.Tensor, t: torch.Tensor, latents: torch.Tensor, *, last: bool):
        """One Euler step of the flow ODE; the grid ends at sigma 0, so the last step gives the clean latent."""
        return scheduler.step(output, t, latents).prev_sample.to(latents.dtype)

    def renoise(self, scheduler, clean: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.add_noise(clean, noise, t.reshape(1).expand(clean.shape[0]))
