"""Tests of the diffusion layer: tiny SD-shaped parts, offline save/load, the space-to-depth latent, tokenizers."""

from __future__ import annotations

import json
import os

# huggingface_hub reads this when first imported: set it before diffusers/transformers are imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import shutil
import time
from pathlib import Path

import pytest
import torch

from conceptdistill.diffusion.latent import SpaceToDepthAutoencoder
from conceptdistill.diffusion.loading import (
    DiffusionParts,
    ModelNotFoundError,
    load_diffusion_parts,
    save_diffusion_parts,
)
from conceptdistill.diffusion.tiny import DEFAULT_WORDS, build_tiny_parts
from conceptdistill.diffusion.tokenizer import concept_token_indices, write_word_tokenizer

PROMPTS = ["a photo of a bird", "a photo of a background"]


def _unet_out(parts: DiffusionParts, latents: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    with torch.no_grad():
        timesteps = torch.tensor([10, 500])[: latents.shape[0]]
        return parts.denoiser(latents, timesteps, encoder_hidden_states=parts.encode_prompts(prompts)["encoder_hidden_states"]).sample


@pytest.fixture(scope="module")
def tiny() -> DiffusionParts:
    return build_tiny_parts()


@pytest.fixture(scope="module")
def saved_tiny(tiny: DiffusionParts, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_diffusion_parts(tiny, tmp_path_factory.mktemp("models") / "tiny-sd")


# ---------------------------------------------------------------- tiny parts


def test_tiny_parts_are_sd_shaped_deterministic_and_fast(tiny: DiffusionParts) -> None:
    start = time.perf_counter()
    again = build_tiny_parts()
    assert time.perf_counter() - start < 2.0
    for a, b in ((tiny.denoiser, again.denoiser), (tiny.vae, again.vae), (tiny.text_encoder, again.text_encoder)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    other = build_tiny_parts(seed=1)
    assert not torch.equal(next(other.denoiser.parameters()), next(tiny.denoiser.parameters()))

    assert tiny.latent_scale == pytest.approx(0.18215)
    assert tiny.vae_scale_factor == 2
    assert tiny.latent_shape_for(32) == (4, 16, 16) and tiny.native_image_size == 32 and tiny.denoiser_in_channels == 4 and tiny.latent_channels == 4
    assert tiny.scheduler.config.steps_offset == 1 and tiny.scheduler.config.beta_schedule == "scaled_linear"
    images = torch.rand(2, 3, 32, 32)
    latents = tiny.encode_images(images)
    assert latents.shape == (2, 4, 16, 16)
    decoded = tiny.decode_latents(latents)
    assert decoded.shape == (2, 3, 32, 32) and 0.0 <= decoded.min() and decoded.max() <= 1.0
    embeddings = tiny.encode_prompts(PROMPTS)["encoder_hidden_states"]
    assert embeddings.shape == (2, 16, 32)
    assert _unet_out(tiny, latents, PROMPTS).shape == latents.shape


def test_tiny_parts_build_does_not_disturb_global_rng() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_parts(seed=7)
    assert torch.equal(torch.rand(3), expected)


# ---------------------------------------------------------------- save / load


def test_saved_parts_load_back_identically(tiny: DiffusionParts, saved_tiny: Path) -> None:
    loaded = load_diffusion_parts(saved_tiny)
    assert type(loaded.scheduler) is type(tiny.scheduler)
    public = {k: v for k, v in tiny.scheduler.config.items() if not k.startswith("_")}
    assert {k: v for k, v in loaded.scheduler.config.items() if not k.startswith("_")} == public
    assert loaded.tokenizer("a photo of a dog").input_ids == tiny.tokenizer("a photo of a dog").input_ids
    assert torch.equal(loaded.encode_prompts(PROMPTS)["encoder_hidden_states"], tiny.encode_prompts(PROMPTS)["encoder_hidden_states"])
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(_unet_out(loaded, latents, PROMPTS), _unet_out(tiny, latents, PROMPTS))
    assert torch.equal(loaded.decode_latents(latents), tiny.decode_latents(latents))


def test_saved_parts_load_in_a_stock_pipeline(tiny: DiffusionParts, saved_tiny: Path) -> None:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(saved_tiny, local_files_only=True)
    sd = pipe.unet.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in tiny.denoiser.state_dict().items())
    pipe.set_progress_bar_config(disable=True)
    images = pipe(PROMPTS[0], num_inference_steps=2, height=32, width=32, output_type="pt").images
    assert images.shape == (1, 3, 32, 32)


def test_save_refuses_to_overwrite_unless_asked(tiny: DiffusionParts, tmp_path: Path) -> None:
    target = tmp_path / "model"
    target.mkdir()
    (target / "something").write_text("x")
    with pytest.raises(FileExistsError):
        save_diffusion_parts(tiny, target)
    save_diffusion_parts(tiny, target, overwrite=True)
    assert not (target / "something").exists() and (target / "model_index.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no staging or trash folders left behind


def test_a_loaded_and_saved_model_does_not_record_where_it_was_loaded_from(saved_tiny: Path, tmp_path: Path) -> None:
    resaved = save_diffusion_parts(load_diffusion_parts(saved_tiny), tmp_path / "again")
    for config in resaved.glob("*/config.json"):
        assert "_name_or_path" not in json.loads(config.read_text()), config
        assert str(saved_tiny) not in config.read_text()
    assert load_diffusion_parts(resaved).denoiser.config.sample_size == 16


def test_missing_folder_raises_model_not_found(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelNotFoundError) as info:
        load_diffusion_parts(missing)
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert str(missing) in message
    assert "huggingface-cli download" in message and "diffusion.path=" in message and "unet/" in message


def test_uncached_hub_id_raises_model_not_found() -> None:
    with pytest.raises(ModelNotFoundError, match="no-such-owner/no-such-model"):
        load_diffusion_parts("no-such-owner/no-such-model")


def test_incomplete_folder_raises_model_not_found(saved_tiny: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(saved_tiny, broken)
    shutil.rmtree(broken / "unet")
    with pytest.raises(ModelNotFoundError, match="lacks unet/") as info:
        load_diffusion_parts(broken)
    assert str(broken) in str(info.value) and "huggingface-cli download" in str(info.value)


def test_missing_weights_raise_model_not_found(saved_tiny: Path, tmp_path: Path) -> None:
    broken = tmp_path / "no-weights"
    shutil.copytree(saved_tiny, broken)
    for weights in (broken / "unet").glob("diffusion_pytorch_model*"):
        weights.unlink()
    with pytest.raises(ModelNotFoundError, match="could not be read"):
        load_diffusion_parts(broken)


# ---------------------------------------------------------------- space-to-depth latent


def test_space_to_depth_is_lossless_and_looks_like_a_vae() -> None:
    vae = SpaceToDepthAutoencoder()
    x = torch.rand(2, 3, 32, 48) * 2 - 1
    dist = vae.encode(x).latent_dist
    assert dist.sample().shape == (2, 12, 16, 24)
    assert torch.equal(dist.sample(torch.Generator().manual_seed(0)), dist.mode())
    assert torch.equal(vae.decode(dist.mode()).sample, x)
    assert torch.equal(vae.decode(dist.mode(), return_dict=False)[0], x)
    assert vae.config.latent_channels == 12 and vae.config.scaling_factor == 1.0
    assert 2 ** (len(vae.config.block_out_channels) - 1) == 2
    four = SpaceToDepthAutoencoder(factor=4)
    assert four.config.latent_channels == 48 and 2 ** (len(four.config.block_out_channels) - 1) == 4
    assert vae.to(torch.float16).dtype == torch.float16
    with pytest.raises(ValueError):
        SpaceToDepthAutoencoder(factor=3)
    with pytest.raises(ValueError):
        vae.encode(torch.zeros(1, 3, 31, 32))


def test_space_to_depth_save_load_round_trip(tmp_path: Path) -> None:
    vae = SpaceToDepthAutoencoder(factor=4, scaling_factor=0.5)
    vae.save_pretrained(tmp_path / "vae")
    # It has no weights: a folder holding only config.json must load.
    assert [p.name for p in (tmp_path / "vae").iterdir()] == ["config.json"]
    loaded = SpaceToDepthAutoencoder.from_pretrained(tmp_path / "vae")
    public = {k: v for k, v in vae.config.items() if not k.startswith("_")}
    assert {k: v for k, v in loaded.config.items() if not k.startswith("_")} == public
    half = SpaceToDepthAutoencoder.from_pretrained(tmp_path, subfolder="vae", torch_dtype=torch.float16)
    assert half.dtype == torch.float16 and half.config.factor == 4


def test_space_to_depth_parts_save_and_load(tmp_path: Path) -> None:
    parts = build_tiny_parts(latent="space_to_depth")
    assert parts.denoiser.config.in_channels == 12 and parts.vae_scale_factor == 2
    assert parts.latent_shape_for(32) == (12, 16, 16)
    assert build_tiny_parts(latent="space_to_depth", unet_in_channels=25).denoiser_in_channels == 25
    images = torch.rand(2, 3, 32, 32)
    latents = parts.encode_images(images)
    assert latents.shape == (2, 12, 16, 16)
    assert torch.allclose(parts.decode_latents(latents), images, atol=1e-6)

    folder = save_diffusion_parts(parts, tmp_path / "shapes")
    loaded = load_diffusion_parts(folder)
    assert isinstance(loaded.vae, SpaceToDepthAutoencoder)
    assert torch.equal(_unet_out(loaded, latents, PROMPTS), _unet_out(parts, latents, PROMPTS))

    # The stock pipeline finds our VAE class through the module path recorded in model_index.json.
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    assert isinstance(pipe.vae, SpaceToDepthAutoencoder) and pipe.vae_scale_factor == 2


# ---------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    return write_word_tokenizer(tmp_path_factory.mktemp("tok"), DEFAULT_WORDS, model_max_length=16)


def test_each_word_is_one_token(tokenizer) -> None:
    for word in DEFAULT_WORDS:
        ids = tokenizer(word, add_special_tokens=False).input_ids
        assert tokenizer.convert_ids_to_tokens(ids) == [f"{word}</w>"]
    ids = tokenizer("A photo of a BIRD").input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id and len(ids) == 7
    padded = tokenizer("a photo", padding="max_length", max_length=16, truncation=True).input_ids
    assert len(padded) == 16 and padded[-1] == tokenizer.pad_token_id


def test_words_sharing_pieces_stay_single_tokens(tmp_path: Path) -> None:
    # Independent merge chains would break these: "a r" (from "arms") fires inside "square", "an" inside
    # "banana", repeated letters compete with each other.
    words = ["arms", "square", "squares", "are", "an", "banana", "ban", "nab", "aaaa", "aa", "papa", "mississippi"]
    tok = write_word_tokenizer(tmp_path, words)
    for word in words:
        assert tok.tokenize(word) == [f"{word}</w>"]
    with pytest.raises(ValueError):
        write_word_tokenizer(tmp_path / "bad", ["two words"])


def test_word_tokenizer_round_trips_through_save(tokenizer, tmp_path: Path) -> None:
    from transformers import CLIPTokenizer

    tokenizer.save_pretrained(tmp_path)
    again = CLIPTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert again("a photo of a red circle").input_ids == tokenizer("a photo of a red circle").input_ids
    assert again.model_max_length == 16


def test_concept_token_indices(tokenizer) -> None:
    # BOS=0, a=1, photo=2, of=3, a=4, bird=5.
    assert concept_token_indices(tokenizer, "a photo of a bird", "bird") == [5]
    assert concept_token_indices(tokenizer, "a photo of a bird", ["bird"]) == [5]
    human = "a photo of a human with arms and legs"
    assert concept_token_indices(tokenizer, human, ["human", "arms", "legs"]) == [5, 7, 9]
    # Every mention of the word counts.
    assert concept_token_indices(tokenizer, "a photo of a", "a") == [1, 4]


def test_concept_token_indices_for_a_split_word(tokenizer) -> None:
    # "zebra" is not in the vocabulary: it falls back to characters z, e, b, r, a</w> (5 tokens).
    pieces = tokenizer("zebra", add_special_tokens=False).input_ids
    assert len(pieces) == 5
    assert concept_token_indices(tokenizer, "a photo of a zebra", "zebra") == [5, 6, 7, 8, 9]
    assert concept_token_indices(tokenizer, "a red zebra with legs", ["zebra", "legs"]) == [3, 4, 5, 6, 7, 9]


def test_concept_token_indices_missing_word(tokenizer) -> None:
    with pytest.raises(ValueError, match=r"'dog'.*'a photo of a bird'"):
        concept_token_indices(tokenizer, "a photo of a bird", "dog")
    # A word beyond model_max_length is truncated away, hence not found.
    long_prompt = "a photo of " + "the " * 20 + "bird"
    with pytest.raises(ValueError, match="bird"):
        concept_token_indices(tokenizer, long_prompt, "bird")
