"""Per-sample draws (utils/seeding.py): a batch's timesteps, drawn into one tensor after the noise, are bit for
bit what each sample's own generator gave when drawn one at a time, whatever the batch's composition."""

from __future__ import annotations

import torch
from diffusers.utils.torch_utils import randn_tensor

from conceptdistill.utils.seeding import per_sample_randint, sample_generators

IDS = [f"world-{i:06d}@12" for i in range(6)]


def test_batched_noise_and_timesteps_equal_the_per_sample_draws():
    # before: diffusers' randn_tensor over a list of generators, then one torch.randint per generator
    old = sample_generators(0, IDS, "finetune-noise")
    old_noise = randn_tensor((6, 12, 16, 16), generator=old, device=torch.device("cpu"), dtype=torch.float32)
    old_steps = torch.tensor([int(torch.randint(0, 1000, (1,), generator=g)) for g in old])

    new = sample_generators(0, IDS, "finetune-noise")
    noise = randn_tensor((6, 12, 16, 16), generator=new, device=torch.device("cpu"), dtype=torch.float32)
    steps = per_sample_randint(new, 1000)

    assert noise.shape == (6, 12, 16, 16) and noise.dtype == torch.float32
    assert steps.shape == (6,) and steps.dtype == torch.int64
    assert torch.equal(noise, old_noise) and torch.equal(steps, old_steps)
    # every generator is left where the old draws left it
    assert all(torch.equal(a.get_state(), b.get_state()) for a, b in zip(old, new, strict=True))

    # a sample's draws do not depend on its batch-mates or its place
    subset = sample_generators(0, [IDS[4], IDS[1]], "finetune-noise")
    randn_tensor((2, 12, 16, 16), generator=subset, device=torch.device("cpu"), dtype=torch.float32)
    assert torch.equal(per_sample_randint(subset, 1000), steps[[4, 1]])
