"""FLUX.1 (Black Forest Labs 2024): an MMDiT with double-stream blocks (joint attention over [text, image]) and
single-stream blocks (one sequence [text, image]); text = T5-XXL states (`max_sequence_length` tokens) plus
CLIP-L's pooled output; latents of 16 channels packed into 2x2 patches (64-wide tokens) with 3-axis rotary
position ids; FLUX.1-dev is guidance-distilled: the guidance scale is an input of the transformer."""

from __future__ import annotations

from typing import Any

import torch

from conceptdistill.diffusion.families.flow import FlowMatchingParts, _token_count
from conceptdistill.diffusion.parts import Conditioning, register_family


@register_family("FluxPipeline", "FluxInpaintPipeline")
class FluxParts(FlowMatchingParts):
    """FLUX parts: `text_encoder` (CLIP-L, pooled), `text_encoder_2` (T5) and their tokenizers. Settings:
    `max_sequence_length` (T5 tokens; 512 for FLUX.1-dev, 256 for schnell) and `guidance` (the distilled
    guidance scale FLUX.1-dev is told, 3.5 by default; ignored by models without a guidance embedding)."""

    family = "flux"
    pipeline_class = "FluxPipeline"
    OPTIONS = {
        "max_sequence_length": ("an integer from 1 to 512 (T5 tokens)", _token_count),
        "guidance": ("a number >= 0 (the distilled guidance scale)",
                     lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0),
    }
    attention_spaces = ("cross", "output")

    @classmethod
    def components(cls, settings=None):
        return ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")

    @property
    def max_sequence_length(self) -> int:
        return int(self.settings.get("max_sequence_length") or 512)

    @property
    def latent_multiple(self) -> int:
        return 2  # latents are packed into 2x2 patches

    @property
    def native_image_size(self) -> int:
        """FLUX's transformer records no sample size; its VAE's config does (1024 for FLUX.1)."""
        return int(getattr(self.vae.config, "sample_size", None) or 1024)

    @property
    def denoiser_in_channels(self) -> int:
        return int(self.denoiser.config.in_channels) // 4  # per latent channel, before packing

    def stock_pipeline(self):
        from diffusers import FluxPipeline

        return FluxPipeline(
            scheduler=self.scheduler, vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer,
            text_encoder_2=self.text_encoder_2, tokenizer_2=self.tokenizer_2, transformer=self.denoiser,
        )

    def encode_prompts(self, prompts: list[str] | str, *, grad: bool = False) -> Conditioning:
        """{"encoder_hidden_states": (B, max_sequence_length, 4096), "pooled_projections": (B, 768)} for
        FLUX.1's sizes, by the stock `FluxPipeline.encode_prompt`; cached per prompt."""
        return self.cached_conditioning(prompts, self._encode_one)

    @torch.no_grad()
    def _encode_one(self, prompt: str) -> Conditioning:
        embeds, pooled, _ = self.stock_pipeline().encode_prompt(
            prompt=prompt, prompt_2=None, device=self.text_encoder_2.device, max_sequence_length=self.max_sequence_length
        )
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def concept_token_indices(self, prompt: str, words: str | list[str]) -> list[int]:
        """The concept's positions in the T5 sequence (the only text the transformer attends to; CLIP gives
        the pooled vector)."""
        from conceptdistill.diffusion.tokenizer import concept_token_indices

        return concept_token_indices(self.tokenizer_2, prompt, words, max_length=self.max_sequence_length)

    def predict(self, latents, timesteps, cond, extra_input=None):
        """Pack (B, C, h, w) into (B, h/2 * w/2, 4C) tokens, run the transformer with rotary ids, the distilled
        guidance and timesteps / 1000 (as the stock pipeline passes them), unpack the velocity."""
        from diffusers import FluxPipeline

        if extra_input is not None:
            raise ValueError("FLUX models take no inpainting input (finetune=inpaint9 is for UNets)")
        batch, channels, height, width = latents.shape
        packed = FluxPipeline._pack_latents(latents, batch, channels, height, width)
        image_ids = self.denoiser_constant(
            ("image_ids", height, width, latents.device, latents.dtype),
            lambda: FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, latents.device, latents.dtype))
        text = cond["encoder_hidden_states"]
        text_ids = torch.zeros(text.shape[1], 3, device=latents.device, dtype=latents.dtype)
        guidance = None
        if getattr(self.denoiser.config, "guidance_embeds", False):
            guidance = torch.full((batch,), float(self.settings.get("guidance", 3.5)), device=latents.device)
        output = self.denoiser(
            hidden_states=packed, timestep=timesteps.to(latents.dtype) / 1000, guidance=guidance,
            pooled_projections=cond["pooled_projections"], encoder_hidden_states=text, txt_ids=text_ids,
            img_ids=image_ids, return_dict=False,
        )[0]
        return FluxPipeline._unpack_latents(output, height * self.vae_scale_factor, width * self.vae_scale_factor,
                                            self.vae_scale_factor)

    def capturing_processors(self, store) -> dict[str, tuple[Any, Any]]:
        """The attention of every double-stream (`transformer_blocks.N.attn`) and single-stream
        (`single_transformer_blocks.N.attn`) block."""
        from conceptdistill.diffusion.processors import CapturingFluxAttnProcessor

        image_tokens = (store.output_size[0] // 2) * (store.output_size[1] // 2)
        return {
            name: (module, CapturingFluxAttnProcessor(store, name, module.processor, image_tokens))
            for name, module in self.denoiser.named_modules()
            if name.endswith(".attn") and type(module).__name__ == "FluxAttention" and store.wants(name)
        }
