"""Stage "masks" (preliminary masks from cross-attention): the timestep grid, the stage run through
`conceptdistill.runner.run` on a tiny saved pipeline, and resuming after a kill / skipping / moving aside."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, compose, one_torch_thread
from PIL import Image

from conceptdistill import runner
from conceptdistill.pipeline.artifacts import ArtifactStore
from conceptdistill.pipeline.layout import MASK_OUTPUTS as OUTPUTS
from conceptdistill.utils.io import read_json

SPLITS = {"train": 8, "test": 4}


def mask_overrides(model: Path, batch_size: int = 4) -> list[str]:
    """A masks-only run on the tiny pipeline: 8 + 4 images of 32 px (16x16 latents), 4 attention steps."""
    return [
        "stages=[masks]", "logger=none", f"diffusion.path={model}",
        f"data.num_train={SPLITS['train']}", f"data.num_test={SPLITS['test']}",
        "masks.module.num_steps=10", "masks.module.start_step=4", f"masks.batch_size={batch_size}",
    ]  # fmt: skip


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def masks_run(tiny_model, tmp_path_factory):
    """One complete masks run; returns (overrides, run folder, summaries). Tests must not modify the folder."""
    run_dir = tmp_path_factory.mktemp("masks-run") / "run"
    overrides = mask_overrides(tiny_model)
    with one_torch_thread():
        summaries = runner.run(compose(overrides, run_dir=run_dir))
    return overrides, run_dir, summaries


def split_ids(split: str) -> list[str]:
    # The shapes world names its samples "<split>-<index:06d>" in order.
    return [f"{split}-{i:06d}" for i in range(SPLITS[split])]


def assert_complete(run_dir: Path) -> None:
    """Every image of every split has exactly one attention map and one mask, and nothing else is there."""
    for split in SPLITS:
        for output, ext in (("attention", "npy"), ("mask", "png")):
            names = sorted(p.name for p in (run_dir / "masks" / split / output).iterdir())
            assert names == [f"{sid}.{ext}" for sid in split_ids(split)], (split, output)
    hidden = [p for p in (run_dir / "masks").rglob(".*")]
    assert hidden == [], f"temp files left behind: {hidden}"


def file_state(path: Path) -> tuple[int, int, str]:
    stat = path.stat()
    return stat.st_ino, stat.st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(run_dir: Path, only_complete: bool = False) -> dict[str, tuple]:
    """(inode, mtime, hash) of every mask-stage file, or only of the samples with both outputs on disk."""
    states = {}
    for split in SPLITS:
        store = ArtifactStore(run_dir / "masks" / split, OUTPUTS)
        for sid in split_ids(split):
            if only_complete and not store.has(sid):
                continue
            for output in OUTPUTS:
                path = store.path(output, sid)
                if path.exists():
                    states[str(path.relative_to(run_dir))] = file_state(path)
    return states


# ----- the timestep grid ---------------------------------------------------------------------------
def test_attention_timesteps_match_stable_diffusion_grid():
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
        num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=False,
    )  # fmt: skip
    from conceptdistill.diffusion.tiny import build_tiny_parts

    parts = build_tiny_parts()
    parts.scheduler = scheduler
    timesteps = parts.attention_timesteps(num_steps=50, start_step=40, latent_shape=(4, 16, 16))
    assert timesteps.tolist() == list(range(781, 0, -20))
    assert len(timesteps) == 40 and timesteps[0] == 781 and timesteps[-1] == 1
    # the scheduler passed in is not changed (the grid is a copy)
    assert scheduler.num_inference_steps is None


# ----- the stage through the runner ----------------------------------------------------------------
def test_masks_stage_writes_one_map_and_mask_per_image(masks_run):
    _, run_dir, summaries = masks_run
    assert_complete(run_dir)
    for split in SPLITS:
        store = ArtifactStore(run_dir / "masks" / split, OUTPUTS)
        for sid in split_ids(split):
            attention, mask = store.load("attention", sid), store.load("mask", sid)
            assert attention.shape == (16, 16) and np.isfinite(attention).all()
            assert mask.shape == (16, 16) and mask.dtype == bool

    summary = summaries["masks"]
    assert summary["train"] == {"images": SPLITS["train"], "skipped_in_stage": 0}
    assert summary["test"] == {"images": SPLITS["test"], "skipped_in_stage": 0}
    assert summary["split"] == "test" and summary["images"] == SPLITS["test"]
    assert 0.0 <= summary["attention_auc"] <= 1.0
    assert {"preliminary_masks", "baseline_centre_box", "baseline_all_foreground"} <= set(summary["rows"])
    for row in summary["rows"].values():
        assert {"acc", "iou", "miou"} <= set(row)
    # the all-foreground baseline's accuracy is the foreground fraction, and equals its IoU
    assert summary["rows"]["baseline_all_foreground"]["acc"] == pytest.approx(
        summary["rows"]["baseline_all_foreground"]["iou"])

    figure = run_dir / "masks" / "masks_grid.png"
    assert figure.exists()
    with Image.open(figure) as image:
        assert image.size[0] > 0 and image.size[1] > 0
    done = read_json(run_dir / "masks" / "DONE.json")
    assert done["summary"]["attention_auc"] == summary["attention_auc"]
    assert done["fingerprint"] == (run_dir / "masks" / "FINGERPRINT").read_text().strip()


def test_complete_stage_is_skipped_and_changed_settings_move_it_aside(masks_run, tmp_path, monkeypatch):
    overrides, original_dir, summaries = masks_run
    run_dir = tmp_path / "run"
    shutil.copytree(original_dir, run_dir, copy_function=shutil.copy2)
    before = snapshot(run_dir)
    done_before = (run_dir / "masks" / "DONE.json").read_bytes()

    # Same settings: the stage is not run at all, and its recorded summary is returned.
    import conceptdistill.stages.masks as masks_module

    def must_not_run(ctx):
        raise AssertionError("a complete stage was run again")

    with monkeypatch.context() as patch:
        patch.setattr(masks_module, "run_masks", must_not_run)
        again = runner.run(compose(overrides, run_dir=run_dir))
    assert again["masks"] == read_json(run_dir / "masks" / "DONE.json")["summary"]
    assert again["masks"]["attention_auc"] == summaries["masks"]["attention_auc"]
    assert snapshot(run_dir) == before
    assert (run_dir / "masks" / "DONE.json").read_bytes() == done_before

    # Another masks setting: the stage runs again from nothing; the old outputs are moved aside, intact.
    changed = runner.run(compose(overrides + ["masks.module.filter_size=5"], run_dir=run_dir))
    stale = sorted(run_dir.glob("masks.stale-*"))
    assert len(stale) == 1
    moved = {
        key: file_state(stale[0] / Path(key).relative_to("masks"))[2] for key in before
    }
    assert moved == {key: state[2] for key, state in before.items()}
    assert (stale[0] / "DONE.json").read_bytes() == done_before
    assert_complete(run_dir)
    new_done = read_json(run_dir / "masks" / "DONE.json")
    assert new_done["fingerprint"] != read_json(stale[0] / "DONE.json")["fingerprint"]
    assert changed["masks"]["train"] == {"images": SPLITS["train"], "skipped_in_stage": 0}


# ----- killed part-way, then resumed ---------------------------------------------------------------
def count_masks(run_dir: Path) -> int:
    return sum(len(list((run_dir / "masks" / split / "mask").glob("*.png"))) for split in SPLITS
               if (run_dir / "masks" / split / "mask").is_dir())


def test_killed_masks_run_resumes_without_redoing_finished_images(tiny_model, tmp_path):
    run_dir = tmp_path / "run"
    overrides = mask_overrides(tiny_model, batch_size=2)  # 6 batches: a kill lands between two of them
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="offline")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    log_path = tmp_path / "killed.log"
    total = sum(SPLITS.values())
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "conceptdistill", *overrides, f"hydra.run.dir={run_dir}"],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 300
            while count_masks(run_dir) == 0:
                if process.poll() is not None:
                    pytest.fail(f"the masks run exited ({process.returncode}) before writing a mask:\n"
                                + log_path.read_text()[-3000:])
                if time.monotonic() > deadline:
                    pytest.fail("no mask written within 300 s:\n" + log_path.read_text()[-3000:])
                time.sleep(0.01)
            os.kill(process.pid, signal.SIGKILL)
        finally:
            if process.poll() is None:
                process.kill()
            process.wait()
    assert process.returncode == -signal.SIGKILL
    written = count_masks(run_dir)
    assert 0 < written < total, f"the kill was expected part-way, found {written} of {total} masks"
    assert not (run_dir / "masks" / "DONE.json").exists()

    finished = snapshot(run_dir, only_complete=True)
    assert finished, "no image had both of its outputs when killed"
    # A kill inside a write leaves atomic_write's temp file; plant one so that cleanup is always exercised.
    leftover = run_dir / "masks" / "train" / "mask" / ".train-000007.png.k1ll3d.tmp"
    leftover.write_bytes(b"\x89PNG half a file")

    summaries = runner.run(compose(overrides, run_dir=run_dir))

    assert_complete(run_dir)
    assert not leftover.exists()
    assert list(run_dir.glob("masks.stale-*")) == [], "same settings: the partial work must be resumed in place"
    after = snapshot(run_dir)
    for key, state in finished.items():
        assert after[key] == state, f"{key} was rewritten by the resumed run"
    assert summaries["masks"]["train"] == {"images": SPLITS["train"], "skipped_in_stage": 0}
    assert summaries["masks"]["test"] == {"images": SPLITS["test"], "skipped_in_stage": 0}
    assert (run_dir / "masks" / "masks_grid.png").exists()


def test_several_timesteps_per_call_give_the_same_maps():
    """Batching timesteps into one UNet call (a GPU throughput setting) draws the same noise per step and sample
    and averages the same maps: A equal up to float rounding, whatever the chunking (7 steps in chunks of 3)."""
    import torch

    from conceptdistill.diffusion.tiny import build_tiny_parts
    from conceptdistill.modules.masker import AttentionMaskGenerator

    parts = build_tiny_parts()
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    maps = {}
    for per_call in (1, 3):
        masker = AttentionMaskGenerator(parts, prompt="a photo of a bird", concept=["bird"], num_steps=10,
                                        start_step=7, timesteps_per_call=per_call)
        maps[per_call], store = masker.attention_maps(images, ["a", "b"], per_layer=True)
        assert store.count == 7 * 4  # steps x cross-attention layers, whatever the chunking
    torch.testing.assert_close(maps[3], maps[1], rtol=1e-5, atol=1e-6)
