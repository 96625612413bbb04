"""The world model's training loop after its per-step overheads were cut: the same numbers as before.

- The EMA of the UNet weights, updated with multi-tensor operations, equals diffusers' per-tensor loop bit for bit
  (and diffusers' own `foreach=True` does not, which is why it is not used).
- A training step noises each sample with the noise and timestep its own generator gave before.
"""

from __future__ import annotations

import pytest
import torch
from diffusers.training_utils import EMAModel
from diffusers.utils.torch_utils import randn_tensor

from conceptdistill.diffusion.tiny import build_tiny_parts
from conceptdistill.modules.ema import ForeachEMA
from conceptdistill.modules.text_to_image import TextToImageTrainer
from conceptdistill.utils.seeding import sample_generators

pytestmark = pytest.mark.usefixtures("single_thread")


def test_foreach_ema_equals_the_per_tensor_loop_bit_for_bit():
    torch.manual_seed(0)
    weights = [torch.nn.Parameter(torch.randn(shape)) for shape in ((64, 32), (32,), (7, 3, 3, 3), (5,))]
    weights[3].requires_grad_(False)  # a frozen tensor is copied, not averaged
    loop, foreach = EMAModel(weights, decay=0.999), ForeachEMA(weights, decay=0.999)
    fused = EMAModel(weights, decay=0.999, foreach=True)
    for _ in range(25):
        with torch.no_grad():
            for weight in weights:
                weight.add_(torch.randn_like(weight) * 0.1)
        loop.step(weights), foreach.step(weights), fused.step(weights)
        assert foreach.cur_decay_value == loop.cur_decay_value
    assert foreach.optimization_step == loop.optimization_step == 25
    for a, b in zip(loop.shadow_params, foreach.shadow_params, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(foreach.shadow_params[3], weights[3])
    assert not all(torch.equal(a, b) for a, b in zip(loop.shadow_params, fused.shadow_params, strict=True))

    # the same checkpoint format both ways
    restored = EMAModel(weights, decay=0.5)
    restored.load_state_dict(foreach.state_dict())
    assert restored.decay == 0.999 and restored.optimization_step == 25
    assert all(torch.equal(a, b) for a, b in zip(restored.shadow_params, foreach.shadow_params, strict=True))


def test_a_training_step_noises_each_sample_as_before(monkeypatch):
    parts = build_tiny_parts()
    module = TextToImageTrainer(parts, adapter="full", use_batch_captions=True, caption_dropout=0.1, seed=3,
                                ema_decay=0.99)
    assert isinstance(module.ema, ForeachEMA)
    ids = ["world-000004", "world-000001", "world-000009"]
    batch = {"id": ids, "image": torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0)),
             "caption": ["a photo of a red circle", "a photo of a background", "a photo of a blue square"]}
    seen = {}
    add_noise = parts.add_noise

    def record(latents, noise, timesteps):
        seen.update(latents=latents, noise=noise, timesteps=timesteps)
        return add_noise(latents, noise, timesteps)

    monkeypatch.setattr(parts, "add_noise", record)
    module.training_step(batch, 0)

    # what the step drew before: diffusers' randn_tensor over the samples' generators, then a randint each
    generators = sample_generators(3, [f"{i}@0" for i in ids], "finetune-noise")
    noise = randn_tensor(tuple(seen["latents"].shape), generator=generators, device=torch.device("cpu"),
                         dtype=seen["latents"].dtype)
    timesteps = torch.tensor([int(torch.randint(0, 1000, (1,), generator=g)) for g in generators])
    assert torch.equal(seen["noise"], noise)
    assert torch.equal(seen["timesteps"], timesteps)
