"""The attention masker (docs/METHOD.md, stage 1): images -> cross-attention map A and preliminary mask M_pre.

For every image: encode it; for each timestep of the grid (T steps, from the T0-th down to the last) noise
the clean latent afresh and run one conditional UNet pass with the foreground prompt while a capturing
processor averages the concept token(s)' cross-attention over heads, layers and steps into one map A.
A GMM-midpoint threshold and a majority filter turn A into the mask M_pre (latent resolution).

With ``attention_space="output"`` (SD 3 / 3.5, FLUX) A is ConceptAttention's map instead: the concept's words
and the background's content words ride along as concept tokens, and A is the concept's share of the softmax
over them of attention-output similarity (diffusion/concept_attention.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pytorch_lightning as pl
import torch

from conceptdistill.diffusion.attention import AttentionStore, capture_attention
from conceptdistill.diffusion.concept_attention import ConceptAttentionStore, concept_set
from conceptdistill.diffusion.parts import concat_conditioning, register_parts
from conceptdistill.diffusion.sampling import noise_draws
from conceptdistill.maskmath import binarize_map, close_and_fill_holes
from conceptdistill.utils.seeding import sample_generators

if TYPE_CHECKING:
    from conceptdistill.diffusion.parts import DiffusionParts


#: why an image has no M_pre: a NaN/inf latent (e.g. a float16 VAE overflow) makes every map of it NaN
NONFINITE_MAP = "non-finite attention map (its latent or the UNet's activations are NaN or inf)"


class AttentionMaskGenerator(pl.LightningModule):
    """predict_step: a batch ("image" (B, 3, H, W) in [0, 1], "id") -> per image a dict with the attention map A
    ("attention", (h, w) float32 on the latent grid) and M_pre ("mask", (h, w) bool), or "skipped" with the
    reason when A is not finite.

    `attention_space` is "cross" (the concept tokens' attention probability) or "output" (ConceptAttention, MMDiT
    families only; refused here, before any image, for others). For "output" the concepts are the concept's words
    and `background_concepts`, or when that is None the content words of `background_prompt`."""

    def __init__(
        self, parts: DiffusionParts, *, prompt: str, concept: list[str], num_steps: int = 50, start_step: int = 40,
        layers: list[str] | None = None, filter_size: int = 3, polarity: str = "high", fill_holes: bool = False,
        closing_size: int = 3, seed: int = 0, attention_space: str = "cross", background_prompt: str | None = None,
        background_concepts: list[str] | None = None, timesteps_per_call: int = 1,
    ) -> None:
        super().__init__()
        if int(timesteps_per_call) < 1:
            raise ValueError(f"masks.module.timesteps_per_call={timesteps_per_call}: must be at least 1")
        # several timesteps in one denoiser call: a bigger batch keeps a GPU busier; the maps stay the same
        self.timesteps_per_call = int(timesteps_per_call)
        self.parts = parts
        register_parts(self, parts)
        self.prompt = prompt
        parts.check_attention_space(attention_space)
        self.token_indices = parts.concept_token_indices(prompt, concept)
        self.attention_space = attention_space
        self.concepts: list[str] = [concept] if isinstance(concept, str) else [str(word) for word in concept]
        self.foreground = len(self.concepts)
        if attention_space == "output":
            self.concepts = concept_set(self.concepts, background_prompt, background_concepts)
            for word in self.concepts:  # a word the tokenizer gives no token fails here, before any image
                if not parts.concept_stream_positions(word):
                    raise ValueError(f"concept {word!r} has no token in the text sequence its concept token is taken from")
        self.num_steps, self.start_step = num_steps, start_step
        # a grid that cannot work fails here, before any image (flow models shift it by image size: see below)
        parts.attention_timesteps(num_steps, start_step, parts.latent_shape_for(parts.native_image_size))
        self.layers = list(layers) if layers else None
        self.filter_size = filter_size
        self.polarity = polarity
        self.fill_holes, self.closing_size = fill_holes, closing_size
        self.seed = seed

    @torch.no_grad()
    def attention_maps(
        self, images: torch.Tensor, ids: list[str], *, per_layer: bool = False
    ) -> tuple[torch.Tensor, AttentionStore]:
        """A for each image (B, h, w) at latent resolution, and the store (with `per_layer`, it also keeps
        each layer's own mean, for diagnostics)."""
        latents = self.parts.encode_images(images.to(self.device))
        cond = self.parts.encode_prompts([self.prompt] * len(ids))
        if self.attention_space == "output":
            store = ConceptAttentionStore(self.parts.concept_token_states(self.concepts), self.foreground,
                                          tuple(latents.shape[-2:]), layers=self.layers, per_layer=per_layer)
        else:
            store = AttentionStore(self.token_indices, tuple(latents.shape[-2:]), layers=self.layers, per_layer=per_layer)
        generators = sample_generators(self.seed, ids, "masks")
        extra = None
        if self.parts.denoiser_in_channels > latents.shape[1]:  # a 9-channel UNet: "repaint everything"
            extra = torch.cat([torch.ones_like(latents[:, :1]), torch.zeros_like(latents)], dim=1)
        timesteps = self.parts.attention_timesteps(self.num_steps, self.start_step, tuple(latents.shape[1:]))
        timesteps = timesteps.to(self.device)
        # a fresh noise draw per step and sample, in step order (so the maps do not depend on
        # `timesteps_per_call`), all drawn on the generators' device first and moved in one copy: a copy per
        # step would make a GPU wait for the host before every pass
        noises = noise_draws(len(timesteps), generators, tuple(latents.shape[1:]), self.device, latents.dtype)
        steps = max(1, int(self.timesteps_per_call))
        with capture_attention(self.parts, store):
            for first in range(0, len(timesteps), steps):
                noisy, timestep = [], []  # the denoiser's prediction itself is not needed
                for t, noise in zip(timesteps[first : first + steps], noises[first : first + steps], strict=True):
                    timestep.append(t.expand(len(ids)))
                    noisy.append(self.parts.add_noise(latents, noise, timestep[-1]))  # the model's forward process
                store.steps_per_call = len(noisy)  # the batch is step-major: len(noisy) copies of the images
                self.parts.predict(torch.cat(noisy), torch.cat(timestep), concat_conditioning(*[cond] * len(noisy)),
                                   None if extra is None else torch.cat([extra] * len(noisy)))
        return store.mean().float(), store

    def binarize(self, attention: np.ndarray) -> np.ndarray:
        """M_pre of one map: GMM-midpoint threshold and majority filter (empty, with a warning, if degenerate),
        then optionally closing + hole filling (a map that lights up an object's outline gives a ring)."""
        mask = binarize_map(attention, filter_size=self.filter_size, seed=self.seed, polarity=self.polarity)[0]
        return close_and_fill_holes(mask, self.closing_size) if self.fill_holes else mask

    def predict_step(self, batch: dict, batch_index: int = 0) -> list[dict]:
        maps, _ = self.attention_maps(batch["image"], batch["id"])
        return [
            {"id": sample_id, "attention": attention, "mask": self.binarize(attention)} if np.isfinite(attention).all()
            else {"id": sample_id, "skipped": NONFINITE_MAP}
            for sample_id, attention in zip(batch["id"], maps.cpu().numpy(), strict=True)
        ]
