"""An exponential moving average of weights whose update is a few multi-tensor operations.

diffusers' `EMAModel` updates each weight tensor in a Python loop, `shadow.sub_((1 - decay) * (shadow - weight))`:
three operations per tensor, about a thousand for the shapes world's UNet (324 tensors), each a kernel launch on
a GPU, plus a check for DeepSpeed per tensor. Its own `foreach=True` mode is faster but computes
`shadow - (1 - decay) * (shadow - weight)` in one fused step, which rounds differently, so the weights would
change in their last bits. `ForeachEMA` makes the same three operations over all tensors at once, each result
rounded as the loop rounds it: the same numbers, bit for bit (tests/world/test_world_training.py).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from diffusers.training_utils import EMAModel


class ForeachEMA(EMAModel):
    """`EMAModel` (same settings, state dict and checkpoints) with the per-tensor loop of `step` replaced by
    multi-tensor operations that give identical results."""

    @torch.no_grad()
    def step(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        parameters = list(parameters)
        self.optimization_step += 1
        decay = self.get_decay(self.optimization_step)
        self.cur_decay_value = decay
        pairs = list(zip(self.shadow_params, parameters, strict=True))
        shadows = [shadow for shadow, weight in pairs if weight.requires_grad]
        weights = [weight for weight in parameters if weight.requires_grad]
        for shadow, weight in pairs:
            if not weight.requires_grad:
                shadow.copy_(weight)
        if shadows:
            difference = torch._foreach_sub(shadows, weights)  # shadow - weight
            torch._foreach_mul_(difference, 1 - decay)  # (1 - decay) * (shadow - weight), rounded as the loop does
            torch._foreach_sub_(shadows, difference)
