"""SDXL (Podell et al. 2023): a UNet conditioned on two CLIP text encoders' penultimate hidden states
(concatenated on features), the second encoder's pooled projection, and the image's size and crop
("micro-conditioning", six numbers). Noise process and samplers are SD's (variance preserving)."""

from __future__ import annotations

import torch

from conceptdistill.diffusion.parts import Conditioning, DiffusionParts, register_family


@register_family("StableDiffusionXLPipeline", "StableDiffusionXLInpaintPipeline")
class StableDiffusionXLParts(DiffusionParts):
    """SDXL parts: `text_encoder` (CLIP-L), `text_encoder_2` (OpenCLIP-G with projection) and their tokenizers.

    Prompts are encoded by the stock `StableDiffusionXLPipeline.encode_prompt` (the model's own recipe); an
    empty prompt is all zeros when the folder's pipeline config sets `force_zeros_for_empty_prompt` (as SDXL
    base does for its unconditional branch). Text encoders are frozen: embeddings are cached per prompt.
    """

    family = "sdxl"
    pipeline_class = "StableDiffusionXLPipeline"
    OPTIONS = {"force_zeros_for_empty_prompt": ("true or false (default: what the folder's pipeline config says)",
                                                lambda v: isinstance(v, bool))}

    @classmethod
    def components(cls, settings=None):
        return ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")

    def stock_pipeline(self):
        """A `StableDiffusionXLPipeline` over these very modules (no copies), for its prompt encoding."""
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline(
            vae=self.vae, text_encoder=self.text_encoder, text_encoder_2=self.text_encoder_2, tokenizer=self.tokenizer,
            tokenizer_2=self.tokenizer_2, unet=self.denoiser, scheduler=self.scheduler,
            force_zeros_for_empty_prompt=bool(self.settings.get("force_zeros_for_empty_prompt", True)),
        )

    def encode_prompts(self, prompts: list[str] | str, *, grad: bool = False) -> Conditioning:
        """{"encoder_hidden_states": (B, 77, 2048), "text_embeds": (B, 1280)} for SDXL base's sizes."""
        return self.cached_conditioning(prompts, self._encode_one)

    @torch.no_grad()
    def _encode_one(self, prompt: str) -> Conditioning:
        pipe = self.stock_pipeline()
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt, device=self.text_encoder.device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        if prompt == "" and pipe.config.force_zeros_for_empty_prompt:
            embeds, pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
        return {"encoder_hidden_states": embeds, "text_embeds": pooled}

    def concept_token_indices(self, prompt: str, words: str | list[str]) -> list[int]:
        """Positions in the 77-token sequence both CLIP encoders share (their embeddings are concatenated per
        position); the two tokenizers must agree on them."""
        from conceptdistill.diffusion.tokenizer import concept_token_indices

        first = concept_token_indices(self.tokenizer, prompt, words)
        second = concept_token_indices(self.tokenizer_2, prompt, words)
        if first != second:
            raise ValueError(f"the SDXL tokenizers place the concept {words!r} of {prompt!r} differently "
                             f"({first} vs {second}): the folder's tokenizer/ and tokenizer_2/ do not match")
        return first

    def predict(self, latents, timesteps, cond, extra_input=None):
        """The UNet's output with SDXL's added conditioning: pooled text and the time ids
        (original size, crop top-left, target size) = (H, W, 0, 0, H, W) of the image being denoised."""
        height, width = (side * self.vae_scale_factor for side in latents.shape[-2:])
        time_ids = self.denoiser_constant(
            ("time_ids", height, width, latents.device, latents.dtype),
            lambda: torch.tensor([[height, width, 0, 0, height, width]], device=latents.device, dtype=latents.dtype))
        model_input = latents if extra_input is None else torch.cat([latents, extra_input], dim=1)
        added = {"text_embeds": cond["text_embeds"], "time_ids": time_ids.expand(latents.shape[0], -1)}
        return self.denoiser(
            model_input, timesteps, encoder_hidden_states=cond["encoder_hidden_states"], added_cond_kwargs=added
        ).sample
