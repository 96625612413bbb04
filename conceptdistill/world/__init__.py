"""The shapes world: the embedded default data set, synthetic images with exact ground truth.

Coloured shapes (circle, square, triangle, ...) on textured backgrounds, rendered with numpy from a seed and
an index, so any image can be regenerated exactly and every pixel's truth is known. The world serves twice:
its captioned images train the small text-to-image diffusion model that stands in for Stable Diffusion, and
its concept images (with exact masks) run and measure the whole method on a CPU.

- `render`: `WorldConfig`, `render_sample`, `render_batch`, `concept_mask` (numpy only, no torch);
- `datamodule`: `ShapesWorldDataModule` (the concept data set D and its splits) and `CaptionedWorldDataset`
  (image-caption pairs of all kinds, for training the world's diffusion model);
- `figures`: `save_world_grid`, a PNG grid of images and their masks.
"""

from conceptdistill.world.render import (
    RenderedBatch,
    WorldConfig,
    WorldObject,
    WorldSample,
    caption_for,
    concept_mask,
    render_batch,
    render_sample,
)

__all__ = [
    "WorldConfig",
    "WorldObject",
    "WorldSample",
    "RenderedBatch",
    "caption_for",
    "concept_mask",
    "render_batch",
    "render_sample",
]
