"""Tiny SDXL / SD3 / SD3.5 / FLUX folders load in the stock diffusers pipelines and make images; the offline T5
tokenizer behaves as T5's; the real configs in model_configs/ hold the published architectures."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conceptdistill.diffusion.real_size import _parameter_counts, build_from_configs
from conceptdistill.diffusion.t5_tokenizer import write_t5_tokenizer
from conceptdistill.diffusion.tiny import DEFAULT_WORDS
from conceptdistill.diffusion.tiny_families import CONFIG_FAMILIES, MODEL_CONFIGS, TINY_FAMILIES, save_tiny_model
from conceptdistill.diffusion.tokenizer import WordBoundaries, concept_token_indices, word_boundaries

PIPELINES = {
    "sdxl": "StableDiffusionXLPipeline",
    "sd3": "StableDiffusion3Pipeline",
    "sd35": "StableDiffusion3Pipeline",
    "flux": "FluxPipeline",
}
# Only the session fixture is parametrised (indirectly), so that pytest groups the tests by family and builds
# each family's folder once; the `family` fixture reads the name back.
FAMILY_PARAMS = pytest.mark.parametrize("tiny_family_model", TINY_FAMILIES, indirect=True)
WORD_START = "\u2581"
# What the tiny VAEs copy from the real VAE configs.
VAE_KEYS = (
    "latent_channels",
    "scaling_factor",
    "shift_factor",
    "force_upcast",
    "use_quant_conv",
    "use_post_quant_conv",
)


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    yield


@pytest.fixture
def family(request: pytest.FixtureRequest) -> str:
    """The family name the test's `tiny_family_model` was parametrised with."""
    return request.node.callspec.params["tiny_family_model"]


def _load(folder: Path, family: str):
    import diffusers

    return getattr(diffusers, PIPELINES[family]).from_pretrained(folder, local_files_only=True)


def _real(family: str, part: str) -> dict:
    name = "scheduler_config.json" if part == "scheduler" else "config.json"
    return json.loads((MODEL_CONFIGS / family / part / name).read_text())


# ---------------------------------------------------------------- T5 tokenizer


@pytest.fixture(scope="module")
def t5(tmp_path_factory: pytest.TempPathFactory):
    return write_t5_tokenizer(tmp_path_factory.mktemp("t5"), DEFAULT_WORDS, model_max_length=16)


def test_t5_tokenizer_is_t5s_class_with_t5s_special_ids(t5) -> None:
    from transformers import T5TokenizerFast

    assert isinstance(t5, T5TokenizerFast)
    assert (t5.pad_token, t5.pad_token_id, t5.eos_token, t5.eos_token_id, t5.unk_token, t5.unk_token_id) == (
        "<pad>", 0, "</s>", 1, "<unk>", 2,
    )  # fmt: skip
    assert t5.model_max_length == 16
    assert word_boundaries(t5) == WordBoundaries(start_prefix=WORD_START)
    reloaded = T5TokenizerFast.from_pretrained(t5.name_or_path, local_files_only=True)
    assert reloaded("a photo of a bird")["input_ids"] == t5("a photo of a bird")["input_ids"]


def test_t5_tokenizer_words_are_single_pieces(t5) -> None:
    for word in DEFAULT_WORDS:
        assert t5.tokenize(word) == [WORD_START + word]
        ids = t5(word)["input_ids"]
        assert len(ids) == 2 and ids[-1] == t5.eos_token_id
    ids = t5("a photo of a bird")["input_ids"]
    assert t5.convert_ids_to_tokens(ids) == ["▁a", "▁photo", "▁of", "▁a", "▁bird", "</s>"]
    assert t5.unk_token_id not in ids


def test_t5_tokenizer_other_words_fall_back_to_several_pieces(t5) -> None:
    pieces = t5.tokenize("zebra")
    assert len(pieces) > 1 and pieces[0].startswith(WORD_START) and "".join(pieces) == "▁zebra"
    assert t5.decode(t5("a zebra, 42!")["input_ids"], skip_special_tokens=True) == "a zebra, 42!"
    assert t5.tokenize("Bird") != ["▁Bird"]  # case is kept: "Bird" is not the word "bird"
    assert t5.unk_token_id not in t5("Any ASCII text: x-ray #1 (ok)?")["input_ids"]


def test_t5_tokenizer_appends_eos_pads_and_truncates(t5) -> None:
    batch = t5(["a bird", "a photo of a red dog"], padding="max_length", max_length=8, truncation=True)
    assert batch["input_ids"][0] == t5("a bird")["input_ids"] + [0] * 5
    assert batch["attention_mask"][0] == [1] * 3 + [0] * 5
    assert batch["input_ids"][1][-2:] == [t5.eos_token_id, 0]
    long = t5(" ".join(["bird"] * 40), truncation=True)["input_ids"]
    assert len(long) == 16 and long[-1] == t5.eos_token_id


def test_t5_tokenizer_concept_token_indices(t5) -> None:
    assert concept_token_indices(t5, "a photo of a bird", "bird") == [4]  # no BOS in T5
    assert concept_token_indices(t5, "a photo of a zebra", "zebra") == list(range(4, 4 + len(t5.tokenize("zebra"))))
    with pytest.raises(ValueError, match="'bird' is part of 'songbird'"):
        concept_token_indices(t5, "a photo of a songbird", "bird")


def test_t5_tokenizer_refuses_words_that_are_not_ascii_letters(tmp_path: Path) -> None:
    for word in ("x-ray", "", "café"):
        with pytest.raises(ValueError, match="ASCII letters"):
            write_t5_tokenizer(tmp_path / "t5", ["bird", word])


# ---------------------------------------------------------------- tiny families


@FAMILY_PARAMS
def test_stock_pipeline_loads_the_tiny_folder_and_makes_an_image(tiny_family_model: Path, family: str) -> None:
    pipeline = _load(tiny_family_model, family)
    extra = {} if family == "sdxl" else {"max_sequence_length": 32}
    images = pipeline(
        "a photo of a bird",
        num_inference_steps=2,
        height=32,
        width=48,  # deliberately non-square
        output_type="np",
        generator=torch.Generator().manual_seed(0),
        **extra,
    ).images
    assert images.shape == (1, 32, 48, 3)
    assert np.isfinite(images).all() and images.min() >= 0 and images.max() <= 1


@FAMILY_PARAMS
def test_tiny_folder_keeps_the_real_wiring(tiny_family_model: Path, family: str) -> None:
    from transformers import CLIPTokenizer, T5TokenizerFast

    pipeline = _load(tiny_family_model, family)
    vae = pipeline.vae.config
    real_vae = _real(family, "vae")
    for key in VAE_KEYS:
        assert vae[key] == real_vae.get(key, vae[key]), key
    real_scheduler = _real(family, "scheduler")
    assert type(pipeline.scheduler).__name__ == real_scheduler["_class_name"]
    for key, value in real_scheduler.items():
        if not key.startswith("_"):
            assert pipeline.scheduler.config[key] == value, key
    for name in ("tokenizer", "tokenizer_2"):
        tokenizer = getattr(pipeline, name)
        if isinstance(tokenizer, CLIPTokenizer):
            assert concept_token_indices(tokenizer, "a photo of a bird", "bird") == [5]  # after BOS

    if family == "sdxl":
        unet, te, te2 = pipeline.unet.config, pipeline.text_encoder.config, pipeline.text_encoder_2.config
        assert unet.addition_embed_type == "text_time"
        assert unet.projection_class_embeddings_input_dim == te2.projection_dim + 6 * unet.addition_time_embed_dim
        assert unet.cross_attention_dim == te.hidden_size + te2.hidden_size and te.hidden_size != te2.hidden_size
        assert sum("CrossAttn" in block for block in unet.down_block_types) >= 2
        assert pipeline.config.force_zeros_for_empty_prompt is True
        assert pipeline.tokenizer_2.pad_token == "!" and pipeline.tokenizer.pad_token == "<|endoftext|>"
    elif family in ("sd3", "sd35"):
        dit, te, te2 = pipeline.transformer.config, pipeline.text_encoder.config, pipeline.text_encoder_2.config
        assert isinstance(pipeline.tokenizer_3, T5TokenizerFast)
        assert dit.joint_attention_dim == pipeline.text_encoder_3.config.d_model > te.hidden_size + te2.hidden_size
        assert dit.pooled_projection_dim == te.projection_dim + te2.projection_dim
        assert dit.caption_projection_dim == dit.num_attention_heads * dit.attention_head_dim
        assert dit.patch_size == 2 and dit.in_channels == dit.out_channels == vae.latent_channels == 16
        assert dit.qk_norm == ("rms_norm" if family == "sd35" else None)
        assert tuple(dit.dual_attention_layers) == ((0,) if family == "sd35" else ())
        assert concept_token_indices(pipeline.tokenizer_3, "a photo of a bird", "bird") == [4]
    else:
        dit = pipeline.transformer.config
        assert isinstance(pipeline.tokenizer_2, T5TokenizerFast)
        assert dit.patch_size == 1 and dit.in_channels == 4 * vae.latent_channels == 64
        assert dit.guidance_embeds is True
        assert sum(dit.axes_dims_rope) == dit.attention_head_dim
        assert dit.joint_attention_dim == pipeline.text_encoder_2.config.d_model
        assert dit.pooled_projection_dim == pipeline.text_encoder.config.hidden_size
        assert concept_token_indices(pipeline.tokenizer_2, "a photo of a bird", "bird") == [4]


@FAMILY_PARAMS
def test_tiny_folder_is_small(tiny_family_model: Path, family: str) -> None:
    size = sum(p.stat().st_size for p in tiny_family_model.rglob("*") if p.is_file())
    assert size < 5e6, f"{family}: {size / 1e6:.1f} MB"
    assert not list(tiny_family_model.parent.glob("*.partial"))
    for config in tiny_family_model.glob("*/config.json"):
        assert "_name_or_path" not in json.loads(config.read_text())


def test_tiny_model_is_deterministic_and_leaves_the_callers_rng_alone(tmp_path: Path) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    first = save_tiny_model(tmp_path / "a", "flux", seed=0)
    assert torch.equal(torch.rand(3), expected)
    second = save_tiny_model(tmp_path / "b", "flux", seed=0)
    other = save_tiny_model(tmp_path / "c", "flux", seed=1)
    weights = "transformer/diffusion_pytorch_model.safetensors"
    assert (first / weights).read_bytes() == (second / weights).read_bytes()
    assert (first / weights).read_bytes() != (other / weights).read_bytes()


def test_tiny_model_refusals(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="family must be one of"):
        save_tiny_model(tmp_path / "x", "sd2")
    with pytest.raises(ValueError, match="multiple of 4"):
        save_tiny_model(tmp_path / "x", "flux", sample_size=6)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "file").write_text("")
    with pytest.raises(FileExistsError):
        save_tiny_model(tmp_path / "full", "flux")


# ---------------------------------------------------------------- real configs

EXPECTED_FILES = {
    "sd15": ["unet", "vae", "text_encoder", "scheduler"],
    "sdxl": ["unet", "vae", "text_encoder", "text_encoder_2", "scheduler"],
    "sd3": ["transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3", "scheduler"],
    "sd35": ["transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3", "scheduler"],
    "flux": ["transformer", "vae", "text_encoder", "text_encoder_2", "scheduler"],
}


@pytest.mark.parametrize("family", CONFIG_FAMILIES)
def test_model_configs_are_the_hub_config_files_only(family: str) -> None:
    folder = MODEL_CONFIGS / family
    expected = {"model_index.json"} | {
        f"{part}/{'scheduler_config.json' if part == 'scheduler' else 'config.json'}" for part in EXPECTED_FILES[family]
    }
    assert {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()} == expected
    index = json.loads((folder / "model_index.json").read_text())
    for part in EXPECTED_FILES[family]:
        assert isinstance(index[part], list), part


def test_model_configs_hold_the_published_architectures() -> None:
    def cfg(family: str, part: str) -> dict:
        return _real(family, part)

    unet = cfg("sdxl", "unet")
    assert unet["transformer_layers_per_block"] == [1, 2, 10] and unet["cross_attention_dim"] == 2048
    assert unet["projection_class_embeddings_input_dim"] == 2816 == 1280 + 6 * unet["addition_time_embed_dim"]
    assert cfg("sdxl", "vae")["scaling_factor"] == 0.13025
    assert cfg("sd15", "unet")["cross_attention_dim"] == 768 == cfg("sd15", "text_encoder")["hidden_size"]
    sd3 = cfg("sd3", "transformer")
    assert (sd3["num_layers"], sd3["num_attention_heads"], sd3["attention_head_dim"]) == (24, 24, 64)
    assert (sd3["joint_attention_dim"], sd3["pooled_projection_dim"]) == (4096, 2048)  # T5-XXL; 768 + 1280
    assert sd3["caption_projection_dim"] == 1536 == 24 * 64
    sd35 = cfg("sd35", "transformer")
    assert (sd35["num_layers"], sd35["num_attention_heads"], sd35["qk_norm"]) == (38, 38, "rms_norm")
    for family, part in (("sd3", "vae"), ("sd35", "vae")):
        assert (cfg(family, part)["shift_factor"], cfg(family, part)["scaling_factor"]) == (0.0609, 1.5305)
    flux = cfg("flux", "transformer")
    assert (flux["num_layers"], flux["num_single_layers"], flux["num_attention_heads"]) == (19, 38, 24)
    assert (flux["attention_head_dim"], flux["in_channels"], flux["guidance_embeds"]) == (128, 64, True)
    assert (cfg("flux", "vae")["shift_factor"], cfg("flux", "vae")["scaling_factor"]) == (0.1159, 0.3611)
    assert cfg("flux", "scheduler")["use_dynamic_shifting"] is True
    for family, part in (("sd3", "text_encoder_3"), ("sd35", "text_encoder_3"), ("flux", "text_encoder_2")):
        t5 = cfg(family, part)
        assert (t5["d_model"], t5["d_ff"], t5["num_layers"], t5["vocab_size"]) == (4096, 10240, 24, 32128)
        assert t5["feed_forward_proj"] == "gated-gelu"


def test_model_config_parameter_counts_match_readme() -> None:
    """The README's table is what instantiating the configs on the meta device counts."""
    table = (MODEL_CONFIGS / "README.md").read_text()
    rows = re.findall(r"^\| (\w+) \| (\w+) \| ([\d,]+) \| [\d.]+ \|$", table, flags=re.MULTILINE)
    documented: dict[str, dict[str, int]] = {}
    for family, part, count in rows:
        documented.setdefault(family, {})[part] = int(count.replace(",", ""))
    for family in CONFIG_FAMILIES:
        assert _parameter_counts(family) == documented[family], family


def test_build_from_configs_refusals(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="family must be one of"):
        build_from_configs("sd2", tmp_path / "x")
    with pytest.raises(ValueError, match="num_layers"):
        build_from_configs("sdxl", tmp_path / "x", num_layers=0)


@pytest.fixture
def big_folder(tmp_path: Path):
    """A folder for a real-width model (1.3-2 GB), deleted after the test rather than kept with pytest's tmp dirs."""
    folder = tmp_path / "model"
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
def test_sdxl_from_real_configs_with_fewer_layers_loads_and_runs(big_folder: Path) -> None:
    from diffusers import StableDiffusionXLPipeline

    folder = build_from_configs("sdxl", big_folder, num_layers=1)
    pipeline = StableDiffusionXLPipeline.from_pretrained(folder, torch_dtype=torch.bfloat16, local_files_only=True)
    unet = pipeline.unet
    assert unet.config.cross_attention_dim == 2048 and unet.config.block_out_channels == [320, 640, 1280]
    assert unet.config.transformer_layers_per_block == [1, 1, 1] and unet.config.layers_per_block == 1
    assert pipeline.text_encoder_2.config.num_hidden_layers == 1 and pipeline.tokenizer.model_max_length == 77
    assert {p.dtype for p in pipeline.text_encoder_2.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        prompt_embeds, _, pooled, _ = pipeline.encode_prompt("a photo of a bird", do_classifier_free_guidance=False)
        assert prompt_embeds.shape == (1, 77, 2048) and pooled.shape == (1, 1280)
        latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
        time_ids = torch.tensor([[128, 128, 0, 0, 128, 128]], dtype=torch.bfloat16)
        out = unet(
            latents,
            torch.tensor([500]),
            encoder_hidden_states=prompt_embeds,
            added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
        ).sample
    assert out.shape == (1, 4, 16, 16) and out.dtype == torch.bfloat16 and torch.isfinite(out).all()


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd15", "sd3", "sd35", "flux"])
def test_real_config_folder_with_fewer_layers_makes_an_image(family: str, big_folder: Path) -> None:
    import diffusers

    folder = build_from_configs(family, big_folder, num_layers=1)
    index = json.loads((folder / "model_index.json").read_text())
    pipeline = getattr(diffusers, index["_class_name"]).from_pretrained(
        folder, torch_dtype=torch.bfloat16, local_files_only=True
    )
    denoiser = getattr(pipeline, "transformer", None) or pipeline.unet
    real = _real(family, "transformer" if family != "sd15" else "unet")
    for key in ("num_attention_heads", "attention_head_dim", "joint_attention_dim", "cross_attention_dim"):
        if key in real:
            assert denoiser.config[key] == real[key], key
    extra = {} if family == "sd15" else {"max_sequence_length": 32}
    images = pipeline(
        "a photo of a bird",
        num_inference_steps=1,
        height=64,
        width=64,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
        **extra,
    ).images
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()
