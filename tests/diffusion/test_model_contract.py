"""What a real model folder may claim, and that no run ends with a silently wrong result: prediction types,
scheduler classes, image sizes, non-finite numbers, and settings checked before any work."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose
from test_end_to_end import ALL_STAGES, TINY_STEPS

from conceptdistill.checks import SettingsError
from conceptdistill.diffusion.adapters import NonFiniteLossError
from conceptdistill.diffusion.loading import (
    ModelNotFoundError,
    UnsupportedModelError,
    load_diffusion_parts,
    save_diffusion_parts,
)
from conceptdistill.diffusion.tiny import build_tiny_parts
from conceptdistill.modules.finetuner import ConceptDistillationFineTuner
from conceptdistill.modules.masker import AttentionMaskGenerator
from conceptdistill.runner import run

SCHEDULERS = ("DDIMScheduler", "PNDMScheduler", "EulerDiscreteScheduler")


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    yield


def saved(tmp_path: Path, **options) -> Path:
    return save_diffusion_parts(build_tiny_parts(**options), tmp_path / "model")


def shapes_run(tmp_path: Path, model: Path, *extra: str, stages=ALL_STAGES) -> tuple[Path, dict]:
    run_dir = tmp_path / "run"
    cfg = compose([f"stages=[{','.join(stages)}]", f"diffusion.path={model}", "data.num_train=8", "data.num_test=4",
                   "logger=none", *TINY_STEPS, *extra], run_dir=run_dir)
    return run_dir, run(cfg)


def images_and_ids(count: int = 2, size: int = 32) -> tuple[torch.Tensor, list[str]]:
    generator = torch.Generator().manual_seed(0)
    return torch.rand(count, 3, size, size, generator=generator), [f"img-{i}" for i in range(count)]


# ----- 1. prediction type -------------------------------------------------------------------------------------
def oracle_loss(parts, prediction_type: str) -> float:
    """The fine-tuning loss of a UNet that outputs exactly the right answer for the model's parametrisation,
    derived from the noised input it is given and the clean latents: zero only if the loss regresses on it."""
    module = ConceptDistillationFineTuner(parts, adapter="full", background_probability=0.0, seed=0)
    images, ids = images_and_ids(4)
    clean = parts.encode_images(images)
    alphas = parts.noise_scheduler.alphas_cumprod

    def oracle(noisy, timesteps, encoder_hidden_states=None):
        a = alphas[timesteps].view(-1, 1, 1, 1)
        eps = (noisy - a.sqrt() * clean) / (1 - a).sqrt()
        answer = eps if prediction_type == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * clean
        return type("Output", (), {"sample": answer})()

    module.denoiser.forward = oracle
    return float(module.training_step({"id": ids, "image": images}, 0))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_finetuning_regresses_on_what_the_model_predicts(prediction_type):
    parts = build_tiny_parts(prediction_type=prediction_type)
    assert parts.prediction_type == prediction_type
    assert oracle_loss(parts, prediction_type) < 1e-8


def test_v_target_is_diffusers_velocity():
    parts = build_tiny_parts(prediction_type="v_prediction")
    latents, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([1, 500, 999])
    a = parts.noise_scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.allclose(parts.training_target(latents, noise, t), a.sqrt() * noise - (1 - a).sqrt() * latents)
    assert torch.equal(build_tiny_parts().training_target(latents, noise, t), noise)


@pytest.mark.parametrize(("key", "value", "named"), [
    ("prediction_type", "sample", "prediction_type='sample'"),
    ("_class_name", "FlowMatchEulerDiscreteScheduler", "flow-matching"),
])
def test_unsupported_denoiser_targets_are_refused_at_load_time(tmp_path, key, value, named):
    folder = saved(tmp_path)
    config_path = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config[key] = value
    config_path.write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match=named.replace("(", r"\(")):
        load_diffusion_parts(folder)


def test_the_family_is_what_the_folder_says_and_unknown_pipelines_are_refused(tmp_path):
    folder = saved(tmp_path)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "KandinskyV22Pipeline"}))
    with pytest.raises(UnsupportedModelError, match="KandinskyV22Pipeline.*supported pipelines: .*FluxPipeline"):
        load_diffusion_parts(folder)
    # A folder without model_index.json is judged by its subfolders: two text encoders make it SDXL, whose
    # second tokenizer is then missing; a transformer with T5 makes it SD3, which needs a transformer config.
    (folder / "model_index.json").unlink()
    shutil.copytree(folder / "text_encoder", folder / "text_encoder_2")
    with pytest.raises(ModelNotFoundError, match="tokenizer_2/"):
        load_diffusion_parts(folder)
    (folder / "unet").rename(folder / "transformer")
    shutil.copytree(folder / "text_encoder", folder / "text_encoder_3")
    with pytest.raises(ModelNotFoundError, match="tokenizer_3/"):
        load_diffusion_parts(folder)


# ----- 2. scheduler class ------------------------------------------------------------------------------------
def test_noising_is_variance_preserving_whatever_the_scheduler_class():
    latents = torch.randn(64, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(64, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    t = torch.full((64,), 781)
    noised = {name: build_tiny_parts(scheduler=name).add_noise(latents, noise, t) for name in SCHEDULERS}
    for name in SCHEDULERS:
        assert torch.equal(noised[name], noised["DDIMScheduler"]), name
        assert 0.9 < float(noised[name].std()) < 1.1, (name, float(noised[name].std()))  # Euler's x0 + sigma eps: 4.8


def test_attention_maps_and_losses_do_not_depend_on_the_scheduler_class():
    images, ids = images_and_ids()
    maps, losses = {}, {}
    for name in SCHEDULERS:
        parts = build_tiny_parts(scheduler=name)
        masker = AttentionMaskGenerator(parts, prompt="a photo of a bird", concept=["bird"], num_steps=10, start_step=4)
        maps[name] = masker.attention_maps(images, ids)[0]
        module = ConceptDistillationFineTuner(parts, adapter="full", background_probability=0.0, seed=0)
        losses[name] = float(module.training_step({"id": ids, "image": images}, 0))
    for name in SCHEDULERS:
        assert torch.equal(maps[name], maps["DDIMScheduler"]), name
        assert losses[name] == losses["DDIMScheduler"], (name, losses)


# ----- every stage, by overrides only: v-prediction, an Euler config, a non-native size ----------------------
@pytest.mark.parametrize(("options", "extra"), [
    ({"prediction_type": "v_prediction"}, []),
    ({"scheduler": "EulerDiscreteScheduler"}, []),
    ({}, ["data.image_size=48"]),  # the tiny UNet is configured for 32 px (16x16 latents)
], ids=["v_prediction", "euler_config", "non_native_size"])
def test_default_experiment_runs_every_stage(tmp_path, options, extra):
    run_dir, summaries = shapes_run(tmp_path, saved(tmp_path, **options), *extra)
    assert list(summaries) == ALL_STAGES
    results = json.loads((run_dir / "report" / "results.json").read_text())
    assert {"preliminary_masks", "refined_masks", "unet_refined_synthetic"} <= set(results["rows"])
    side = (48 if extra else 32) // 2
    attention = np.load(next((run_dir / "masks" / "train" / "attention").glob("*.npy")))
    assert attention.shape == (side, side) and np.isfinite(attention).all()


def test_an_image_size_the_vae_cannot_take_is_refused_before_any_work(tmp_path):
    with pytest.raises(ValueError, match=r"data\.image_size=33"):
        shapes_run(tmp_path, saved(tmp_path), "data.image_size=33", stages=["masks"])
    assert not list((tmp_path / "run" / "masks").rglob("*.png"))


# ----- 4. non-finite numbers ---------------------------------------------------------------------------------
def test_a_nan_latent_skips_that_image_everywhere_and_is_counted(tmp_path, monkeypatch):
    from conceptdistill.diffusion.parts import DiffusionParts
    from conceptdistill.world.datamodule import ShapesWorldDataModule

    cfg = compose(["data.num_train=8", "data.num_test=4"])
    poisoned_id = "train-000003"
    train = ShapesWorldDataModule(**{k: v for k, v in cfg.data.items() if k != "_target_"}).dataset("train")
    poisoned = next(train[i]["image"] for i in range(len(train)) if train[i]["id"] == poisoned_id)
    encode = DiffusionParts.encode_images

    def overflowing_vae(self, images, **kwargs):  # as a float16 VAE overflowing on one picture does
        latents = encode(self, images, **kwargs)
        for i, image in enumerate(images):
            if torch.equal(image.cpu(), poisoned):
                latents[i] = float("nan")
        return latents

    monkeypatch.setattr(DiffusionParts, "encode_images", overflowing_vae)
    run_dir, summaries = shapes_run(tmp_path, saved(tmp_path))
    assert summaries["masks"]["train"]["skipped_in_stage"] == 1
    assert list(summaries["masks"]["train"]["skipped_ids"]) == [poisoned_id]
    assert summaries["inpaint"]["train"]["missing_upstream"] == 1
    assert summaries["inpaint"]["train"]["images"] == 7
    from safetensors.torch import load_file

    lora = load_file(run_dir / "finetune" / "weights" / "pytorch_lora_weights.safetensors")
    assert all(torch.isfinite(tensor).all() for tensor in lora.values())
    backgrounds = sorted((run_dir / "inpaint" / "train" / "background").glob("*.png"))
    assert len(backgrounds) == 7 and poisoned_id not in {p.stem for p in backgrounds}


def test_a_nonfinite_loss_stops_finetuning_with_step_and_ids_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    from conceptdistill.diffusion.parts import DiffusionParts

    model = saved(tmp_path)
    shapes_run(tmp_path, model, stages=["masks"])
    target = DiffusionParts.training_target
    calls = {"n": 0}

    def diverging(self, latents, noise, timesteps):
        calls["n"] += 1
        value = target(self, latents, noise, timesteps)
        return value * float("nan") if calls["n"] == 3 else value

    monkeypatch.setattr(DiffusionParts, "training_target", diverging)
    with pytest.raises(NonFiniteLossError, match=r"at step 2 for the batch \['"):
        shapes_run(tmp_path, model, "finetune.max_steps=4", "finetune.checkpoint_every=2", stages=["finetune"])
    folder = tmp_path / "run" / "finetune"
    assert not (folder / "DONE.json").exists() and not (folder / "weights").exists()
    assert torch.load(folder / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2


def test_the_writer_never_writes_nonfinite_outputs(tmp_path):
    from conceptdistill.pipeline.artifacts import ArtifactStore, SampleWriter, pending

    store = ArtifactStore(tmp_path, {"attention": "array", "mask": "mask"})
    good, bad = np.ones((4, 4)), np.full((4, 4), np.nan)
    SampleWriter(store).write_on_batch_end(None, None, [
        {"id": "a", "attention": good, "mask": good > 0},
        {"id": "b", "attention": bad, "mask": good > 0},
        {"id": "c", "skipped": "told so"},
    ], None, None, 0)
    assert store.has("a") and not store.has("b") and not store.has("c")
    assert not store.path("mask", "b").exists()  # none of a broken sample's files
    assert store.skipped() == {"b": "non-finite values in attention", "c": "told so"}
    assert len(pending(type("Ids", (), {"sample_ids": lambda self: ["a", "b", "c", "d"], "__len__": lambda self: 4})(),
                       store)) == 1  # skipped samples count as finished


@pytest.mark.parametrize("force_upcast", [True, False])
def test_float16_models_keep_the_vae_in_float32_where_its_config_asks(tmp_path, force_upcast):
    folder = saved(tmp_path)
    config_path = folder / "vae" / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "force_upcast": force_upcast}))
    parts = load_diffusion_parts(folder, dtype=torch.float16)
    assert parts.denoiser.dtype == torch.float16
    assert parts.vae.dtype == (torch.float32 if force_upcast else torch.float16)


# ----- 5. settings checked before any work ------------------------------------------------------------------
@pytest.mark.parametrize(("overrides", "named"), [
    (["masks.module.num_steps=1000", "masks.module.start_step=1000"], "masks.module.num_steps=1000"),  # was an IndexError
    (["masks.module.start_step=0"], "masks.module.start_step=0"),  # was "no attention captured yet"
    (["masks.module.num_steps=10", "masks.module.start_step=20"], "masks.module.start_step=20"),  # ran silently with 10 steps
    (["masks.module.num_steps=2000", "masks.module.start_step=40"], "masks.module.num_steps=2000"),
    (["inpaint.module.num_steps=0"], "inpaint.module.num_steps=0"),
    (["finetune.max_steps=-1"], "finetune.max_steps=-1"),  # Lightning's "no limit": trained for 1000 epochs
    (["segment.max_steps=-1"], "segment.max_steps=-1"),
    (["segment.max_steps=0"], "segment.max_steps=0"),  # scored untrained U-Nets under the usual labels
    (["synthesize.num_samples=0"], "synthesize.num_samples=0"),  # scored "(D, M) u D'_s" with no D'_s
    (["data.num_test=0"], "data.num_test=0"),  # failed after the masks stage was moved aside
    (["segment.sources=[refined,bogus]"], "segment.sources"),  # was a ValueError from the module, after masks
])
def test_timestep_grid_settings_are_refused_before_any_work(tmp_path, overrides, named):
    with pytest.raises(SettingsError, match=named.replace(".", r"\.")):
        shapes_run(tmp_path, saved(tmp_path), *overrides, stages=["masks", "inpaint"])
    assert not list((tmp_path / "run").rglob("*.npy"))


def test_a_concept_given_as_a_plain_string_is_one_word(tmp_path):
    run_dir, summaries = shapes_run(tmp_path, saved(tmp_path), "concept=circle", stages=["masks"])
    assert summaries["masks"]["train"]["images"] == 8
    assert json.loads((run_dir / "masks" / "DONE.json").read_text())["summary"]["train"]["skipped_in_stage"] == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_a_gpu_trainer_without_a_gpu_says_use_trainer_cpu_before_loading(tmp_path, monkeypatch):
    import conceptdistill.diffusion.loading as loading

    monkeypatch.setattr(loading, "load_diffusion_parts", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(SettingsError, match="trainer=cpu"):
        shapes_run(tmp_path, saved(tmp_path), "trainer=gpu", stages=["masks"])


def test_a_folder_of_fp16_variant_weights_says_set_diffusion_variant(tmp_path):
    folder = saved(tmp_path)
    for weights in [*folder.glob("*/diffusion_pytorch_model.safetensors"), *folder.glob("*/model.safetensors")]:
        weights.rename(weights.with_name(weights.name.replace(".safetensors", ".fp16.safetensors")))
    with pytest.raises(ModelNotFoundError, match=r"set diffusion\.variant=fp16"):
        load_diffusion_parts(folder)
    assert load_diffusion_parts(folder, variant="fp16").denoiser is not None
