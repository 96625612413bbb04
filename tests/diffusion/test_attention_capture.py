"""Tests of cross-attention capture on the tiny SD-shaped UNet."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from conceptdistill.diffusion.attention import AttentionStore, capture_cross_attention
from conceptdistill.diffusion.parts import DiffusionParts
from conceptdistill.diffusion.processors import CapturingAttnProcessor, unet_capturing_processors
from conceptdistill.diffusion.tiny import build_tiny_parts
from conceptdistill.diffusion.tokenizer import concept_token_indices

PROMPT = "a photo of a bird"
LATENT_HW = (16, 24)  # deliberately non-square


@pytest.fixture(scope="module")
def parts() -> DiffusionParts:
    return build_tiny_parts()


def _inputs(parts: DiffusionParts, batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 4, *LATENT_HW, generator=g)
    timesteps = torch.randint(0, 1000, (batch,), generator=g)
    return latents, timesteps, parts.encode_prompts([PROMPT] * batch)["encoder_hidden_states"]


def _run(unet: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    latents, timesteps, context = inputs
    with torch.no_grad():
        return unet(latents, timesteps, encoder_hidden_states=context).sample


class RecordingStore(AttentionStore):
    """Keeps every individual map as well, to check the streaming statistics against."""

    def reset(self) -> None:
        super().reset()
        self.records: list[tuple[str, torch.Tensor]] = []

    def accumulate(self, layer_name: str, maps: torch.Tensor) -> None:
        self.records.append((layer_name, maps.clone()))
        super().accumulate(layer_name, maps)


def test_probabilities_over_all_tokens_sum_to_one(parts: DiffusionParts) -> None:
    store = AttentionStore(None, LATENT_HW, per_layer=True)
    with capture_cross_attention(parts.denoiser, store):
        _run(parts.denoiser, _inputs(parts))
    assert store.count == 4  # SD-shaped tiny UNet: 1 down + 1 mid + 2 up cross-attention layers
    assert store.mean().shape == (2, *LATENT_HW)
    torch.testing.assert_close(store.mean(), torch.ones(2, *LATENT_HW))
    for maps in store.per_layer_mean().values():
        torch.testing.assert_close(maps, torch.ones(2, *LATENT_HW))


def test_capture_does_not_change_the_unet_output(parts: DiffusionParts) -> None:
    inputs = _inputs(parts)
    reference = _run(parts.denoiser, inputs)
    store = AttentionStore(concept_token_indices(parts.tokenizer, PROMPT, "bird"), LATENT_HW)
    with capture_cross_attention(parts.denoiser, store):
        captured = _run(parts.denoiser, inputs)
    torch.testing.assert_close(captured, reference, rtol=1e-5, atol=1e-5)
    assert store.count == 4


def test_only_cross_attention_is_replaced_and_originals_come_back(parts: DiffusionParts) -> None:
    before = dict(parts.denoiser.attn_processors)
    store = AttentionStore([5], LATENT_HW)
    with capture_cross_attention(parts.denoiser, store):
        during = parts.denoiser.attn_processors
        for name, processor in during.items():
            if name.endswith("attn2.processor"):
                assert isinstance(processor, CapturingAttnProcessor)
            else:
                assert processor is before[name]  # attn1 keeps the fast SDPA processor
    after = parts.denoiser.attn_processors
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)

    with pytest.raises(RuntimeError, match="boom"):
        with capture_cross_attention(parts.denoiser, store):
            _run(parts.denoiser, _inputs(parts))
            raise RuntimeError("boom")
    after = parts.denoiser.attn_processors
    assert all(after[k] is before[k] for k in before)


def test_layer_filter(parts: DiffusionParts) -> None:
    before = dict(parts.denoiser.attn_processors)
    store = AttentionStore([5], LATENT_HW, layers=["up_blocks"], per_layer=True)
    with capture_cross_attention(parts.denoiser, store):
        during = parts.denoiser.attn_processors
        replaced = {k for k, v in during.items() if v is not before[k]}
        _run(parts.denoiser, _inputs(parts))
    assert replaced == {k for k in before if k.startswith("up_blocks") and k.endswith("attn2.processor")}
    assert sorted(store.per_layer_mean()) == sorted(k.removesuffix(".processor") for k in replaced)
    assert store.count == 2
    with pytest.raises(ValueError, match="no cross-attention"):
        with capture_cross_attention(parts.denoiser, AttentionStore([5], LATENT_HW, layers=["nonexistent"])):
            pass


def test_streaming_mean_equals_mean_of_individual_maps(parts: DiffusionParts) -> None:
    token_indices = concept_token_indices(parts.tokenizer, "a photo of a red bird", ["red", "bird"])
    store = RecordingStore(token_indices, LATENT_HW, per_layer=True)
    with capture_cross_attention(parts.denoiser, store):
        for step in range(3):
            _run(parts.denoiser, _inputs(parts, seed=step))
    assert len(store.records) == store.count == 12  # 4 layers x 3 steps
    all_maps = torch.stack([maps for _, maps in store.records])
    torch.testing.assert_close(store.mean(), all_maps.mean(dim=0))
    per_layer = store.per_layer_mean()
    for name, mean in per_layer.items():
        layer_maps = torch.stack([maps for n, maps in store.records if n == name])
        assert layer_maps.shape[0] == 3
        torch.testing.assert_close(mean, layer_maps.mean(dim=0))
    # Maps are concept-token probability sums: in [0, number of tokens].
    assert 0.0 <= store.mean().min() and store.mean().max() <= len(token_indices)

    store.reset()
    assert store.count == 0 and store.records == []
    with pytest.raises(RuntimeError):
        store.mean()


def test_keep_drops_the_unconditional_half(parts: DiffusionParts) -> None:
    latents, timesteps, context = _inputs(parts, batch=1)
    uncond = parts.encode_prompts([""])["encoder_hidden_states"]
    cfg_inputs = (latents.repeat(2, 1, 1, 1), timesteps.repeat(2), torch.cat([uncond, context]))
    indices = concept_token_indices(parts.tokenizer, PROMPT, "bird")

    cfg_store = AttentionStore(indices, LATENT_HW, keep=slice(-1, None))
    with capture_cross_attention(parts.denoiser, cfg_store):
        _run(parts.denoiser, cfg_inputs)
    plain_store = AttentionStore(indices, LATENT_HW)
    with capture_cross_attention(parts.denoiser, plain_store):
        _run(parts.denoiser, (latents, timesteps, context))
    assert cfg_store.mean().shape == (1, *LATENT_HW)
    torch.testing.assert_close(cfg_store.mean(), plain_store.mean(), rtol=1e-5, atol=1e-6)

    # A different batch size without reset() is a caller error, not a silent broadcast.
    with pytest.raises(ValueError, match="reset"):
        with capture_cross_attention(parts.denoiser, plain_store):
            _run(parts.denoiser, _inputs(parts, batch=2))


def test_reduce_by_hand() -> None:
    # batch 2, heads 2, a 2x2 query grid, 3 tokens; target grid 4x4.
    probs = torch.rand(2 * 2, 4, 3).softmax(dim=-1)
    store = AttentionStore([1, 2], (4, 4))
    maps = store.reduce(probs, heads=2)
    expected = probs.reshape(2, 2, 4, 3)[..., 1:].sum(-1).mean(1).reshape(2, 2, 2)
    expected = expected.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)  # nearest upsampling
    torch.testing.assert_close(maps, expected)


@pytest.mark.parametrize(
    ("output_size", "query_len", "grid"),
    [((64, 64), 256, (16, 16)), ((64, 96), 384, (16, 24)), ((63, 95), 1536, (32, 48)), ((8, 8), 256, (16, 16))],
)
def test_grid_shape(output_size: tuple[int, int], query_len: int, grid: tuple[int, int]) -> None:
    assert AttentionStore([1], output_size).grid_shape(query_len) == grid


def test_capture_works_on_a_lora_unet() -> None:
    from peft import LoraConfig

    parts = build_tiny_parts(seed=3)
    # init_lora_weights=False: random LoRA weights, so the adapter really changes the output.
    config = LoraConfig(r=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)
    inputs = _inputs(parts)
    base = _run(parts.denoiser, inputs)
    parts.denoiser.add_adapter(config)
    reference = _run(parts.denoiser, inputs)
    assert not torch.allclose(base, reference)
    store = AttentionStore(None, LATENT_HW)
    assert len(unet_capturing_processors(parts.denoiser, store)) == 4
    with capture_cross_attention(parts.denoiser, store):
        captured = _run(parts.denoiser, inputs)
    torch.testing.assert_close(captured, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(store.mean(), torch.ones(2, *LATENT_HW))
