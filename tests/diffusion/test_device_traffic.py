"""The loops over timesteps (the masks stage's passes, the sampling and inpainting loops) never make a GPU wait
for the host.

Each copy between host and device memory and each value read back drains the GPU's queue of work; inside a
loop it would cost once per denoiser pass or per captured layer (the capture's index tensor, made anew per layer,
once did: 16 stalls per SD 1.x pass; the samplers read their grid back at every step). Observed on the "meta"
device with `DeviceTraffic` (conceptdistill/utils/device_traffic.py): what a loop moves may not grow with its number of steps,
for every family and attention space.
"""

from __future__ import annotations

import pytest
import torch
from conftest import one_torch_thread

from conceptdistill.diffusion.loading import load_diffusion_parts
from conceptdistill.diffusion.sampling import inpaint_latents, sample_latents
from conceptdistill.diffusion.tiny import build_tiny_parts
from conceptdistill.modules.masker import AttentionMaskGenerator
from conceptdistill.utils.device_traffic import DeviceTraffic
from conceptdistill.utils.seeding import sample_generators

PROMPT, BACKGROUND = "a photo of a bird", "a photo of the background"


@pytest.fixture(autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


def traffic_by_passes(parts, attention_space: str, timesteps_per_call: int = 1) -> dict[int, DeviceTraffic]:
    """Host/device traffic of one batch's attention maps at T0 = 2 and T0 = 6 passes (after a warm-up batch, so
    that what is made once per process is left out)."""
    result = {}
    for start_step in (2, 2, 6):
        masker = AttentionMaskGenerator(
            parts, prompt=PROMPT, concept=["bird"], num_steps=10, start_step=start_step,
            attention_space=attention_space, background_prompt=BACKGROUND, timesteps_per_call=timesteps_per_call,
        ).to("meta")
        with DeviceTraffic() as traffic:
            masker.attention_maps(torch.rand(2, 3, 32, 32), ["a", "b"])
        result[start_step] = traffic
    return result


def traffic_by_sampler_steps(parts) -> dict[int, DeviceTraffic]:
    """Traffic of text-to-image sampling and of inpainting (with guidance) at 2 and 6 sampler steps."""
    result = {}
    meta = parts.to("meta")
    latent_shape = meta.latent_shape_for(32)
    for steps in (2, 2, 6):
        generators = sample_generators(0, ["a", "b"], "traffic")
        with DeviceTraffic() as traffic:
            sample_latents(meta, [PROMPT] * 2, generators, steps=steps, guidance_scale=2.0, negative_prompt=BACKGROUND,
                           latent_shape=latent_shape)
            inpaint_latents(meta, torch.zeros(2, *latent_shape), torch.ones(2, 1, *latent_shape[1:]), [BACKGROUND] * 2,
                            generators, steps=steps, guidance_scale=2.0, negative_prompt=PROMPT)
        result[steps] = traffic
    return result


def assert_flat_in_passes(traffic: dict[int, DeviceTraffic]) -> None:
    grown = traffic[6].growth(traffic[2])
    assert not grown, f"host/device traffic that grows with the passes (T0=2 vs T0=6 count, where): {grown}"
    assert not [p for p in traffic[6].points if p[0] == "read back"], f"values read back: {dict(traffic[6].points)}"


@pytest.mark.parametrize("timesteps_per_call", [1, 3])
def test_sd_masks_loop_moves_nothing_per_pass(timesteps_per_call):
    assert_flat_in_passes(traffic_by_passes(build_tiny_parts(), "cross", timesteps_per_call))


def test_sd_sampling_and_inpainting_move_nothing_per_step():
    traffic = traffic_by_sampler_steps(build_tiny_parts())
    assert_flat_in_passes({2: traffic[2], 6: traffic[6]})


@pytest.mark.parametrize("tiny_family_model", ["sdxl", "sd3", "flux"], indirect=True)
def test_every_family_and_attention_space_moves_nothing_per_pass(tiny_family_model, request):
    family = request.node.callspec.params["tiny_family_model"]
    parts = load_diffusion_parts(tiny_family_model, settings={} if family == "sdxl" else {"max_sequence_length": 32})
    for space in ("cross", "output") if family != "sdxl" else ("cross",):
        assert_flat_in_passes(traffic_by_passes(parts, space))
    assert_flat_in_passes(traffic_by_sampler_steps(parts))


def test_the_recorder_sees_a_copy_per_pass(monkeypatch):
    """The recorder itself: a capture that makes its index tensor anew per layer and pass is caught."""
    from conceptdistill.diffusion.attention import AttentionStore

    monkeypatch.setattr(AttentionStore, "key_index",
                        lambda self, offset, device: torch.tensor(self.token_indices, device=device))
    with pytest.raises(AssertionError, match="grows with the passes"):
        assert_flat_in_passes(traffic_by_passes(build_tiny_parts(), "cross"))
