"""Model families beside Stable Diffusion 1.x/2.x (diffusion/parts.py): each module registers its
`DiffusionParts` subclass under its diffusers pipeline class name (`register_family`).

- sdxl.py: SDXL (UNet, two CLIP text encoders, pooled text and size conditioning);
- flow.py: the rectified-flow forward process, samplers and grids shared by SD3 and FLUX;
- sd3.py: Stable Diffusion 3 / 3.5 (MMDiT, CLIP-L + CLIP-G + optional T5);
- flux.py: FLUX.1 (MMDiT with single-stream blocks, CLIP pooled + T5, packed latents, guidance embedding).
"""

from __future__ import annotations


def load_all() -> None:
    """Import every family module so that each registers itself."""
    from conceptdistill.diffusion.families import flux, sd3, sdxl  # noqa: F401
