"""Every model family (SDXL, SD3, SD3.5, FLUX) through the same contract as SD 1.x: its tiny random model, saved
by the family's stock diffusers pipeline, runs the default experiment by overrides alone; attention capture is
exact; the flow-matching process is the one the models are trained on; LoRA weights load in the stock pipeline."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import compose, one_torch_thread
from test_end_to_end import ALL_STAGES, TINY_STEPS

from conceptdistill.diffusion.attention import AttentionStore, capture_attention
from conceptdistill.diffusion.loading import load_diffusion_parts
from conceptdistill.diffusion.processors import concept_attention_mass
from conceptdistill.runner import run

FAMILIES = ["sdxl", "sd3", "sd35", "flux"]
#: short T5 sequences keep the tiny MMDiTs fast (the real configs use 256 / 512)
T5_LENGTH = ["diffusion.options.max_sequence_length=32"]
PROMPT = "a photo of a bird"


@pytest.fixture(autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


@pytest.fixture
def family(request) -> str:
    """The family name `tiny_family_model` was parametrised with."""
    return request.node.callspec.params["tiny_family_model"]


def family_overrides(family: str, folder) -> list[str]:
    return [f"model={family}", f"diffusion.path={folder}", *(T5_LENGTH if family != "sdxl" else [])]


def loaded(family: str, folder):
    settings = {"max_sequence_length": 32} if family != "sdxl" else {}
    return load_diffusion_parts(folder, settings=settings)


def noisy_inputs(parts, batch: int = 2, side: int = 32):
    generator = torch.Generator().manual_seed(0)
    latents = parts.encode_images(torch.rand(batch, 3, side, side, generator=generator))
    timesteps = parts.attention_timesteps(10, 8, tuple(latents.shape[1:]))[:1].expand(batch)
    noisy = parts.add_noise(latents, torch.randn(latents.shape, generator=generator), timesteps)
    return noisy, timesteps, parts.encode_prompts([PROMPT] * batch)


# ----- the whole method, by overrides only ---------------------------------------------------------------------
@pytest.mark.parametrize("tiny_family_model", FAMILIES, indirect=True)
def test_default_experiment_runs_every_stage(tmp_path, tiny_family_model, family):
    cfg = compose(["data.num_train=8", "data.num_test=4", "logger=none", *TINY_STEPS,
                   *family_overrides(family, tiny_family_model)], run_dir=tmp_path / "run")
    assert cfg.diffusion.name == family
    summaries = run(cfg)
    assert list(summaries) == ALL_STAGES
    results = json.loads((tmp_path / "run" / "report" / "results.json").read_text())
    assert {"preliminary_masks", "refined_masks", "unet_refined_synthetic"} <= set(results["rows"])
    attention = np.load(next((tmp_path / "run" / "masks" / "train" / "attention").glob("*.npy")))
    assert attention.shape == (16, 16) and np.isfinite(attention).all()  # 32 px images, VAE factor 2


@pytest.mark.parametrize("family", FAMILIES)
def test_paper_experiment_composes_for_every_family(family):
    cfg = compose(["+experiment=cub_birds", f"model={family}"])
    assert cfg.diffusion.name == family and cfg.data.image_size == cfg.diffusion.resolution == 1024


# ----- attention capture ---------------------------------------------------------------------------------------
def test_concept_mass_is_the_softmax_probability_of_the_concept_keys():
    generator = torch.Generator().manual_seed(0)
    query, key = torch.randn(2, 3, 70, 8, generator=generator), torch.randn(2, 3, 50, 8, generator=generator)
    index = torch.tensor([4, 17, 30])
    expected = torch.softmax(query @ key.transpose(-1, -2) * 0.3, dim=-1)[..., index].sum(-1)
    torch.testing.assert_close(concept_attention_mass(query, key, index, 0.3), expected)
    from conceptdistill.diffusion import processors

    small = processors.MAX_CHUNK_ELEMENTS
    processors.MAX_CHUNK_ELEMENTS = 2 * 3 * 50 * 7  # 7 query rows per chunk: chunking changes nothing
    try:
        torch.testing.assert_close(concept_attention_mass(query, key, index, 0.3), expected)
    finally:
        processors.MAX_CHUNK_ELEMENTS = small


@pytest.mark.parametrize("tiny_family_model", FAMILIES, indirect=True)
@torch.no_grad()
def test_capture_is_exact_sums_to_one_and_restores_processors(tiny_family_model, family):
    parts = loaded(family, tiny_family_model)
    noisy, timesteps, cond = noisy_inputs(parts)
    before = dict(parts.denoiser.attn_processors)
    reference = parts.predict(noisy, timesteps, cond)
    everything = AttentionStore(None, tuple(noisy.shape[-2:]), per_layer=True)
    with capture_attention(parts, everything):
        replaced = {k for k, v in parts.denoiser.attn_processors.items() if v is not before[k]}
        captured = parts.predict(noisy, timesteps, cond)
    assert replaced
    if parts.noise_process == "flow":
        assert torch.equal(captured, reference)  # MMDiT: the stock arithmetic with the same fused kernel
    else:
        torch.testing.assert_close(captured, reference, rtol=1e-5, atol=1e-5)  # UNet: explicit softmax
    assert dict(parts.denoiser.attn_processors) == before  # the very same processor objects back
    # over ALL keys (image and text) the probabilities of every image position sum to 1
    torch.testing.assert_close(everything.mean(), torch.ones_like(everything.mean()))
    expected_layers = {"sdxl": None, "sd3": 2, "sd35": 2, "flux": 2}[family]  # tiny: 2 blocks / 1 + 1 blocks
    if expected_layers:
        assert len(everything.per_layer_mean()) == expected_layers
    # the concept's maps: streaming mean over layers and steps == mean of the stored per-layer maps
    concept = AttentionStore(parts.concept_token_indices(PROMPT, "bird"), tuple(noisy.shape[-2:]), per_layer=True)
    with capture_attention(parts, concept):
        for _ in range(3):
            parts.predict(noisy, timesteps, cond)
    stored = torch.stack(list(concept.per_layer_mean().values())).mean(0)
    torch.testing.assert_close(concept.mean(), stored)
    assert 0 < float(concept.mean().min()) and float(concept.mean().max()) < 1


def test_concept_tokens_are_found_in_every_text_sequence(tmp_path):
    from conceptdistill.diffusion.tiny_families import save_tiny_model

    sd3 = loaded("sd3", save_tiny_model(tmp_path / "sd3", "sd3"))
    clip_length = sd3.tokenizer.model_max_length
    positions = sd3.concept_token_indices(PROMPT, "bird")
    assert positions == [5, clip_length + 4]  # CLIP: BOS a photo of a bird; T5: a photo of a bird (no BOS)
    flux = loaded("flux", save_tiny_model(tmp_path / "flux", "flux"))
    assert flux.concept_token_indices(PROMPT, "bird") == [4]  # T5 only: the transformer never sees CLIP tokens
    # a word T5 splits into pieces contributes all of them, contiguously
    pieces = flux.concept_token_indices("a photo of a zebra", "zebra")
    assert len(pieces) > 1 and pieces == list(range(pieces[0], pieces[0] + len(pieces)))
    with pytest.raises(ValueError, match="whole words"):
        flux.concept_token_indices("a photo of a songbird", "bird")
    # without T5, SD3 attends to the CLIP part only (and T5 is not even read from disk)
    no_t5 = load_diffusion_parts(tmp_path / "sd3", settings={"text_encoder_3": False, "max_sequence_length": 32})
    assert no_t5.text_encoder_3 is None and no_t5.concept_token_indices(PROMPT, "bird") == [5]
    # a concept that CLIP's tokens cut off but T5's longer sequence keeps: the T5 positions alone
    long_prompt = "a photo of " + "a " * (clip_length - 4) + "bird"
    assert len(sd3.tokenizer(long_prompt)["input_ids"]) > clip_length
    t5_position = sd3.tokenizer_3(long_prompt)["input_ids"].index(sd3.tokenizer_3.convert_tokens_to_ids("\u2581bird"))
    assert sd3.concept_token_indices(long_prompt, "bird") == [clip_length + t5_position]
    with pytest.raises(ValueError, match="truncated away"):  # without T5 nothing keeps it
        no_t5.concept_token_indices(long_prompt, "bird")


# ----- flow matching -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tiny_family_model", ["sd3", "flux"], indirect=True)
def test_flow_matching_noise_target_and_grid(tiny_family_model, family):
    from conceptdistill.modules.finetuner import ConceptDistillationFineTuner

    parts = loaded(family, tiny_family_model)
    x0, eps = torch.randn(3, 16, 8, 8), torch.randn(3, 16, 8, 8)
    t = torch.tensor([0.0, 500.0, 1000.0])
    noisy = parts.add_noise(x0, eps, t)
    torch.testing.assert_close(noisy[0], x0[0]) and torch.testing.assert_close(noisy[2], eps[2])
    torch.testing.assert_close(noisy[1], 0.5 * x0[1] + 0.5 * eps[1])
    assert torch.equal(parts.training_target(x0, eps, t), eps - x0)
    # the paper's T0 = 40 of T = 50 is the last 40 steps of the family's own (shifted) 50-step grid
    grid = parts.sampler(50, (16, 16, 16)).timesteps
    assert torch.equal(parts.attention_timesteps(50, 40, (16, 16, 16)), grid[10:])
    assert 0 < float(grid[-1]) < float(grid[10]) < float(grid[0]) <= 1000
    # a denoiser that answers eps - x0 exactly has zero training loss: the loss regresses on the velocity
    module = ConceptDistillationFineTuner(parts, adapter="full", background_probability=0.0, seed=0)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    clean = parts.encode_images(images)

    def oracle(noisy, timesteps, cond, extra_input=None):
        sigma = parts.sigmas(timesteps, noisy)
        eps = (noisy - (1 - sigma) * clean) / sigma
        return eps - clean

    parts.predict = oracle
    assert float(module.training_step({"id": ["a", "b"], "image": images}, 0)) < 1e-6


# ----- LoRA weights in the family's stock pipeline ------------------------------------------------------------
@pytest.mark.parametrize("tiny_family_model", FAMILIES, indirect=True)
def test_exported_lora_loads_in_the_stock_pipeline_and_changes_its_output(tmp_path, tiny_family_model, family):
    import diffusers

    from conceptdistill.diffusion.adapters import load_finetuned
    from conceptdistill.modules.finetuner import ConceptDistillationFineTuner

    parts = loaded(family, tiny_family_model)
    module = ConceptDistillationFineTuner(parts, adapter="lora", lora_rank=4, lora_alpha=8.0, learning_rate=5e-2,
                                          background_probability=0.0, seed=0)
    optimizer = module.configure_optimizers()
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    for _ in range(2):  # LoRA's B starts at zero: two steps move it
        optimizer.zero_grad()
        module.training_step({"id": ["a", "b"], "image": images}, 0).backward()
        optimizer.step()
    weights = module.export(tmp_path / "finetuned")

    stock = getattr(diffusers, parts.pipeline_class)
    kwargs = {"max_sequence_length": 32} if family != "sdxl" else {}

    def image(pipeline):
        return pipeline(PROMPT, num_inference_steps=2, height=32, width=32, output_type="np",
                        generator=torch.Generator().manual_seed(0), **kwargs).images

    pipeline = stock.from_pretrained(tiny_family_model, local_files_only=True)
    plain = image(pipeline)
    pipeline.load_lora_weights(weights.parent, weight_name=weights.name)
    assert not np.allclose(image(pipeline), plain, atol=1e-4)
    # and our own loader applies the same weights: the same denoiser output as the stock pipeline's
    ours = load_finetuned(loaded(family, tiny_family_model), weights.parent)
    noisy, timesteps, cond = noisy_inputs(ours)
    pipeline.fuse_lora()
    stock_parts = loaded(family, tiny_family_model)
    stock_parts.denoiser = getattr(pipeline, parts.denoiser_name)
    torch.testing.assert_close(ours.predict(noisy, timesteps, cond), stock_parts.predict(noisy, timesteps, cond),
                               rtol=1e-4, atol=1e-4)


# ----- the real architectures (random weights): one masks step on the CPU --------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize(("family", "num_layers", "side"), [
    ("sdxl", None, 256), ("sd3", 4, 256), ("sd35", 4, 256), ("flux", 2, 256),
])  # fmt: skip
def test_real_size_configs_run_one_masks_step(tmp_path, family, num_layers, side):
    """The published widths, heads and vocabularies (SDXL at full depth; the MMDiT families and their T5-XXL cut
    to a few blocks, which a 24 GiB CPU machine can hold beside the test run), through the real loader,
    tokenizers, prompt encoding and capture."""
    from conceptdistill.diffusion.real_size import build_from_configs
    from conceptdistill.modules.masker import AttentionMaskGenerator

    folder = build_from_configs(family, tmp_path / family, dtype=torch.bfloat16, num_layers=num_layers)
    parts = load_diffusion_parts(folder, dtype=torch.bfloat16)
    masker = AttentionMaskGenerator(parts, prompt=PROMPT, concept=["bird"], num_steps=50, start_step=1)
    images = torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        maps, store = masker.attention_maps(images, ["img-0"])
    assert maps.shape == (1, side // 8, side // 8) and torch.isfinite(maps).all() and store.count > 0


# ----- what the folder and the settings claim, checked before any work ----------------------------------------
def _copy(folder, tmp_path, name="copy"):
    import shutil

    return shutil.copytree(folder, tmp_path / name)


def test_sd3_runs_without_t5_on_disk(tmp_path):
    import shutil

    from conceptdistill.diffusion.tiny_families import save_tiny_model

    folder = save_tiny_model(tmp_path / "sd3", "sd3")
    shutil.rmtree(folder / "text_encoder_3"), shutil.rmtree(folder / "tokenizer_3")
    parts = load_diffusion_parts(folder, settings={"text_encoder_3": False, "max_sequence_length": 32})
    assert parts.text_encoder_3 is None
    clip = parts.tokenizer.model_max_length  # the T5 part of the sequence is zeros, as the stock pipeline makes it
    assert not parts.encode_prompts(PROMPT)["encoder_hidden_states"][:, clip:].any()
    from conceptdistill.diffusion.loading import ModelNotFoundError

    with pytest.raises(ModelNotFoundError, match="text_encoder_3=false"):
        load_diffusion_parts(folder, settings={"max_sequence_length": 32})


@pytest.mark.parametrize(("options", "match"), [
    ({"max_sequence_length": -1}, r"max_sequence_length=-1: must be an integer from 1 to 512"),
    ({"max_sequence_length": 600}, r"max_sequence_length=600"),
    ({"guidance_scale": 3.5}, r"diffusion.options.guidance_scale: not an option of flux models \(options: guidance"),
])  # fmt: skip
def test_family_options_are_checked_before_loading(tmp_path, options, match):
    from conceptdistill.checks import SettingsError
    from conceptdistill.diffusion.tiny_families import save_tiny_model

    with pytest.raises(SettingsError, match=match):
        load_diffusion_parts(save_tiny_model(tmp_path / "flux", "flux"), settings=options)


def test_an_unknown_flow_scheduler_class_is_refused(tmp_path):
    from conceptdistill.diffusion.loading import UnsupportedModelError
    from conceptdistill.diffusion.tiny_families import save_tiny_model

    folder = save_tiny_model(tmp_path / "sd3", "sd3")
    config = folder / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "_class_name": "FlowMatchFooScheduler"}))
    with pytest.raises(UnsupportedModelError, match="unknown scheduler class 'FlowMatchFooScheduler'"):
        load_diffusion_parts(folder)


@pytest.mark.parametrize("tiny_family_model", ["flux"], indirect=True)
def test_settings_only_the_model_can_check_are_refused_before_any_work(tmp_path, tiny_family_model, family):
    from conceptdistill.checks import SettingsError

    base = ["data.num_train=4", "data.num_test=2", "logger=none", *TINY_STEPS, "stages=[masks,finetune]"]
    flux = family_overrides(family, tiny_family_model)
    cases = [
        (["diffusion=sdxl", f"diffusion.path={tiny_family_model}"],
         r"diffusion=sdxl configures a sdxl model, but .* holds a flux model \(FluxPipeline\).*use diffusion=flux"),
        ([*flux, "concept=[square]", "prompts.foreground='a photo of a circle'"], r"concept=\['square'\] with "
         r"prompts.foreground='a photo of a circle': concept words must be whole words"),
        ([*flux, "concept=[dog]"], r"data: concept words \['dog'\] are not shapes or colours of this world"),
        ([*flux, "data.image_size=34"], r"data.image_size=34 is not a positive multiple of 4"),
        ([*flux, "finetune=inpaint9"], r"finetune.module.adapter=inpaint9 .* FluxTransformer2DModel"),
    ]
    for number, (extra, match) in enumerate(cases):
        run_dir = tmp_path / f"run-{number}"
        with pytest.raises(SettingsError, match=match):
            run(compose([*base, *extra], run_dir=run_dir))
        assert not list(run_dir.rglob("*.npy")), extra  # refused before any image was processed


@pytest.mark.parametrize("tiny_family_model", ["flux"], indirect=True)
def test_flux_native_size_comes_from_its_vae(tiny_family_model, family):
    assert loaded(family, tiny_family_model).native_image_size == 32  # the tiny VAE's sample_size


def test_sdxl_empty_prompt_follows_the_folder_unless_set(tmp_path):
    from conceptdistill.diffusion.tiny_families import save_tiny_model

    folder = save_tiny_model(tmp_path / "sdxl", "sdxl")
    index = json.loads((folder / "model_index.json").read_text())
    assert index["force_zeros_for_empty_prompt"] is True
    assert not load_diffusion_parts(folder).encode_prompts("")["text_embeds"].any()
    (folder / "model_index.json").write_text(json.dumps({**index, "force_zeros_for_empty_prompt": False}))
    assert load_diffusion_parts(folder).encode_prompts("")["text_embeds"].any()
    forced = load_diffusion_parts(folder, settings={"force_zeros_for_empty_prompt": True})
    assert not forced.encode_prompts("")["text_embeds"].any()
