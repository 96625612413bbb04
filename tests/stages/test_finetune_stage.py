"""Stage "finetune" (concept-distillation fine-tuning): the masked loss, the two tasks, the three adapters,
saving/loading (a stock diffusers pipeline loads our LoRA), exact resume, the stage through the runner,
and (slow) two DDP processes on the CPU."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from conftest import compose
from torch.utils.data import DataLoader, Dataset

from conceptdistill import runner
from conceptdistill.data.base import collate_samples
from conceptdistill.diffusion.adapters import LORA_WEIGHTS, load_finetuned
from conceptdistill.diffusion.loading import load_diffusion_parts
from conceptdistill.diffusion.tiny import build_tiny_parts
from conceptdistill.maskmath import rectangle_rules_for
from conceptdistill.modules.finetuner import ConceptDistillationFineTuner
from conceptdistill.modules.text_to_image import masked_mse

FOREGROUND = "a photo of a circle"
BACKGROUND = "a photo of a background"
RULES = rectangle_rules_for(16)  # the tiny UNet's 16x16 latent grid
pytestmark = pytest.mark.usefixtures("single_thread")



class TinyConceptData(Dataset):
    """Random 32 px images with a preliminary mask (a disk of radius 2-4 on the 16x16 latent grid)."""

    def __init__(self, n: int = 4, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.images = torch.rand(n, 3, 32, 32, generator=generator)
        rng = np.random.default_rng(seed)
        yy, xx = np.mgrid[:16, :16]
        self.masks = []
        for _ in range(n):
            cy, cx, radius = rng.integers(3, 13), rng.integers(3, 13), rng.integers(2, 5)
            self.masks.append(torch.from_numpy((yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"id": f"s{i:03d}", "image": self.images[i], "prelim_mask": self.masks[i], "caption": FOREGROUND}


def make_module(adapter: str = "lora", parts=None, **kwargs) -> ConceptDistillationFineTuner:
    kwargs.setdefault("learning_rate", 1e-2)
    return ConceptDistillationFineTuner(
        parts if parts is not None else build_tiny_parts(), adapter=adapter, foreground_prompt=FOREGROUND,
        background_prompt=BACKGROUND, rectangle=dict(RULES), **kwargs,
    )  # fmt: skip


def loader(n: int = 4, batch_size: int = 2) -> DataLoader:
    return DataLoader(TinyConceptData(n), batch_size=batch_size, shuffle=False, collate_fn=collate_samples)


def make_trainer(max_steps: int, callbacks=(), **kwargs) -> pl.Trainer:
    return pl.Trainer(
        max_steps=max_steps, accelerator="cpu", devices=1, logger=False, callbacks=list(callbacks),
        enable_checkpointing=any(isinstance(c, pl.callbacks.ModelCheckpoint) for c in callbacks),
        enable_progress_bar=False, enable_model_summary=False, **kwargs,
    )  # fmt: skip


def state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in module.state_dict().items()}


def unet_output(unet, parts, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, unet.config.in_channels, 16, 16, generator=generator)
    text = parts.encode_prompts([FOREGROUND, BACKGROUND])["encoder_hidden_states"]
    with torch.no_grad():
        return unet(latents, torch.tensor([10, 600]), encoder_hidden_states=text).sample


# ----- the masked loss -----------------------------------------------------------------------------
def test_masked_mse_with_full_mask_is_mse_loss():
    generator = torch.Generator().manual_seed(0)
    prediction, target = torch.randn(3, 4, 8, 8, generator=generator), torch.randn(3, 4, 8, 8, generator=generator)
    ones = torch.ones(3, 1, 8, 8)
    torch.testing.assert_close(masked_mse(prediction, target, ones), F.mse_loss(prediction, target))


def test_masked_mse_empty_mask_sample_contributes_zero():
    generator = torch.Generator().manual_seed(1)
    prediction = torch.randn(3, 4, 8, 8, generator=generator, requires_grad=True)
    target = torch.randn(3, 4, 8, 8, generator=generator)
    mask = torch.ones(3, 1, 8, 8)
    mask[1] = 0
    mask[2, :, :4] = 0  # half the pixels: the mean over those pixels only
    loss = masked_mse(prediction, target, mask)
    expected = (
        F.mse_loss(prediction[0], target[0]) + 0.0 + F.mse_loss(prediction[2, :, 4:], target[2, :, 4:])
    ) / 3
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert torch.count_nonzero(prediction.grad[1]) == 0
    assert torch.count_nonzero(prediction.grad[2, :, :4]) == 0
    assert torch.count_nonzero(prediction.grad[0]) > 0


# ----- the two tasks -------------------------------------------------------------------------------
def rectangle_explains(loss_mask: np.ndarray, background: np.ndarray) -> bool:
    """Is `loss_mask` the background pixels inside one rectangle obeying the (16x16-scaled) paper rules?"""
    rows, cols = np.nonzero(loss_mask)
    if len(rows) == 0:
        return False
    grid_h, grid_w = loss_mask.shape
    for height in range(RULES["min_side"], grid_h + 1):
        for width in range(RULES["min_side"], grid_w + 1):
            area = height * width
            if not RULES["min_area"] <= area <= RULES["max_area"]:
                continue
            if height > RULES["max_side"] and width > RULES["max_side"]:
                continue
            for top in range(max(0, rows.max() - height + 1), min(rows.min(), grid_h - height) + 1):
                for left in range(max(0, cols.max() - width + 1), min(cols.min(), grid_w - width) + 1):
                    window = background[top : top + height, left : left + width]
                    if window.mean() < RULES["min_background_fraction"]:
                        continue
                    expected = np.zeros_like(background)
                    expected[top : top + height, left : left + width] = window
                    if np.array_equal(expected, loss_mask):
                        return True
    return False


@pytest.fixture(scope="module")
def planning_parts():
    """Shared by the planning tests' modules ("full" mode: no adapter surgery on the shared UNet)."""
    return build_tiny_parts()


def test_background_task_masks_background_inside_one_rectangle(planning_parts):
    module = make_module("full", parts=planning_parts, background_probability=1.0)
    batch = collate_samples([TinyConceptData(8)[i] for i in range(8)])
    captions, loss_mask = module.plan_batch(batch, (16, 16))
    assert captions == [BACKGROUND] * 8
    assert loss_mask.shape == (8, 1, 16, 16)
    for i in range(8):
        background = ~batch["prelim_mask"][i].numpy()
        mask = loss_mask[i, 0].numpy().astype(bool)
        assert not (mask & ~background).any(), "the loss may only cover background pixels of M_pre"
        assert rectangle_explains(mask, background), f"sample {i}: not background-within-one-valid-rectangle"


def test_object_task_has_full_mask_and_foreground_prompt(planning_parts):
    batch = collate_samples([TinyConceptData(8)[i] for i in range(8)])
    for module, plan_input in (
        (make_module("full", parts=planning_parts, background_probability=0.0), batch),
        # without preliminary masks there is no background task, whatever the probability
        (make_module("full", parts=planning_parts, background_probability=1.0),
         {k: v for k, v in batch.items() if k != "prelim_mask"}),
    ):  # fmt: skip
        captions, loss_mask = module.plan_batch(plan_input, (16, 16))
        assert captions == [FOREGROUND] * 8
        assert torch.equal(loss_mask, torch.ones(8, 1, 16, 16))


def test_plan_is_deterministic_per_seed_step_and_sample(planning_parts, monkeypatch):
    samples = [TinyConceptData(8)[i] for i in range(8)]
    batch = collate_samples(samples)
    reversed_batch = collate_samples(samples[::-1])
    step = {"value": 0}
    monkeypatch.setattr(ConceptDistillationFineTuner, "global_step", property(lambda self: step["value"]))

    def plans(seed: int, batch: dict):
        module = make_module("full", parts=planning_parts, background_probability=0.5, seed=seed)
        captions, mask = module.plan_batch(batch, (16, 16))
        return captions, mask

    first = plans(0, batch)
    again = plans(0, batch)
    assert first[0] == again[0] and torch.equal(first[1], again[1])
    # a sample's plan depends on its id, not on its place in the batch
    captions_r, mask_r = plans(0, reversed_batch)
    assert captions_r[::-1] == first[0] and torch.equal(mask_r.flip(0), first[1])

    # another step or another seed gives other draws; over 8 samples x 4 steps both tasks occur
    tasks = set()
    by_step = []
    for value in range(4):
        step["value"] = value
        captions, mask = plans(0, batch)
        tasks.update(captions)
        by_step.append((captions, mask))
    assert tasks == {FOREGROUND, BACKGROUND}
    assert any(by_step[0][0] != c or not torch.equal(by_step[0][1], m) for c, m in by_step[1:])
    step["value"] = 0
    other_seed = plans(1, batch)
    assert other_seed[0] != first[0] or not torch.equal(other_seed[1], first[1])


# ----- the adapters --------------------------------------------------------------------------------
def test_lora_mode_trains_only_lora_weights():
    module = make_module("lora")
    unet_before, text_before, vae_before = state(module.denoiser), state(module.text_encoders), state(module.vae)
    assert all("lora_" in name for name, p in module.denoiser.named_parameters() if p.requires_grad)
    make_trainer(3).fit(module, loader())
    unet_after = state(module.denoiser)
    lora_b = [key for key in unet_after if "lora_B" in key]
    assert lora_b
    for key, value in unet_after.items():
        if "lora_" in key:
            continue
        assert torch.equal(value, unet_before[key]), f"base weight {key} changed in lora mode"
    for key in lora_b:  # lora_B starts at zero: every one of them must have moved
        assert not torch.equal(unet_after[key], unet_before[key]), key
    assert all(torch.equal(v, text_before[k]) for k, v in state(module.text_encoders).items())
    assert all(torch.equal(v, vae_before[k]) for k, v in state(module.vae).items())


def test_lora_init_follows_the_seed_not_the_global_rng():
    torch.manual_seed(123)
    first = state(make_module("lora", seed=0).denoiser)
    torch.manual_seed(456)
    rng_before = torch.random.get_rng_state()
    second = state(make_module("lora", seed=0).denoiser)
    assert torch.equal(torch.random.get_rng_state(), rng_before), "building the module consumed the global RNG"
    assert all(torch.equal(first[key], second[key]) for key in first)
    other = state(make_module("lora", seed=1).denoiser)
    assert any(not torch.equal(first[key], other[key]) for key in first if "lora_A" in key)


def test_full_mode_trains_base_weights():
    module = make_module("full", learning_rate=1e-3)
    before = state(module.denoiser)
    assert not any("lora_" in key for key in before)
    text_before = state(module.text_encoders)
    make_trainer(2).fit(module, loader())
    after = state(module.denoiser)
    changed = [key for key in after if not torch.equal(after[key], before[key])]
    assert "conv_in.weight" in changed
    assert any("attn2.to_k.weight" in key for key in changed)
    assert len(changed) >= 0.9 * len(after)
    assert all(torch.equal(v, text_before[k]) for k, v in state(module.text_encoders).items())


def test_full_mode_trains_float32_master_weights_of_a_half_precision_model():
    """A model loaded in half precision (GPU runs) is fine-tuned in full with float32 weights: AdamW steps of
    1e-5 relative size vanish in bfloat16 (7 significant bits), and mixed precision refuses float16 gradients."""
    from conceptdistill.diffusion.adapters import add_adapter

    parts = build_tiny_parts()
    parts.denoiser.to(torch.bfloat16)
    add_adapter(parts.denoiser, "full", rank=4, alpha=4.0, targets=("to_q",), seed=0)
    assert {p.dtype for p in parts.denoiser.parameters()} == {torch.float32}
    assert all(p.requires_grad for p in parts.denoiser.parameters())


def test_inpaint9_widens_the_unet_and_starts_from_the_original():
    parts = build_tiny_parts()
    latent_channels = parts.latent_channels
    reference = build_tiny_parts().denoiser  # same seed: bit-identical weights
    module = make_module("inpaint9", parts=parts)
    assert module.denoiser.conv_in.in_channels == 2 * latent_channels + 1
    assert module.denoiser.config.in_channels == 2 * latent_channels + 1 == parts.denoiser_in_channels
    assert module.denoiser.conv_in.weight.requires_grad

    generator = torch.Generator().manual_seed(3)
    latents = torch.randn(2, latent_channels, 16, 16, generator=generator)
    timesteps = torch.tensor([5, 900])
    text = parts.encode_prompts([FOREGROUND, BACKGROUND])["encoder_hidden_states"]
    with torch.no_grad():
        expected = reference(latents, timesteps, encoder_hidden_states=text).sample
        for _ in range(2):  # any extra input: the new channels' weights are zero
            extra = torch.randn(2, latent_channels + 1, 16, 16, generator=generator) * 5
            widened = module.denoiser(torch.cat([latents, extra], 1), timesteps, encoder_hidden_states=text).sample
            torch.testing.assert_close(widened, expected, atol=1e-5, rtol=1e-5)
    # and it trains (9-channel input path of training_step)
    make_trainer(1).fit(module, loader())


# ----- saving and loading --------------------------------------------------------------------------
def test_saved_lora_loads_into_stock_pipeline_and_load_finetuned(tiny_model, tmp_path):
    from diffusers import StableDiffusionPipeline

    # lora_alpha != rank: the scale must survive saving (the file carries the adapter config)
    module = make_module("lora", parts=load_diffusion_parts(tiny_model), lora_rank=4, lora_alpha=8)
    make_trainer(2).fit(module, loader())
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():  # make the update large enough to change samples visibly
        for name, parameter in module.denoiser.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    path = module.export(tmp_path / "weights")
    assert path == tmp_path / "weights" / LORA_WEIGHTS and path.exists()
    trained = unet_output(module.denoiser, module.parts)

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)

    def sample() -> torch.Tensor:
        return pipe(FOREGROUND, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                    output_type="latent").images

    plain = sample()
    pipe.load_lora_weights(tmp_path / "weights")
    with_lora = sample()
    assert with_lora.shape == plain.shape == (1, 4, 16, 16)
    assert (with_lora - plain).abs().max() > 1e-3
    torch.testing.assert_close(unet_output(pipe.unet, module.parts), trained, atol=1e-5, rtol=1e-4)

    fresh = load_finetuned(load_diffusion_parts(tiny_model), tmp_path / "weights")
    torch.testing.assert_close(unet_output(fresh.denoiser, fresh), trained, atol=1e-5, rtol=1e-4)
    base = load_diffusion_parts(tiny_model)
    assert (unet_output(base.denoiser, base) - trained).abs().max() > 1e-3


def test_resumed_training_equals_uninterrupted(tmp_path):
    """4 steps in one go vs. resuming the step-2 checkpoint (epoch boundary, fixed data order): identical,
    including the AdamW state, the warm-up schedule and the EMA weights."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    settings = dict(background_probability=0.5, warmup_steps=3, ema_decay=0.9)
    uninterrupted = make_module(**settings)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    make_trainer(4, callbacks=[checkpoints]).fit(uninterrupted, loader(4, 2))
    step2 = tmp_path / "ckpt" / "epoch=0-step=2.ckpt"
    assert step2.exists(), sorted(p.name for p in (tmp_path / "ckpt").iterdir())

    resumed = make_module(**settings)
    trainer = make_trainer(4)
    trainer.fit(resumed, loader(4, 2), ckpt_path=str(step2))
    assert trainer.global_step == 4
    expected, actual = state(uninterrupted.denoiser), state(resumed.denoiser)
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(actual[key], expected[key]), key
    for a, b in zip(uninterrupted.ema.shadow_params, resumed.ema.shadow_params, strict=True):
        assert torch.equal(a, b)
    assert uninterrupted.ema.optimization_step == resumed.ema.optimization_step == 4


# ----- the stage through the runner ----------------------------------------------------------------
def test_finetune_stage_through_runner(tiny_model, tmp_path):
    from PIL import Image

    overrides = [
        "stages=[masks,finetune]", "logger=none", f"diffusion.path={tiny_model}",
        "data.num_train=8", "data.num_test=4", "masks.module.num_steps=10", "masks.module.start_step=4", "masks.batch_size=4",
        "finetune.max_steps=3", "finetune.sample_every=0", "finetune.sample_steps=2", "finetune.batch_size=4",
        "finetune.sample_count=2",
    ]  # fmt: skip
    run_dir = tmp_path / "run"
    summaries = runner.run(compose(overrides, run_dir=run_dir))
    folder = run_dir / "finetune"
    summary = summaries["finetune"]
    assert (folder / "weights" / LORA_WEIGHTS).exists()
    assert summary["adapter"] == "lora" and summary["steps"] == 3
    assert summary["weights"] == f"finetune/weights/{LORA_WEIGHTS}"
    assert summary["trainable_parameters"] > 0
    assert np.isfinite(summary["loss_first_tenth"]) and np.isfinite(summary["loss_last_tenth"])
    history = json.loads((folder / "loss.json").read_text())["step_loss"]
    assert [step for step, _ in history] == [1, 2, 3]
    samples = sorted((folder / "samples").glob("*.png"))
    assert samples, "no sample grid written"
    with Image.open(samples[-1]) as image:
        assert image.size[0] > 0
    assert (folder / "DONE.json").exists()
    # the weights apply to a fresh copy of the model
    parts = load_finetuned(load_diffusion_parts(tiny_model), folder / "weights")
    assert torch.isfinite(unet_output(parts.denoiser, parts)).all()


# ----- DDP on two CPU processes (slow) -------------------------------------------------------------
class RankRecorder(pl.Callback):
    """Writes, per rank, the sample ids it trained on and a digest of its trainable weights at the end."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.ids: list[list[str]] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_index) -> None:
        self.ids.append(list(batch["id"]))

    def on_train_end(self, trainer, module) -> None:
        digest = hashlib.sha256()
        for parameter in module.trainable_parameters():
            digest.update(parameter.detach().cpu().numpy().tobytes())
        record = {"rank": trainer.global_rank, "world_size": trainer.world_size, "global_step": trainer.global_step,
                  "ids": self.ids, "digest": digest.hexdigest()}
        Path(self.folder, f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


@pytest.mark.slow
def test_two_ddp_steps_on_two_cpu_processes(tmp_path):
    from pytorch_lightning.strategies import DDPStrategy

    module = make_module("lora")
    before = state(module.denoiser)
    trainer = pl.Trainer(
        max_steps=2, accelerator="cpu", devices=2,
        strategy=DDPStrategy(start_method="spawn", process_group_backend="gloo"),
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[RankRecorder(str(tmp_path))],
    )  # fmt: skip
    trainer.fit(module, loader(8, 2))

    records = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for rank, record in enumerate(records):
        assert record["rank"] == rank and record["world_size"] == 2 and record["global_step"] == 2
        assert len(record["ids"]) == 2 and all(len(ids) == 2 for ids in record["ids"])
    seen = [sid for record in records for ids in record["ids"] for sid in ids]
    assert len(seen) == len(set(seen)) == 8, "each rank must train on its own samples"
    assert records[0]["digest"] == records[1]["digest"], "DDP ranks' weights diverged"

    # rank 0's weights come back to this process: LoRA moved, the base did not
    after = state(module.denoiser)
    changed = [key for key in after if not torch.equal(after[key], before[key])]
    assert changed and all("lora_" in key for key in changed)


def test_gradient_checkpointing_changes_memory_not_gradients():
    batch = next(iter(loader(2)))
    grads = {}
    for checkpointing in (False, True):
        module = make_module("lora", gradient_checkpointing=checkpointing, background_probability=0.5)
        module.train()
        assert module.denoiser.is_gradient_checkpointing == checkpointing
        module.training_step(batch, 0).backward()
        grads[checkpointing] = {k: p.grad.clone() for k, p in module.denoiser.named_parameters() if p.requires_grad}
    assert grads[True].keys() == grads[False].keys() and grads[True]
    for key, grad in grads[False].items():
        torch.testing.assert_close(grads[True][key], grad, rtol=1e-5, atol=1e-7)
