"""Stage "synthesize": a synthetic data set D'_s from the fine-tuned model (docs/METHOD.md, stage 3.3).

Each sample: an image drawn with the foreground prompt (optionally with concept-distillation guidance,
the background prompt as the unconditional branch), then the masks stage's attention mask and the inpaint
stage's background and refined mask, computed by the same modules. Every sample's randomness comes from
(seed, sample id), so the set is the same whatever the number of devices or the batch size.
"""

from __future__ import annotations

import numpy as np
import pytorch_lightning as pl
import torch

from conceptdistill.diffusion.loading import register_parts
from conceptdistill.diffusion.sampling import ddim_scheduler, sample_latents
from conceptdistill.stages.artifacts import ArtifactStore, SampleIds, SampleWriter, pending
from conceptdistill.stages.registry import PREDICTION_HARDWARE, register_stage
from conceptdistill.utils.seeding import sample_generators

OUTPUTS = {"image": "image", "prelim_mask": "mask", "background": "image", "mask": "mask", "foreground": "image"}


class SyntheticIds(SampleIds):
    """The ids of the synthetic samples to draw: synth-000000, synth-000001, ..."""

    def __init__(self, count: int) -> None:
        super().__init__([f"synth-{index:06d}" for index in range(count)])


class SyntheticSetGenerator(pl.LightningModule):
    """predict_step: ids -> (image, M_pre, background, mask, foreground) per id."""

    def __init__(self, parts, masker, inpainter, *, prompt: str, negative_prompt: str, num_steps: int,
                 guidance_scale: float, image_size: int, seed: int) -> None:
        super().__init__()
        self.parts = parts
        register_parts(self, parts)
        self.masker, self.inpainter = masker, inpainter
        self.prompt, self.negative_prompt = prompt, negative_prompt
        self.num_steps, self.guidance_scale, self.seed = num_steps, guidance_scale, seed
        self.latent_shape = parts.latent_shape_for(image_size)  # the real images' size, so D'_s matches D
        ddim_scheduler(parts, num_steps, "synthesize.num_steps")  # a grid that cannot work fails before any image

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


def synthetic_store(ctx) -> ArtifactStore:
    return ArtifactStore(ctx.run_dir / "synthesize" / "samples", OUTPUTS)


def build_generator(ctx, parts) -> SyntheticSetGenerator:
    from conceptdistill.stages.inpaint import build_inpainter
    from conceptdistill.stages.masks import build_masker

    cfg, syn = ctx.cfg, ctx.cfg.synthesize
    return SyntheticSetGenerator(
        parts, build_masker(ctx, parts), build_inpainter(ctx, parts), prompt=cfg.prompts.foreground,
        negative_prompt=cfg.prompts.background if syn.background_guidance else "", num_steps=syn.num_steps,
        guidance_scale=syn.guidance_scale, image_size=cfg.data.image_size, seed=cfg.seed,
    )


@register_stage(
    "synthesize", inputs=("finetune",), uses_model=True,
    # it draws images, then runs the masks and inpaint logic on them: it reads those stages' settings too
    settings=("seed", "concept", "prompts", "model", "data.image_size", "masks", "inpaint", "synthesize",
              *PREDICTION_HARDWARE),
)
def run_synthesize(ctx) -> dict:
    from conceptdistill.figures import save_grid

    syn = ctx.cfg.synthesize
    store = synthetic_store(ctx)
    todo = pending(SyntheticIds(syn.num_samples), store)
    if len(todo):
        module = build_generator(ctx, ctx.load_parts(finetuned=True))
        trainer = ctx.trainer("synthesize", callbacks=[SampleWriter(store)], logger=False)
        trainer.predict(module, ctx.datamodule.loader(todo, batch_size=syn.batch_size), return_predictions=False)
    ids = store.ids("mask")[: syn.figure_samples]
    save_grid(ctx.stage_dir("synthesize") / "synthetic_grid.png",
              {name: [store.load(name, sid) for sid in ids] for name in OUTPUTS})
    masks = [store.load("mask", sid) for sid in store.ids("mask")]
    skipped = store.skipped()
    return {"samples": len(masks), "skipped_in_stage": len(skipped), **({"skipped_ids": skipped} if skipped else {}),
            "mean_mask_fraction": float(sum(m.mean() for m in masks) / max(len(masks), 1)),
            "empty_masks": int(sum(not m.any() for m in masks))}
