"""The background inpainter (docs/METHOD.md, stage 3): remove the object, then refine the mask.

The fine-tuned model repaints each image's M_pre region with the background prompt (DDIM, latent blending:
the known region is the image itself, re-noised to every step's level). The refined mask is the part of
M_pre where the image differs from its background: M = up(M_pre) AND threshold(mean_rgb |x - B|).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pytorch_lightning as pl
import torch

from conceptdistill.diffusion.parts import register_parts
from conceptdistill.diffusion.sampling import inpaint_latents
from conceptdistill.maskmath import mirrored_background, refine_mask, upsample_mask
from conceptdistill.utils.seeding import sample_generators

if TYPE_CHECKING:
    from conceptdistill.diffusion.parts import DiffusionParts


class MaskRefiner(pl.LightningModule):
    """predict_step: images + M_pre -> per image the background B and the refined mask M.

    The refinement (maskmath.refine_mask) is shared; where B comes from is a subclass's `backgrounds`: the
    fine-tuned model's inpainting (BackgroundInpainter) or the image's own mirrored background (MirrorInpainter).
    """

    #: whether B is painted by the fine-tuned model: then stage inpaint reads stage finetune's weights
    repaints_with_model: ClassVar[bool] = True

    def __init__(self, *, filter_size: int = 3, close_holes: bool = False, closing_size: int = 3, seed: int = 0) -> None:
        super().__init__()
        self.filter_size, self.close_holes, self.closing_size, self.seed = filter_size, close_holes, closing_size, seed

    def backgrounds(self, images: torch.Tensor, prelim_masks: torch.Tensor, ids: list[str]) -> torch.Tensor:
        """Backgrounds B (B, 3, H, W) in [0, 1] of images (B, 3, H, W) in [0, 1] without their M_pre region
        (prelim_masks (B, h, w) bool at latent resolution)."""
        raise NotImplementedError

    def refine(self, image: np.ndarray, background: np.ndarray, prelim_mask: np.ndarray) -> np.ndarray:
        """Refined mask of one image; arrays are (H, W, 3) images and the (h, w) latent-resolution M_pre."""
        return refine_mask(
            upsample_mask(prelim_mask, image.shape[:2]), image, background, filter_size=self.filter_size,
            seed=self.seed, close_holes=self.close_holes, closing_size=self.closing_size,
        )

    def inpaint_and_refine(self, images: torch.Tensor, prelim_masks: torch.Tensor, ids: list[str]) -> list[dict]:
        backgrounds = self.backgrounds(images, prelim_masks, ids).cpu().numpy().transpose(0, 2, 3, 1)
        pictures = images.float().cpu().numpy().transpose(0, 2, 3, 1)
        prelims = prelim_masks.cpu().numpy().astype(bool)
        return [
            {"id": sid, "background": bg, "mask": self.refine(x, bg, m)}
            for sid, x, bg, m in zip(ids, pictures, backgrounds, prelims, strict=True)
        ]

    def predict_step(self, batch: dict, batch_index: int = 0) -> list[dict]:
        return self.inpaint_and_refine(batch["image"], batch["prelim_mask"], batch["id"])


class BackgroundInpainter(MaskRefiner):
    """The paper's inpainter: the fine-tuned model repaints the M_pre region with the background prompt."""

    def __init__(
        self, parts: DiffusionParts, *, prompt: str, num_steps: int = 50, guidance_scale: float = 1.0, negative_prompt: str | None = "",
        filter_size: int = 3, close_holes: bool = False, closing_size: int = 3, seed: int = 0,
    ) -> None:
        super().__init__(filter_size=filter_size, close_holes=close_holes, closing_size=closing_size, seed=seed)
        self.parts = parts
        register_parts(self, parts)
        self.prompt, self.num_steps, self.guidance_scale = prompt, num_steps, guidance_scale
        self.negative_prompt = negative_prompt or ""  # null in a config: plain guidance
        # a grid that cannot work fails before any image (checked at the native size; grids hardly depend on it)
        parts.sampler(num_steps, parts.latent_shape_for(parts.native_image_size), "inpaint.module.num_steps")

    @torch.no_grad()
    def backgrounds(self, images: torch.Tensor, prelim_masks: torch.Tensor, ids: list[str]) -> torch.Tensor:
        latents = self.parts.encode_images(images.to(self.device))
        unknown = prelim_masks.to(self.device, latents.dtype)[:, None]
        painted = inpaint_latents(
            self.parts, latents, unknown, [self.prompt] * len(ids), sample_generators(self.seed, ids, "inpaint"),
            steps=self.num_steps, guidance_scale=self.guidance_scale, negative_prompt=self.negative_prompt,
        )
        return self.parts.decode_latents(painted).float()


class MirrorInpainter(MaskRefiner):
    """The simple-inpainting baseline M_crop: no diffusion model repaints the object region; the image's own
    background, flipped into the object's place (maskmath.mirrored_background), is B, and the refinement is
    the same (config `inpaint=crop`). Shows what the fine-tuned model's inpainting adds over a copy.

    It needs no model: stage inpaint then neither reads stage finetune nor loads weights, and only the settings
    below enter its fingerprint. The sampler's settings of the shared config (prompt, num_steps, ...) are
    accepted and ignored."""

    repaints_with_model = False
    #: the `inpaint.module` keys it reads
    settings: ClassVar[tuple[str, ...]] = ("_target_", "_partial_", "filter_size", "close_holes", "closing_size", "seed")

    def __init__(self, parts: DiffusionParts | None = None, *, filter_size: int = 3, close_holes: bool = False,
                 closing_size: int = 3, seed: int = 0, **sampler_settings: Any) -> None:
        super().__init__(filter_size=filter_size, close_holes=close_holes, closing_size=closing_size, seed=seed)

    @torch.no_grad()
    def backgrounds(self, images: torch.Tensor, prelim_masks: torch.Tensor, ids: list[str]) -> torch.Tensor:
        pictures = images.float().cpu().numpy().transpose(0, 2, 3, 1)
        filled = [mirrored_background(x, upsample_mask(m, x.shape[:2]))
                  for x, m in zip(pictures, prelim_masks.cpu().numpy().astype(bool), strict=True)]
        return torch.from_numpy(np.stack(filled).transpose(0, 3, 1, 2))
