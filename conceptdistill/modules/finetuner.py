"""The concept-distillation fine-tuner (docs/METHOD.md, stage 2): a text-to-image trainer with a background task.

Each training sample gets one of two tasks by a seeded coin:
- object task: the ordinary denoising loss over the whole latent, captioned with the foreground prompt;
- background task: the background prompt, with the loss restricted to the background pixels of a random
  rectangle drawn from the preliminary mask M_pre. The UNet sees the whole noised latent; only the loss is
  masked. This teaches "a photo of a background" to mean "whatever this image has behind the object".
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from conceptdistill.maskmath import rectangle_rules_for, sample_background_rectangle
from conceptdistill.modules.text_to_image import TextToImageTrainer, masked_mse

if TYPE_CHECKING:
    from conceptdistill.diffusion.parts import DiffusionParts


class ConceptDistillationFineTuner(TextToImageTrainer):
    """Fine-tunes the UNet of a `DiffusionParts` set on images with their M_pre ("prelim_mask" in the batch,
    (B, h, w) bool on the latent grid). Without M_pre in a batch every sample gets the object task.

    `rectangle` fixes the background rectangles' rules (see `maskmath.sample_background_rectangle`); None uses
    the paper's rules scaled to the batch's latent grid (exact for SD's 64 x 64).
    """

    def __init__(
        self,
        parts: DiffusionParts,
        *,
        background_probability: float = 0.5,
        foreground_prompt: str = "a photo of a thing",
        background_prompt: str = "a photo of a background",
        rectangle: dict | None = None,
        **trainer_options,
    ) -> None:
        # TextToImageTrainer's save_hyperparameters records these arguments too (Lightning reads every
        # __init__ frame of the object), so checkpoints hold the background task's settings.
        super().__init__(parts, prompt=foreground_prompt, **trainer_options)

    def plan_sample(self, batch: dict, index: int, rng: np.random.Generator, loss_mask: np.ndarray) -> str:
        hp = self.hparams
        prelim = batch.get("prelim_mask")
        if prelim is not None and rng.random() < hp.background_probability:
            h, w = loss_mask.shape[-2:]
            rules = hp.rectangle or rectangle_rules_for(min(h, w))
            background = ~prelim[index].cpu().numpy().astype(bool)
            loss_mask[0] = sample_background_rectangle(background, rng, **rules)[0]
            return hp.background_prompt
        return super().plan_sample(batch, index, rng, loss_mask)

    def log_losses(self, prediction, target, loss_mask, captions: list[str]) -> None:
        is_background = torch.tensor([c == self.hparams.background_prompt for c in captions], device=self.device)
        with torch.no_grad():
            for name, selected in (("object", ~is_background), ("background", is_background)):
                if selected.any():
                    value = masked_mse(prediction[selected], target[selected], loss_mask[selected])
                    self.log(f"train/loss_{name}", value, batch_size=int(selected.sum()))
