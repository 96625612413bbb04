"""conceptdistill: label-free foreground segmentation distilled from a text-to-image diffusion model.

Implements concept distillation (Dombrowski et al., ICCV 2023). Importing the package is cheap on purpose:
heavy libraries (torch, diffusers, lightning) are imported by the modules that need them, so that
`python -m conceptdistill --help` and config composition stay fast.
"""

__version__ = "0.1.0"
