"""Tests of stage 3 (background inpainting, refined masks) and of the synthetic set built on it.

- An oracle UNet that knows each image's clean latent makes DDIM (eta 0, no clipping) reproduce the input,
  which pins down the whole inpainting trajectory, the latent blending and the noise bookkeeping.
- With the random tiny UNet, latent blending keeps the known region.
- Through `runner.run`, the refined mask M never leaves the upsampled preliminary mask M_pre.
- The synthetic set does not depend on how its ids are split into shards or batches.
"""

from __future__ import annotations

import os
import types

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from conftest import compose
from diffusers import DDIMScheduler
from torch.utils.data import Subset

from conceptdistill.diffusion.sampling import inpaint_latents
from conceptdistill.diffusion.tiny import build_tiny_parts
from conceptdistill.maskmath import upsample_mask
from conceptdistill.modules.inpainter import BackgroundInpainter
from conceptdistill.utils.seeding import sample_generators

BACKGROUND_PROMPT = "a photo of a background"
pytestmark = pytest.mark.usefixtures("single_thread")


# --------------------------------------------------------------------------------------------------
# An oracle UNet: the exact epsilon for known clean latents
# --------------------------------------------------------------------------------------------------


class OracleUNet(torch.nn.Module):
    """Stands in for UNet2DConditionModel; knows z0 of every batch item and returns the true noise

        eps = (z_t - sqrt(abar_t) z0) / sqrt(1 - abar_t),

    so DDIM's predicted x0 is z0 at every step. Computed in float64."""

    def __init__(self, clean_latents: torch.Tensor, alphas_cumprod: torch.Tensor) -> None:
        super().__init__()
        channels, size = clean_latents.shape[1], clean_latents.shape[-1]
        self.config = types.SimpleNamespace(in_channels=channels, out_channels=channels, sample_size=size)
        self.register_buffer("z0", clean_latents.detach().clone())
        self.register_buffer("alphas_cumprod", alphas_cumprod.detach().double().clone())
        self.calls = 0

    @property
    def device(self) -> torch.device:
        return self.z0.device

    @property
    def dtype(self) -> torch.dtype:
        return self.z0.dtype

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor | None = None, **_):
        assert sample.shape == self.z0.shape, "no classifier-free guidance doubling expected at scale 1"
        assert encoder_hidden_states is not None and encoder_hidden_states.shape[0] == sample.shape[0]
        self.calls += 1
        t = torch.as_tensor(timestep, device=sample.device).long().reshape(-1)
        abar = self.alphas_cumprod[t].reshape(-1, 1, 1, 1)
        eps = (sample.double() - abar.sqrt() * self.z0.double()) / (1.0 - abar).sqrt()
        return types.SimpleNamespace(sample=eps.to(sample.dtype))


def _images(batch: int, seed: int = 0, size: int = 32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=generator)


def _centre_masks(batch: int, size: int = 16, lo: int = 4, hi: int = 12) -> torch.Tensor:
    masks = torch.zeros(batch, size, size, dtype=torch.bool)
    masks[:, lo:hi, lo:hi] = True
    return masks


def _oracle_inpainter(*, set_alpha_to_one: bool, steps: int = 50):
    parts = build_tiny_parts(latent="space_to_depth")
    # DDIM's last step lands on final_alpha_cumprod: 1 gives the clean latent, SD's False keeps a little noise.
    parts.scheduler = DDIMScheduler.from_config(parts.scheduler.config, set_alpha_to_one=set_alpha_to_one)
    images = _images(2)
    clean = parts.encode_images(images)
    parts.denoiser = OracleUNet(clean, parts.scheduler.alphas_cumprod)
    module = BackgroundInpainter(parts, prompt=BACKGROUND_PROMPT, num_steps=steps, seed=0)
    return module, parts, images, clean


def test_oracle_unet_inpainting_reproduces_the_image_and_refines_to_an_empty_mask() -> None:
    module, parts, images, _ = _oracle_inpainter(set_alpha_to_one=True)
    prelim = _centre_masks(2)
    ids = ["img-0", "img-1"]

    results = module.inpaint_and_refine(images, prelim, ids)

    assert parts.denoiser.calls == 50  # one pass per DDIM step, the whole batch at once
    assert [r["id"] for r in results] == ids
    for result, image, m_pre in zip(results, images, prelim, strict=True):
        x = image.numpy().transpose(1, 2, 0)
        background = result["background"]
        assert background.shape == x.shape == (32, 32, 3)
        np.testing.assert_allclose(background, x, atol=1e-4, rtol=0)
        # M = up(M_pre) AND g(|x - B|): nothing changed, so nothing is object
        assert result["mask"].shape == (32, 32) and result["mask"].dtype == bool
        assert not result["mask"].any()
        assert upsample_mask(m_pre.numpy(), (32, 32)).sum() == 16 * 16  # the region was really repainted


def test_oracle_unet_reproduces_the_input_with_sds_schedule_too() -> None:
    """SD's schedule (set_alpha_to_one False) ends DDIM at abar_0 < 1; the sampler returns the predicted
    clean latent at the last step, so a perfect model still reproduces the input exactly, and the known
    region is z0 exactly at every step's end."""
    steps = 20
    module, parts, images, clean = _oracle_inpainter(set_alpha_to_one=False, steps=steps)
    ids = ["img-0", "img-1"]
    unknown = _centre_masks(2).float()[:, None]
    scheduler = parts.sampler(steps, tuple(clean.shape[1:]))
    assert torch.as_tensor(scheduler.final_alpha_cumprod) < 1  # SD's configuration

    painted = inpaint_latents(
        parts, clean, unknown, [BACKGROUND_PROMPT] * 2, sample_generators(0, ids, "inpaint"), steps=steps
    )

    torch.testing.assert_close(painted, clean, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(painted * (1 - unknown), clean * (1 - unknown), atol=0, rtol=0)
    backgrounds = module.backgrounds(images, unknown[:, 0].bool(), ids)
    torch.testing.assert_close(backgrounds, images, atol=1e-4, rtol=0)


# --------------------------------------------------------------------------------------------------
# Latent blending with the random tiny UNet
# --------------------------------------------------------------------------------------------------


def test_inpainting_keeps_the_known_region() -> None:
    parts = build_tiny_parts(latent="space_to_depth")
    images = _images(2, seed=1) * 0.5 + 0.25  # away from the clamp at 0 and 1
    prelim = _centre_masks(2, lo=5, hi=11)  # latent pixels 5..10 -> image pixels 10..21
    clean = parts.encode_images(images)
    mask = prelim.float()[:, None]

    # what BackgroundInpainter.backgrounds does: encode, inpaint the latents, decode
    painted = inpaint_latents(
        parts, clean, mask, [BACKGROUND_PROMPT] * 2, sample_generators(0, ["a", "b"], "inpaint"), steps=6
    )
    backgrounds = parts.decode_latents(painted)

    # in latent space the known region is the clean latent itself after the last step ...
    assert torch.equal(painted * (1 - mask), clean * (1 - mask))
    assert (painted - clean).abs()[mask.expand_as(clean).bool()].mean() > 0.1
    # ... and in pixels, outside the region dilated by one latent pixel, the image is kept
    error = (backgrounds - images).abs().mean(dim=1)  # (B, H, W), mean over RGB
    unknown = torch.from_numpy(upsample_mask(prelim[0].numpy(), (32, 32)))
    dilated = torch.from_numpy(upsample_mask(_centre_masks(1, lo=4, hi=12)[0].numpy(), (32, 32)))
    outside, inside = error[:, ~dilated].mean().item(), error[:, unknown].mean().item()
    assert outside < 0.02
    assert inside > 0.05 and inside > 20 * outside


# --------------------------------------------------------------------------------------------------
# The stage through the runner
# --------------------------------------------------------------------------------------------------


TINY_INPAINT_RUN = ["logger=none", "data.num_train=8", "data.num_test=4", "masks.module.num_steps=10",
                    "masks.module.start_step=4", "finetune.max_steps=2", "finetune.sample_every=0",
                    "finetune.sample_steps=2", "inpaint.module.num_steps=4"]


@pytest.fixture(scope="module")
def inpainted_run(tmp_path_factory):
    """A tiny shapes-world run through masks, finetune, inpaint and report (once for this module), with a tiny
    model whose latent is the world model's lossless space-to-depth: outside M_pre a background B is the image
    itself, so an object that M_pre misses stays in B, as with the world's own model."""
    from conftest import one_torch_thread

    from conceptdistill.diffusion.loading import save_diffusion_parts
    from conceptdistill.runner import run

    folder = tmp_path_factory.mktemp("inpaint")
    model = save_diffusion_parts(build_tiny_parts(latent="space_to_depth"), folder / "pipeline")
    run_dir = folder / "run"
    cfg = compose(["stages=[masks,finetune,inpaint,report]", f"diffusion.path={model}", *TINY_INPAINT_RUN], run_dir=run_dir)
    with one_torch_thread():
        summaries = run(cfg)
    return run_dir, summaries, cfg


def test_inpaint_stage_refined_masks_stay_inside_the_preliminary_masks(inpainted_run) -> None:
    from conceptdistill.pipeline.layout import INPAINT_OUTPUTS
    from conceptdistill.utils.io import load_mask_png

    run_dir, summaries, _ = inpainted_run
    sizes = {"train": 8, "test": 4}
    checked = nonempty_prelim = 0
    for split, count in sizes.items():
        prelim_dir, refined_dir = run_dir / "masks" / split, run_dir / "inpaint" / split
        ids = sorted(p.stem for p in (prelim_dir / "mask").glob("*.png"))
        assert len(ids) == count
        assert sorted(p.stem for p in (refined_dir / "mask").glob("*.png")) == ids
        for sid in ids:
            for name in INPAINT_OUTPUTS:
                assert (refined_dir / name / f"{sid}.png").is_file()
            prelim = load_mask_png(prelim_dir / "mask" / f"{sid}.png")
            refined = load_mask_png(refined_dir / "mask" / f"{sid}.png")
            assert prelim.shape == (16, 16) and refined.shape == (32, 32)
            assert not (refined & ~upsample_mask(prelim, refined.shape)).any(), f"M exceeds up(M_pre) for {sid}"
            checked += 1
            nonempty_prelim += bool(prelim.any())
    assert checked == 12
    assert nonempty_prelim > 0  # otherwise the subset check says nothing

    summary = summaries["inpaint"]
    assert summary["train"]["images"] == 8 and summary["test"]["images"] == 4
    refined_row = summary["rows"]["refined_masks"]
    assert {"acc", "iou", "miou"} <= set(refined_row)
    assert (run_dir / "inpaint" / "inpaint_grid.png").is_file()
    assert (run_dir / "inpaint" / "DONE.json").is_file()


def test_the_object_removal_rate_is_the_judges_verdict_image_by_image(inpainted_run) -> None:
    """results.json, results.md and the report page give the fraction of test backgrounds B in which the world's
    judge sees no object where the object was or where B was repainted, counted image by image here."""
    import json

    from hydra.utils import instantiate

    from conceptdistill.pipeline.layout import RunLayout
    from conceptdistill.world.judge import holds_object

    run_dir, summaries, cfg = inpainted_run
    data = instantiate(cfg.data)  # the run's data: the same images, the same truth
    layout = RunLayout(run_dir)
    backgrounds, prelims = layout.inpaint_store("test"), layout.mask_store("test")
    verdicts = []
    for sample in data.dataset("test"):
        truth = sample["mask"].numpy()
        region = truth | upsample_mask(prelims.load("mask", sample["id"]), truth.shape)
        verdicts.append(holds_object(backgrounds.load("background", sample["id"]), data.world, region))
    expected = {"value": verdicts.count(False) / 4, "removed": verdicts.count(False), "judged": 4, "skipped": 0,
                "split": "test"}
    assert 0 < expected["removed"] < 4  # both verdicts occur, so the equality below says something

    assert summaries["inpaint"]["scalars"]["object_removal_rate"] == expected
    results = json.loads((run_dir / "report" / "results.json").read_text())
    assert results["object_removal_rate"] == expected
    text = (f"{expected['value']:.3f} (removed {expected['removed']}, judged 4, skipped 0, split test)")
    assert f"(`object_removal_rate`): {text}" in (run_dir / "report" / "results.md").read_text()
    assert f"(<code>object_removal_rate</code>): {text}" in (run_dir / "report" / "index.html").read_text()


def test_the_crop_baseline_fills_the_object_region_from_the_image_itself(inpainted_run, tmp_path) -> None:
    """`inpaint=crop` (the M_crop baseline): B is the image outside up(M_pre) exactly, and inside it only colours
    of the image's own background; it is a different inpaint stage (new fingerprint), refined the same way."""
    import shutil

    from hydra.utils import instantiate

    from conceptdistill.pipeline.layout import RunLayout
    from conceptdistill.runner import run

    run_dir, summaries, cfg = inpainted_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("inpaint", "report"))
    crop_cfg = compose(["stages=[inpaint]", f"diffusion.path={cfg.diffusion.path}", *TINY_INPAINT_RUN, "inpaint=crop"],
                       run_dir=copy)
    assert crop_cfg.inpaint.module._target_.endswith("MirrorInpainter")
    crop = run(crop_cfg)["inpaint"]
    assert crop["test"]["images"] == 4 and "refined_masks" in crop["rows"]
    # the results table names the baseline, never passes it off as the method's M
    from conceptdistill.stages.report import table_rows

    crop_rows, rows = dict(table_rows(crop_cfg)), dict(table_rows(cfg))
    assert crop_rows["refined_masks"].startswith("refined masks M_crop") and rows["refined_masks"] == "refined masks M"
    # nor the U-Nets trained on it (the synthetic set's masks are refined by the same inpainter)
    assert (crop_rows["unet_refined"], crop_rows["unet_refined_synthetic"]) == ("U-Net on (D, M_crop)",
                                                                              "U-Net on (D, M_crop) u D'_s")
    assert (rows["unet_refined"], rows["unet_refined_synthetic"]) == ("U-Net on (D, M)", "U-Net on (D, M) u D'_s")
    layout = RunLayout(copy)
    assert (copy / "inpaint" / "FINGERPRINT").read_text() != (run_dir / "inpaint" / "FINGERPRINT").read_text()
    data = instantiate(cfg.data)
    differs = 0
    for sample in data.dataset("test"):
        image = sample["image"].numpy().transpose(1, 2, 0)
        background = layout.inpaint_store("test").load("background", sample["id"]).astype(np.float32)
        if background.max() > 1.5:  # stored as 8-bit
            background /= 255
        region = upsample_mask(layout.mask_store("test").load("mask", sample["id"]), image.shape[:2])
        assert np.abs(background[~region] - image[~region]).max() <= 1 / 255 + 1e-6
        differs += bool(region.any())
        refined = layout.inpaint_store("test").load("mask", sample["id"])
        assert not (refined & ~region).any()
    assert differs > 0

    # it needs no fine-tuned model: a run without a finetune stage makes it; the sampler's settings and the
    # prompts (which it does not read) leave it complete, its own settings redo it
    fresh = tmp_path / "fresh"
    shutil.copytree(run_dir, fresh, ignore=shutil.ignore_patterns("finetune", "inpaint", "report"))
    assert run(compose(["stages=[inpaint]", f"diffusion.path={cfg.diffusion.path}", *TINY_INPAINT_RUN, "inpaint=crop"],
                       run_dir=fresh))["inpaint"]["rows"] == crop["rows"]
    assert (fresh / "inpaint" / "FINGERPRINT").read_text() == (copy / "inpaint" / "FINGERPRINT").read_text()
    from conceptdistill.pipeline.context import RunContext

    def complete(*extra: str) -> bool:
        overrides = [f"diffusion.path={cfg.diffusion.path}", *TINY_INPAINT_RUN, "inpaint=crop", *extra]
        return RunContext(compose(overrides, run_dir=fresh)).is_complete("inpaint")

    assert complete() and complete("inpaint.module.num_steps=7", "prompts.background=a photo of grass",
                                   "finetune.max_steps=5", "inpaint.module.guidance_scale=3")
    assert not complete("inpaint.module.filter_size=5") and not complete("inpaint.module.seed=9")
    # nor does the settings check refuse a sampler setting it ignores (the model's inpainter still refuses it)
    from conceptdistill.checks import SettingsError, check_settings

    no_sampler = [f"diffusion.path={cfg.diffusion.path}", *TINY_INPAINT_RUN, "inpaint.module.num_steps=0"]
    check_settings(compose([*no_sampler, "inpaint=crop"], run_dir=fresh))
    with pytest.raises(SettingsError, match=r"inpaint\.module\.num_steps=0"):
        check_settings(compose(no_sampler, run_dir=fresh))


# --------------------------------------------------------------------------------------------------
# Synthetic set: independent of how samples are sharded across devices; resumable
# --------------------------------------------------------------------------------------------------


def _predict_into(ctx, module, store, dataset, batch_size: int) -> None:
    from conceptdistill.pipeline.artifacts import SampleWriter

    trainer = ctx.trainer("synthesize", callbacks=[SampleWriter(store)], logger=False, enable_progress_bar=False)
    trainer.predict(module, ctx.datamodule.loader(dataset, batch_size=batch_size), return_predictions=False)


def test_synthetic_set_is_the_same_whatever_the_sharding(tmp_path, monkeypatch) -> None:
    from conceptdistill.modules.synthesizer import SyntheticIds
    from conceptdistill.pipeline.artifacts import ArtifactStore, pending
    from conceptdistill.pipeline.context import RunContext
    from conceptdistill.pipeline.layout import SYNTHETIC_OUTPUTS as OUTPUTS
    from conceptdistill.stages import synthesize
    from conceptdistill.stages.synthesize import build_generator

    cfg = compose(
        [
            "logger=none",
            "masks.module.num_steps=10",
            "masks.module.start_step=4",
            "inpaint.module.num_steps=3",
            "synthesize.module.num_steps=3",
            "synthesize.num_samples=6",
            "synthesize.figure_samples=3",
        ],
        run_dir=tmp_path / "run",
    )
    ctx = RunContext(cfg)
    assert cfg.synthesize.module.guidance_scale != 1.0  # the guided (batch-doubling) path is exercised
    module = build_generator(ctx.cfg, build_tiny_parts())
    ids = SyntheticIds(6)

    one_go = ctx.layout.synthetic_store()  # where run_synthesize looks
    _predict_into(ctx, module, one_go, ids, batch_size=3)  # one device: batches [0, 1, 2], [3, 4, 5]
    # Two devices as a distributed sampler deals them out: each sample meets other batch-mates. (The
    # per-device batch size stays the same: floating-point kernels may round differently at other batch
    # shapes, so bit-identity is only promised per batch size.)
    shards = ArtifactStore(tmp_path / "shards", OUTPUTS)
    _predict_into(ctx, module, shards, Subset(ids, [0, 2, 4]), batch_size=3)  # "device 0"
    _predict_into(ctx, module, shards, Subset(ids, [1, 3, 5]), batch_size=3)  # "device 1"

    names = [ids.sample_id(i) for i in range(6)]
    for name in OUTPUTS:
        assert one_go.ids(name) == names and shards.ids(name) == names
        for sid in names:
            assert one_go.path(name, sid).read_bytes() == shards.path(name, sid).read_bytes(), (name, sid)
    assert any(one_go.load("prelim_mask", sid).any() for sid in names)
    for sid in names:  # the stage's own invariant on the synthetic samples too
        mask, prelim = one_go.load("mask", sid), one_go.load("prelim_mask", sid)
        assert not (mask & ~upsample_mask(prelim, mask.shape)).any()
        np.testing.assert_allclose(
            one_go.load("foreground", sid), one_go.load("image", sid) * mask[..., None], atol=1 / 255 + 1e-6
        )

    # resuming: a complete store has nothing pending, a store missing one file has exactly that sample
    assert len(pending(ids, one_go)) == 0
    shards.path("background", names[4]).unlink()
    assert list(pending(ids, shards).indices) == [4]

    # and the stage itself computes nothing over a complete store
    def no_model(*args, **kwargs):
        raise AssertionError("run_synthesize built a generator although every sample is on disk")

    monkeypatch.setattr(synthesize, "build_generator", no_model)
    monkeypatch.setattr(ctx, "load_parts", no_model)
    summary = synthesize.run_synthesize(ctx)
    assert summary["samples"] == 6
    assert (run_dir := tmp_path / "run" / "synthesize").is_dir() and (run_dir / "synthetic_grid.png").is_file()
