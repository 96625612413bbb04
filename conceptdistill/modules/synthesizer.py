"""The synthetic-set generator (docs/METHOD.md, stage 3.3): ids -> image, M_pre, background, mask, foreground.

Each sample: an image drawn with the foreground prompt (optionally with concept-distillation guidance,
the background prompt as the unconditional branch), then the masker's attention mask and the inpainter's
background and refined mask. Every sample's randomness comes from (seed, sample id), so the set is the same
whatever the number of devices or the batch size.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pytorch_lightning as pl
import torch

from conceptdistill.diffusion.parts import register_parts
from conceptdistill.diffusion.sampling import sample_latents
from conceptdistill.pipeline.artifacts import SampleIds
from conceptdistill.utils.seeding import sample_generators

if TYPE_CHECKING:
    from conceptdistill.diffusion.parts import DiffusionParts
    from conceptdistill.modules.inpainter import MaskRefiner
    from conceptdistill.modules.masker import AttentionMaskGenerator


class SyntheticIds(SampleIds):
    """The ids of the synthetic samples to draw: synth-000000, synth-000001, ..."""

    def __init__(self, count: int) -> None:
        super().__init__([f"synth-{index:06d}" for index in range(count)])


class SyntheticSetGenerator(pl.LightningModule):
    """predict_step: ids -> (image, M_pre, background, mask, foreground) per id."""

    def __init__(self, parts: DiffusionParts, masker: AttentionMaskGenerator, inpainter: MaskRefiner, *, prompt: str, negative_prompt: str, num_steps: int,
                 guidance_scale: float, image_size: int, seed: int) -> None:
        super().__init__()
        self.parts = parts
        register_parts(self, parts)
        self.masker, self.inpainter = masker, inpainter
        self.prompt, self.negative_prompt = prompt, negative_prompt
        self.num_steps, self.guidance_scale, self.seed = num_steps, guidance_scale, seed
        self.latent_shape = parts.latent_shape_for(image_size)  # the real images' size, so D'_s matches D
        parts.sampler(num_steps, self.latent_shape, "synthesize.module.num_steps")  # a bad grid fails before any image

    @torch.no_grad()
    def predict_step(self, batch: dict, batch_index: int = 0) -> list[dict]:
        ids = batch["id"]
        latents = sample_latents(
            self.parts, [self.prompt] * len(ids), sample_generators(self.seed, ids, "synthesize"),
            steps=self.num_steps, guidance_scale=self.guidance_scale, negative_prompt=self.negative_prompt,
            latent_shape=self.latent_shape,
        )
        images = self.parts.decode_latents(latents)
        maps, _ = self.masker.attention_maps(images, ids)
        prelims = torch.from_numpy(np.stack([self.masker.binarize(m) for m in maps.cpu().numpy()]))
        results = self.inpainter.inpaint_and_refine(images, prelims, ids)
        pictures = images.float().cpu().numpy().transpose(0, 2, 3, 1)
        for result, picture, prelim in zip(results, pictures, prelims.numpy(), strict=True):
            result.update(image=picture, prelim_mask=prelim, foreground=picture * result["mask"][..., None])
        return results
