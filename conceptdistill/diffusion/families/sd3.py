"""Stable Diffusion 3 / 3.5 (Esser et al. 2024): an MMDiT (`SD3Transformer2DModel`) whose joint attention
lets image and text tokens attend to each other; text = [CLIP-L + CLIP-G penultimate states (77 tokens, padded
to T5's width) | T5-XXL states (`max_sequence_length` tokens)], plus both CLIPs' pooled projections."""

from __future__ import annotations

from typing import Any

import torch

from conceptdistill.diffusion.families.flow import FlowMatchingParts, _token_count
from conceptdistill.diffusion.parts import Conditioning, register_family


@register_family("StableDiffusion3Pipeline", "StableDiffusion3InpaintPipeline")
class StableDiffusion3Parts(FlowMatchingParts):
    """SD3 parts: `text_encoder` / `text_encoder_2` (CLIP-L / CLIP-G with projection), `text_encoder_3` (T5,
    optional: None with `diffusion.text_encoder_3=false`, then its part of the sequence is zeros, as the stock
    pipeline does) and their tokenizers. Settings: `max_sequence_length` (T5 tokens, 256 by default)."""

    family = "sd3"
    pipeline_class = "StableDiffusion3Pipeline"
    attention_spaces = ("cross", "output")
    OPTIONS = {
        "max_sequence_length": ("an integer from 1 to 512 (T5 tokens)", _token_count),
        "text_encoder_3": ("true or false (false: T5 is not loaded)", lambda v: isinstance(v, bool)),
    }

    @classmethod
    def optional_components(cls, settings):
        return () if settings.get("text_encoder_3", True) else ("text_encoder_3", "tokenizer_3")

    @classmethod
    def components(cls, settings=None):
        """T5 (text_encoder_3, tokenizer_3) only when `text_encoder_3` is not switched off: T5-XXL is 9 GB."""
        t5 = ("text_encoder_3", "tokenizer_3") if (settings or {}).get("text_encoder_3", True) else ()
        return ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler", *t5)

    @property
    def max_sequence_length(self) -> int:
        return int(self.settings.get("max_sequence_length") or 256)

    def stock_pipeline(self):
        from diffusers import StableDiffusion3Pipeline

        return StableDiffusion3Pipeline(
            transformer=self.denoiser, scheduler=self.scheduler, vae=self.vae, text_encoder=self.text_encoder,
            tokenizer=self.tokenizer, text_encoder_2=self.text_encoder_2, tokenizer_2=self.tokenizer_2,
            text_encoder_3=self.text_encoder_3, tokenizer_3=self.tokenizer_3,
        )

    def encode_prompts(self, prompts: list[str] | str, *, grad: bool = False) -> Conditioning:
        """{"encoder_hidden_states": (B, 77 + max_sequence_length, 4096), "pooled_projections": (B, 2048)} for
        SD3-medium's sizes, by the stock `StableDiffusion3Pipeline.encode_prompt`; cached per prompt."""
        return self.cached_conditioning(prompts, self._encode_one)

    @torch.no_grad()
    def _encode_one(self, prompt: str) -> Conditioning:
        embeds, _, pooled, _ = self.stock_pipeline().encode_prompt(
            prompt=prompt, prompt_2=None, prompt_3=None, device=self.text_encoder.device,
            do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length,
        )
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def concept_token_indices(self, prompt: str, words: str | list[str]) -> list[int]:
        """The concept's positions in the joint text sequence: in the CLIP part (both CLIP tokenizers must
        agree) and, when T5 is loaded, in the T5 part (offset by the CLIP length, 77). A concept that CLIP's 77
        tokens cut off but T5's longer sequence keeps has its T5 positions only; without T5 it is refused."""
        from conceptdistill.diffusion.tokenizer import TruncatedConceptError, concept_token_indices

        try:
            clip = concept_token_indices(self.tokenizer, prompt, words)
            if concept_token_indices(self.tokenizer_2, prompt, words) != clip:
                raise ValueError(f"the CLIP tokenizers of this SD3 folder place the concept {words!r} of {prompt!r} "
                                 "differently: tokenizer/ and tokenizer_2/ do not match")
        except TruncatedConceptError:
            if self.text_encoder_3 is None:
                raise
            clip = []
        if self.text_encoder_3 is None:
            return clip
        offset = int(self.tokenizer.model_max_length)
        t5 = concept_token_indices(self.tokenizer_3, prompt, words, max_length=self.max_sequence_length)
        return clip + [offset + i for i in t5]

    def concept_stream_positions(self, word: str) -> list[int]:
        """A concept token is the word's T5 state (the CLIP part when T5 is left out, whose part is zeros)."""
        positions = self.concept_token_indices(word, word)
        if self.text_encoder_3 is None:
            return positions
        return [p for p in positions if p >= int(self.tokenizer.model_max_length)]

    def predict(self, latents, timesteps, cond, extra_input=None):
        """The transformer's velocity (B, C, h, w); `timesteps` are sigma x 1000, as the stock pipeline passes."""
        if extra_input is not None:
            raise ValueError("SD3 models take no inpainting input (finetune=inpaint9 is for UNets)")
        return self.denoiser(
            hidden_states=latents, timestep=timesteps, encoder_hidden_states=cond["encoder_hidden_states"],
            pooled_projections=cond["pooled_projections"], return_dict=False,
        )[0]

    def capturing_processors(self, store) -> dict[str, tuple[Any, Any]]:
        """The joint attention of every transformer block (`transformer_blocks.N.attn`; SD3.5's extra
        image-only `attn2` layers see no text and are left alone)."""
        from conceptdistill.diffusion.processors import CapturingJointAttnProcessor

        return {
            name: (module, CapturingJointAttnProcessor(store, name))
            for name, module in self.denoiser.named_modules()
            if name.endswith(".attn") and getattr(module, "add_k_proj", None) is not None and store.wants(name)
        }
