"""ConceptAttention (masks.module.attention_space=output) on the tiny SD3 / SD3.5 / FLUX models: the model's output
is untouched and every hook goes away; the maps are distributions over the concepts on the latent grid and equal
a plain masked joint-attention computation; a constructed case that only output-space similarity with a softmax
over concepts gets right; the concept set; the UNet refusal; the masks fingerprint; the default experiment."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import compose, one_torch_thread
from test_end_to_end import ALL_STAGES, TINY_STEPS
from test_families import PROMPT, noisy_inputs

from conceptdistill.diffusion.attention import capture_attention
from conceptdistill.diffusion.concept_attention import (
    ConceptAttentionStore,
    background_concept_words,
    concept_outputs,
    concept_probabilities,
    concept_set,
    text_stream_blocks,
)
from conceptdistill.diffusion.loading import load_diffusion_parts
from conceptdistill.modules.masker import AttentionMaskGenerator

CONCEPTS = ["bird", "background"]
MMDIT = ["sd3", "sd35", "flux"]


@pytest.fixture(autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


def loaded(folder, family: str):
    """The tiny model; FLUX with two double-stream blocks (the saved one has one), so that the concept stream is
    carried from one block into the next."""
    parts = load_diffusion_parts(folder, settings={"max_sequence_length": 32})
    if family == "flux":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1)
            parts.denoiser = type(parts.denoiser).from_config({**parts.denoiser.config, "num_layers": 2}).eval()
    return parts


def hooks(module: torch.nn.Module) -> dict[str, tuple]:
    return {name: (tuple(m._forward_pre_hooks), tuple(m._forward_hooks)) for name, m in module.named_modules()}


# ----- the constructed case --------------------------------------------------------------------------------------
def test_positions_whose_output_equals_a_concept_output_get_that_concept():
    """Image positions S = {0, 1, 2} have the attention output of concept 0, positions 3, 4 that of concept 1, and
    position 5 a large output equally close to both. Concept 0's query selects the image keys of S, concept 1's
    those of the others; the concept KEYS point the other way (concept 0's key resembles the keys outside S)."""
    e = torch.eye(6)
    s = 10.0  # sharp attention: logits s^2 / sqrt(6) = 41 (29 for concept 1) against 0
    image_key = torch.stack([s * e[0]] * 3 + [s * (e[1] + e[4]) / 2**0.5] * 3)
    image_value = torch.stack([10 * e[2]] * 3 + [10 * e[3]] * 3)
    concept_query, concept_key = torch.stack([s * e[0], s * e[1]]), torch.stack([s * e[4], s * e[5]])
    concept_value = torch.zeros(2, 6)
    image_out = torch.stack([10 * e[2]] * 3 + [10 * e[3]] * 2 + [30 * (e[2] + e[3])])

    def heads(x):  # (L, F) -> (B=1, L, H=1, F)
        return x[None, :, None, :]

    out = concept_outputs(*(heads(x) for x in (concept_query, concept_key, concept_value, image_key, image_value)))
    torch.testing.assert_close(out[0], torch.stack([10 * e[2], 10 * e[3]]), atol=1e-6, rtol=0)
    probs = concept_probabilities(image_out[None], out)[0]  # (positions, concepts)
    torch.testing.assert_close(probs.sum(-1), torch.ones(6))
    assert float(probs[:3, 0].min()) > 0.99 > 0.01 > float(probs[3:5, 0].max())
    assert float(probs[:3, 0].min()) > float(probs[3:, 0].max())  # S holds concept 0's highest values
    torch.testing.assert_close(probs[5], torch.tensor([0.5, 0.5]))
    # what a wrong implementation would compute fails the same check:
    by_position = torch.softmax(image_out @ out[0].T, dim=0)[:, 0]  # normalised over positions
    assert int(by_position.argmax()) == 5
    by_key = torch.softmax(image_key @ concept_key.T, dim=-1)[:, 0]  # keys instead of outputs
    assert float(by_key[:3].max()) < float(by_key[3:].min())
    by_value = torch.softmax(image_out @ concept_value.T, dim=-1)[:, 0]  # the concept's value, not its output
    assert float(by_value[:3].min()) < 0.99


# ----- on the tiny models --------------------------------------------------------------------------------------
@pytest.mark.parametrize("tiny_family_model", MMDIT, indirect=True)
@torch.no_grad()
def test_output_unchanged_maps_are_distributions_and_hooks_removed(tiny_family_model, request):
    family = request.node.callspec.params["tiny_family_model"]
    parts = loaded(tiny_family_model, family)
    noisy, timesteps, cond = noisy_inputs(parts)
    before, processors = hooks(parts.denoiser), dict(parts.denoiser.attn_processors)
    reference = parts.predict(noisy, timesteps, cond)
    store = ConceptAttentionStore(parts.concept_token_states(CONCEPTS), 1, tuple(noisy.shape[-2:]), per_layer=True)
    with capture_attention(parts, store):
        assert hooks(parts.denoiser) != before
        for _ in range(3):
            assert torch.equal(parts.predict(noisy, timesteps, cond), reference)
    assert hooks(parts.denoiser) == before and dict(parts.denoiser.attn_processors) == processors
    blocks = len(text_stream_blocks(parts.denoiser))
    assert blocks == 2 and store.count == 3 * blocks  # SD3: 2 joint blocks; FLUX: 2 double-stream (not single)
    maps = store.concept_maps()
    assert maps.shape == (2, len(CONCEPTS), *noisy.shape[-2:]) and torch.isfinite(maps).all()
    assert float(maps.min()) >= 0 and float(maps.max()) <= 1
    torch.testing.assert_close(maps.sum(dim=1), torch.ones_like(maps[:, 0]))
    torch.testing.assert_close(store.mean(), maps[:, 0])
    torch.testing.assert_close(torch.stack(list(store.per_layer_mean().values())).mean(0), store.mean())
    # an exception inside the block removes every hook as well
    with pytest.raises(RuntimeError, match="inside"):
        with capture_attention(parts, store):
            raise RuntimeError("inside")
    assert hooks(parts.denoiser) == before


def project(x, heads, projections, norms):
    """(B, L, H, D) queries, keys and values of tokens `x` by one stream's projections and q/k norms."""
    q, k, v = (p(x).unflatten(-1, (heads, -1)) for p in projections)
    return (norms[0](q) if norms[0] is not None else q), (norms[1](k) if norms[1] is not None else k), v


def masked_joint_attention_maps(parts, noisy, timesteps, cond, states):
    """The maps, and the image attention outputs, of one plain computation per text-stream block: ONE softmax
    attention over [text, image, concept] tokens whose mask keeps text and image queries off the concept keys and
    concept queries off the text keys, with every token projected by its stream's weights; the concept stream
    updated as the block updates its text stream. Block inputs are recorded from a plain forward pass."""
    from diffusers.models.embeddings import apply_rotary_emb

    blocks = text_stream_blocks(parts.denoiser)
    inputs, image_out, handles = {}, {}, []
    for name, block in blocks:
        handles.append(block.register_forward_pre_hook(
            lambda m, a, k, name=name: inputs.__setitem__(name, k), with_kwargs=True))
        handles.append(block.attn.to_out[0].register_forward_pre_hook(
            lambda m, a, name=name: image_out.__setitem__(name, a[0])))
    parts.predict(noisy, timesteps, cond)
    for handle in handles:
        handle.remove()
    concepts = parts.denoiser.context_embedder(states).expand(noisy.shape[0], -1, -1)
    maps, outputs = {}, {}
    for name, block in blocks:
        attn, temb, rotary = block.attn, inputs[name]["temb"], inputs[name].get("image_rotary_emb")
        image = block.norm1(inputs[name]["hidden_states"], emb=temb)[0]
        if attn.context_pre_only:
            text, concept = (block.norm1_context(x, temb) for x in (inputs[name]["encoder_hidden_states"], concepts))
        else:
            text = block.norm1_context(inputs[name]["encoder_hidden_states"], emb=temb)[0]
            concept, gate, shift, scale, gate_mlp = block.norm1_context(concepts, emb=temb)
        text_weights = ((attn.add_q_proj, attn.add_k_proj, attn.add_v_proj), (attn.norm_added_q, attn.norm_added_k))
        image_weights = ((attn.to_q, attn.to_k, attn.to_v), (attn.norm_q, attn.norm_k))
        streams = [project(x, attn.heads, *weights)
                   for x, weights in ((text, text_weights), (image, image_weights), (concept, text_weights))]
        (n_text, n_image, n_concept) = (x[0].shape[1] for x in streams)
        q, k, v = (torch.cat([x[i] for x in streams], dim=1) for i in range(3))
        if rotary is not None:  # FLUX's rows are [text, image]; a concept token gets a text token's row
            rows = torch.cat([torch.arange(n_text + n_image), torch.zeros(n_concept, dtype=torch.long)])
            q, k = (apply_rotary_emb(x, tuple(r[rows] for r in rotary), sequence_dim=1) for x in (q, k))
        mask = torch.zeros(q.shape[1], q.shape[1])
        mask[: n_text + n_image, n_text + n_image :] = float("-inf")
        mask[n_text + n_image :, :n_text] = float("-inf")
        weights = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q, k) * q.shape[-1] ** -0.5 + mask, dim=-1)
        out = torch.einsum("bhqk,bkhd->bqhd", weights, v).flatten(2)
        o_image, o_concept = out[:, n_text : n_text + n_image], out[:, n_text + n_image :]
        outputs[name] = (o_image, image_out[name])
        maps[f"{name}.attn"] = torch.softmax(torch.einsum("bnf,bcf->bnc", o_image, o_concept), dim=-1)
        if not attn.context_pre_only:
            concepts = concepts + gate.unsqueeze(1) * attn.to_add_out(o_concept)
            normed = block.norm2_context(concepts) * (1 + scale[:, None]) + shift[:, None]
            concepts = concepts + gate_mlp.unsqueeze(1) * block.ff_context(normed)
    return maps, outputs


@pytest.mark.parametrize("tiny_family_model", MMDIT, indirect=True)
@torch.no_grad()
def test_maps_equal_a_masked_joint_attention(tiny_family_model, request):
    family = request.node.callspec.params["tiny_family_model"]
    parts = loaded(tiny_family_model, family)
    noisy, timesteps, cond = noisy_inputs(parts)
    states = parts.concept_token_states(CONCEPTS)
    expected, outputs = masked_joint_attention_maps(parts, noisy, timesteps, cond, states)
    for plain, stock in outputs.values():  # the mask leaves the model's own attention as it is
        torch.testing.assert_close(plain, stock, rtol=1e-5, atol=1e-5)
    grid = (noisy.shape[-2] // 2, noisy.shape[-1] // 2)  # one map value per 2x2 patch token: no resizing
    store = ConceptAttentionStore(states, 1, grid, per_layer=True)
    with capture_attention(parts, store):
        parts.predict(noisy, timesteps, cond)
    got = store.per_layer_concept_maps()
    assert list(got) == list(expected)
    for name, probs in expected.items():
        torch.testing.assert_close(got[name], probs.permute(0, 2, 1).reshape(got[name].shape), rtol=1e-4, atol=1e-5)
    # a layer filter picks maps; the stream still runs through the blocks it leaves out
    last = list(expected)[-1]
    only_last = ConceptAttentionStore(states, 1, grid, layers=[last], per_layer=True)
    with capture_attention(parts, only_last):
        parts.predict(noisy, timesteps, cond)
    assert list(only_last.per_layer_concept_maps()) == [last]
    torch.testing.assert_close(only_last.concept_maps(), got[last])
    with pytest.raises(ValueError, match="masks.module.layers"):
        with capture_attention(parts, ConceptAttentionStore(states, 1, grid, layers=["no_such_block"])):
            pass


@pytest.mark.parametrize("tiny_family_model", ["sd3"], indirect=True)
def test_concept_tokens_are_the_words_own_t5_states(tiny_family_model):
    parts = load_diffusion_parts(tiny_family_model, settings={"max_sequence_length": 32})
    states = parts.concept_token_states(["bird", "zebra"])  # zebra: several T5 pieces, averaged into one token
    clip = int(parts.tokenizer.model_max_length)
    t5 = parts.encode_prompts("bird")["encoder_hidden_states"][0, clip:]
    torch.testing.assert_close(states[0], t5[0])  # T5 has no BOS: the word's state is the first
    pieces = parts.concept_stream_positions("zebra")
    zebra = parts.encode_prompts("zebra")["encoder_hidden_states"][0]
    assert len(pieces) > 1 and min(pieces) >= clip
    torch.testing.assert_close(states[1], zebra[pieces].mean(0))
    parts.text_encoder_3 = None  # without T5 (its part is zeros), the word's CLIP states
    assert parts.concept_stream_positions("bird") == [1]


# ----- the concept set -------------------------------------------------------------------------------------------
def test_the_concept_set_is_the_concept_and_the_background_prompts_content_words():
    assert background_concept_words("a photo of a background", ["bird"]) == ["background"]
    assert background_concept_words("A photo of the chest x-ray.", ["opacity"]) == ["chest", "x-ray"]
    assert concept_set(["human", "arms", "legs"], "a photo of a background") == ["human", "arms", "legs", "background"]
    assert concept_set(["bird"], "a photo of a background", ["floor", "tree"]) == ["bird", "floor", "tree"]
    with pytest.raises(ValueError, match="prompts.background"):
        concept_set(["bird"], "a photo of a bird")
    with pytest.raises(ValueError, match="background_concepts"):
        concept_set(["bird"], None, ["Bird"])
    chest = compose(["+experiment=chest_xray"])
    assert concept_set(list(chest.concept), chest.prompts.background) == ["opacity", "chest", "x-ray"]


# ----- refusal, settings and fingerprints -----------------------------------------------------------------------
def test_a_unet_family_is_refused_before_any_image(tiny_model, tmp_path):
    from conceptdistill.runner import run

    parts = load_diffusion_parts(tiny_model)
    with pytest.raises(ValueError, match=r"masks\.module\.attention_space=output.*sd family"):
        AttentionMaskGenerator(parts, prompt=PROMPT, concept=["bird"], attention_space="output",
                               background_prompt="a photo of a background")
    base = [f"diffusion.path={tiny_model}", "data.num_train=4", "data.num_test=4", "logger=none", *TINY_STEPS]
    with pytest.raises(ValueError, match=r"masks\.module\.attention_space=output.*sd family"):
        run(compose([*base, "masks.module.attention_space=output"], run_dir=tmp_path / "run"))
    assert not (tmp_path / "run" / "masks").exists()
    with pytest.raises(ValueError, match=r"masks\.module\.attention_space=keys"):
        run(compose([*base, "masks.module.attention_space=keys"], run_dir=tmp_path / "run"))


def test_masks_read_the_background_prompt_only_in_output_space(tiny_model, tmp_path):
    from conceptdistill.pipeline.context import RunContext

    def masks_stage(*extra):
        ctx = RunContext(compose([f"diffusion.path={tiny_model}", "logger=none", *extra], run_dir=tmp_path / "run"))
        return ctx.fingerprint("masks"), ctx.view("masks")

    other = "prompts.background='a photo of the floor'"
    (cross, view), (cross_other, _) = masks_stage(), masks_stage(other)
    assert cross == cross_other and "background" not in view.prompts
    output = "masks.module.attention_space=output"
    (fingerprint, view), (fingerprint_other, _) = masks_stage(output), masks_stage(output, other)
    assert fingerprint not in (cross, fingerprint_other) and view.prompts.background == "a photo of a background"


# ----- the whole method on tiny FLUX -----------------------------------------------------------------------------
@pytest.mark.parametrize("tiny_family_model", ["flux"], indirect=True)
def test_default_experiment_runs_with_concept_attention(tmp_path, tiny_family_model):
    from conceptdistill.runner import run

    cfg = compose(["data.num_train=8", "data.num_test=4", "logger=none", *TINY_STEPS, "model=flux",
                   f"diffusion.path={tiny_family_model}", "diffusion.options.max_sequence_length=32",
                   "masks.module.attention_space=output"], run_dir=tmp_path / "run")
    assert list(run(cfg)) == ALL_STAGES
    results = json.loads((tmp_path / "run" / "report" / "results.json").read_text())
    assert {"preliminary_masks", "refined_masks", "unet_refined_synthetic"} <= set(results["rows"])
    for path in (tmp_path / "run" / "masks" / "train" / "attention").glob("*.npy"):
        attention = np.load(path)
        assert attention.shape == (16, 16) and np.isfinite(attention).all()
        assert 0 <= attention.min() and attention.max() <= 1
