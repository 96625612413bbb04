"""The masks stage's timesteps, as docs/METHOD.md states them: the last T0 steps of a T-step DDIM grid on the
model's noise schedule (SD's 1000 steps, T = 50, T0 = 40: t = 781, 761, ..., 1).

The benchmarks compute them here from the scheduler config rather than from the masker's internals, so they keep
working while the masker changes; the masker is still what runs the passes in bench_passes.py.
"""

from __future__ import annotations

import torch


def masks_timesteps(scheduler_config, num_steps: int = 50, start_step: int = 40) -> torch.Tensor:
    """The last `start_step` timesteps of the `num_steps` DDIM grid of `scheduler_config`."""
    from diffusers import DDIMScheduler

    if not 1 <= start_step <= num_steps:
        raise ValueError(f"need 1 <= start_step <= num_steps, got {start_step} and {num_steps}")
    grid = DDIMScheduler.from_config(scheduler_config)
    grid.set_timesteps(num_steps)
    return grid.timesteps[num_steps - start_step :].clone()
