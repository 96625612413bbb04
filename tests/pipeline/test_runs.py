"""Runs never reuse stale results and resume to the same numbers: each stage's fingerprint covers exactly
what it reads, a stage refuses stale inputs, predicted masks record what made them, and a training stage
killed mid-run (SIGKILL of a child process) resumes to the uninterrupted run's weights."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, compose, one_torch_thread
from omegaconf import OmegaConf
from PIL import Image
from test_end_to_end import ALL_STAGES, TINY_STEPS

from conceptdistill.pipeline.context import RunContext
from conceptdistill.pipeline.registry import StageError
from conceptdistill.runner import run

WORK = ["masks", "finetune", "inpaint", "synthesize", "segment"]
#: a setting of a stage's section invalidates that stage and everything downstream of it
DOWNSTREAM = {"masks": WORK, "finetune": WORK[1:], "inpaint": WORK[2:], "synthesize": WORK[3:], "segment": WORK[4:]}
#: settings that cannot change any result (written out here, independently of the registry's list)
NO_EFFECT = {"masks.batch_size", "masks.figure_samples", "inpaint.batch_size", "inpaint.figure_samples",
             "synthesize.batch_size", "synthesize.figure_samples", "segment.figure_samples",
             "segment.checkpoint_every", "finetune.sample_every", "finetune.sample_count", "finetune.sample_steps",
             "finetune.checkpoint_every", "masks.module.timesteps_per_call"}


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    yield


def overrides_for(model: Path, *extra: str) -> list[str]:
    return [f"diffusion.path={model}", "data.num_train=8", "data.num_test=4", "logger=none", *TINY_STEPS, *extra]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model):
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    overrides = [f"stages=[{','.join(ALL_STAGES)}]", *overrides_for(tiny_model)]
    with one_torch_thread():
        run(compose(overrides, run_dir=run_dir))
    return run_dir, overrides


def stale_stages(run_dir: Path, overrides: list[str]) -> list[str]:
    ctx = RunContext(compose(overrides, run_dir=run_dir))
    return [stage for stage in WORK if not ctx.is_complete(stage)]


def changed_value(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, list):
        return value[:1] if len(value) > 1 else [*value, value[0] if value else "x"]
    return 1  # None


def leaves(section: dict, prefix: str):
    """(dotted key, value) of every setting of a config section, `module` hyper-parameters included (less the
    `_target_` / `_partial_` keys that name the class)."""
    for key, value in section.items():
        if key.startswith("_"):
            continue
        if key == "module":
            yield from leaves(value, f"{prefix}.module")
        else:
            yield f"{prefix}.{key}", value


def test_each_setting_invalidates_exactly_its_stage_and_those_downstream(finished_run):
    run_dir, overrides = finished_run
    assert stale_stages(run_dir, overrides) == []
    cfg = OmegaConf.to_container(compose(overrides, run_dir=run_dir), resolve=True)
    checked = 0
    for section, expected in DOWNSTREAM.items():
        for name, value in leaves(cfg[section], section):
            if name == "segment.sources":
                continue  # changes which stages segment reads; checked below
            override = f"{name}={json.dumps(changed_value(value))}"
            assert stale_stages(run_dir, [*overrides, override]) == ([] if name in NO_EFFECT else expected), override
            checked += 1
    assert checked >= 40
    for override, expected in [
        ("seed=1", WORK), ("data.num_train=9", WORK), ("data.image_size=48", WORK), ("concept=[square]", WORK),
        ("prompts.background='a photo of the background'", WORK[1:]), ("trainer.precision=bf16-mixed", WORK),
        ("segment.sources=[preliminary]", ["segment"]), ("splits=[test]", WORK),
        ("diffusion.batch_size=5", []), ("data.num_workers=1", []), ("logger=csv", []),
    ]:
        assert stale_stages(run_dir, [*overrides, override]) == expected, override


def test_changing_an_inpaint_setting_recomputes_the_synthetic_masks(finished_run, tmp_path):
    original, overrides = finished_run
    run_dir = tmp_path / "run"
    shutil.copytree(original, run_dir)
    before = {p.name: p.read_bytes() for p in (run_dir / "synthesize" / "samples" / "mask").glob("*.png")}
    run(compose([*overrides, "inpaint.module.filter_size=5", "inpaint.module.close_holes=true"], run_dir=run_dir))
    assert len(list(run_dir.glob("synthesize.stale-*"))) == 1 and len(list(run_dir.glob("masks.stale-*"))) == 0
    after = {p.name: p.read_bytes() for p in (run_dir / "synthesize" / "samples" / "mask").glob("*.png")}
    assert set(after) == set(before)
    # masks that did not change do not prove anything; the samples were made again (new files)
    assert json.loads((run_dir / "synthesize" / "DONE.json").read_text())["fingerprint"] != json.loads(
        next(run_dir.glob("synthesize.stale-*/DONE.json")).read_text())["fingerprint"]


def test_settings_that_cannot_change_results_rerun_nothing(finished_run, tmp_path, monkeypatch):
    original, overrides = finished_run
    run_dir = tmp_path / "run"
    shutil.copytree(original, run_dir)
    done = {stage: (run_dir / stage / "DONE.json").read_bytes() for stage in WORK}
    run(compose([*overrides, "diffusion.batch_size=5", "masks.batch_size=3", "logger=csv"], run_dir=run_dir))
    assert {stage: (run_dir / stage / "DONE.json").read_bytes() for stage in WORK} == done
    assert not list(run_dir.glob("*.stale-*"))


def test_a_stage_refuses_inputs_made_with_other_settings(finished_run, tmp_path):
    original, overrides = finished_run
    run_dir = tmp_path / "run"
    shutil.copytree(original, run_dir)
    changed = [o for o in overrides if not o.startswith("stages=")] + ["masks.module.filter_size=5", "stages=[finetune]"]
    with pytest.raises(StageError, match=r"reads the outputs of stage masks, which was made with other settings"):
        run(compose(changed, run_dir=run_dir))


def test_a_stage_sees_only_the_settings_it_declares(finished_run):
    run_dir, overrides = finished_run
    ctx = RunContext(compose(overrides, run_dir=run_dir))
    view = ctx.view("masks")
    assert view.masks.module.num_steps == 10 and view.prompts.foreground
    with pytest.raises(Exception, match="inpaint"):
        view.inpaint  # noqa: B018
    with pytest.raises(Exception, match="background"):
        view.prompts.background  # noqa: B018
    assert ctx.view("synthesize").inpaint.module.filter_size == 3  # synthesize runs the inpaint logic: it declares it


# ----- predicted masks outside the run folder -----------------------------------------------------------------
def write_images(folder: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(folder / name)
    return folder


def test_predictions_of_other_inputs_are_never_reused(finished_run, tmp_path):
    run_dir, overrides = finished_run
    output = tmp_path / "out"
    base = [o for o in overrides if not o.startswith("stages=")] + ["stages=[predict]", f"predict.output_dir={output}"]
    first = run(compose([*base, f"predict.input_dir={write_images(tmp_path / 'one', 0)}"], run_dir=run_dir))
    assert first["predict"]["images"] == 2
    masks_first = {p.name: p.read_bytes() for p in (output / "mask").glob("*.png")}
    again = run(compose([*base, f"predict.input_dir={write_images(tmp_path / 'two', 1)}"], run_dir=run_dir))
    assert again["predict"]["images"] == 2
    stale = list(tmp_path.glob("out.stale-*"))
    assert len(stale) == 1 and {p.name: p.read_bytes() for p in (stale[0] / "mask").glob("*.png")} == masks_first
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(StageError, match="not written by this tool"):
        run(compose([*base[:-1], f"predict.output_dir={foreign}", f"predict.input_dir={tmp_path / 'two'}"],
                    run_dir=run_dir))
    assert (foreign / "notes.txt").read_text() == "mine"


# ----- killed with SIGKILL mid-training, then resumed -------------------------------------------------------
def cli(run_dir: Path, overrides: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    args = [o for o in overrides if not o.startswith("stages=")]
    stages = next(o for o in overrides if o.startswith("stages="))
    return subprocess.Popen([sys.executable, "-m", "conceptdistill", stages, *args, f"hydra.run.dir={run_dir}"],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def kill_after(process: subprocess.Popen, marker: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not marker.exists():
        assert process.poll() is None, "the run ended before it wrote its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()


def state_of(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


@pytest.mark.parametrize("stage", ["finetune", "segment"])
def test_a_training_stage_killed_mid_run_resumes_to_the_uninterrupted_weights(finished_run, tmp_path, stage, caplog):
    original, overrides = finished_run
    budget = {"finetune": ["finetune.max_steps=30", "finetune.checkpoint_every=3"],
              # preliminary trains first: the kill (during refined) comes after one source has finished
              "segment": ["segment.max_steps=30", "segment.checkpoint_every=3",
                          "segment.sources=[preliminary,refined]"]}[stage]
    settings = [o for o in overrides if not o.startswith("stages=")] + budget + [f"stages=[{stage}]"]
    runs = {}
    for name in ("uninterrupted", "killed"):
        run_dir = tmp_path / name
        shutil.copytree(original, run_dir, ignore=shutil.ignore_patterns(stage, *WORK[WORK.index(stage) + 1:]))
        if name == "killed":
            marker = run_dir / stage / ("checkpoints/last.ckpt" if stage == "finetune" else "refined/last.ckpt")
            kill_after(cli(run_dir, settings), marker)
            assert not (run_dir / stage / "DONE.json").exists(), "the kill came too late to test a resume"
            step = torch.load(marker, weights_only=False)["global_step"]
            assert 3 <= step < 30
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="conceptdistill.utils.checkpoints"):
            runs[name] = run(compose(settings, run_dir=run_dir))[stage]
        what = {"finetune": "finetune", "segment": "segment-refined"}[stage]
        expected = f"{what}: resuming from step {step}" if name == "killed" else "resuming"
        assert (expected in caplog.text) == (name == "killed")
        # the stage's seconds include what the killed run trained before its last checkpoint
        done = json.loads((run_dir / stage / "DONE.json").read_text())
        earlier = runs[name].get("seconds_before_resume", 0.0)
        assert (earlier > 0) == (name == "killed") and done["seconds"] >= earlier
        if stage == "segment" and name == "killed":  # all of the finished source's training, and refined's part
            finished = json.loads((run_dir / "segment/preliminary/training.json").read_text())
            assert finished["steps"] == 30 and earlier > finished["seconds"] > 0
    if stage == "finetune":
        from safetensors.torch import load_file

        weights = [load_file(tmp_path / n / "finetune/weights/pytorch_lora_weights.safetensors") for n in runs]
        assert weights[0].keys() == weights[1].keys()
        assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
        assert runs["killed"]["loss_last_tenth"] == runs["uninterrupted"]["loss_last_tenth"]
    else:
        finals = [state_of(tmp_path / n / "segment/refined/final.ckpt") for n in runs]
        assert all(torch.equal(finals[0][k], finals[1][k]) for k in finals[0])
        assert runs["killed"]["rows"] == runs["uninterrupted"]["rows"]


def test_a_finished_training_stage_keeps_its_result_not_its_resume_state(finished_run):
    """Resume checkpoints (optimizer moments included) are for an unfinished stage: a finished one keeps only its
    result, the segmenters' weights without optimizer state. (Four segmenters' two full copies each took 400 MB
    per tiny run and filled a test machine's disk.)"""
    run_dir, _ = finished_run
    assert sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("last.ckpt")) == []
    finals = sorted(run_dir.glob("segment/*/final.ckpt"))
    assert finals
    for final in finals:
        checkpoint = torch.load(final, map_location="cpu", weights_only=False)
        assert "optimizer_states" not in checkpoint and checkpoint["state_dict"], final


def test_world_training_interrupted_after_a_checkpoint_resumes_to_the_same_model(tmp_path, monkeypatch):
    from pytorch_lightning.callbacks import Callback


    class Crash(RuntimeError):
        pass

    class CrashAtStep(Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_index):
            if trainer.global_step == 3:
                raise Crash("simulated power cut")

    overrides = ["stages=[world]", "logger=none", "data.num_train=8", "data.num_test=4", "world.num_images=64",
                 "world.max_steps=5", "world.checkpoint_every=2", "world.batch_size=8", "world.module.warmup_steps=2",
                 "world.architecture.block_out_channels=[16,16,16]", "world.fidelity.num_samples=4",
                 "world.fidelity.num_background_samples=2", "world.fidelity.steps=2",
                 "world.fidelity.classifier_images=64", "world.fidelity.classifier_epochs=1"]
    run(compose(overrides, run_dir=tmp_path / "uninterrupted"))
    trainer = RunContext.trainer

    def crashing(self, stage, **kwargs):
        if stage == "world" and "max_steps" in kwargs:
            kwargs["callbacks"] = [*kwargs.get("callbacks", []), CrashAtStep()]
        return trainer(self, stage, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(RunContext, "trainer", crashing)
        with pytest.raises(Crash):
            run(compose(overrides, run_dir=tmp_path / "resumed"))
    assert torch.load(tmp_path / "resumed/world/checkpoints/last.ckpt", weights_only=False)["global_step"] == 2
    run(compose(overrides, run_dir=tmp_path / "resumed"))
    assert not (tmp_path / "resumed/world/checkpoints/last.ckpt").exists()  # finished: the resume state is dropped
    from safetensors.torch import load_file

    for part in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        a, b = (load_file(tmp_path / name / "world/pipeline" / part) for name in ("uninterrupted", "resumed"))
        assert all(torch.equal(a[k], b[k]) for k in a), part
    # the training record counts the crashed run's seconds up to its checkpoint
    record = json.loads((tmp_path / "resumed/world/DONE.json").read_text())
    assert 0 < record["summary"]["seconds_before_resume"] <= record["summary"]["train_seconds"]
    assert record["seconds"] >= record["summary"]["seconds_before_resume"]
    assert "seconds_before_resume" not in json.loads((tmp_path / "uninterrupted/world/DONE.json").read_text())["summary"]


def test_extra_trainer_arguments_and_replaced_data_files_invalidate_work(finished_run, tmp_path):
    run_dir, overrides = finished_run
    assert stale_stages(run_dir, [*overrides, "+trainer.accumulate_grad_batches=4"]) == WORK
    folder = tmp_path / "images"
    write_images(folder, 0)
    base = ["data=folder", f"data.root={folder}", "data.num_workers=0", "data.scan_workers=1", "data.image_size=32",
            *[o for o in overrides if not o.startswith(("stages=", "data."))], "stages=[masks]"]
    run(compose(base, run_dir=tmp_path / "folder-run"))
    assert "masks" not in stale_stages(tmp_path / "folder-run", base)
    Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(folder / "a.png")  # same name, new picture
    assert "masks" in stale_stages(tmp_path / "folder-run", base)
    run(compose(base, run_dir=tmp_path / "folder-run"))
    # rewritten at the same size, its modification time put back (`cp -p`, `touch -r`): still another picture
    picture, stat = folder / "a.png", (folder / "a.png").stat()
    content = bytearray(picture.read_bytes())
    content[-20] ^= 0xFF
    picture.write_bytes(bytes(content))
    os.utime(picture, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (picture.stat().st_size, picture.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    assert "masks" in stale_stages(tmp_path / "folder-run", base)


def test_the_report_never_mixes_results_of_different_settings(finished_run, tmp_path):
    original, overrides = finished_run
    run_dir = tmp_path / "run"
    shutil.copytree(original, run_dir)
    base = [o for o in overrides if not o.startswith("stages=")]
    run(compose([*base, "masks.module.filter_size=5", "stages=[masks,report]"], run_dir=run_dir))
    rows = json.loads((run_dir / "report" / "results.json").read_text())["rows"]
    assert "preliminary_masks" in rows
    assert not {"refined_masks", "unet_refined", "unet_truth"} & set(rows)  # made downstream of the old masks


def test_a_report_for_other_settings_shows_nothing_of_the_stages_they_change(finished_run, tmp_path, capsys):
    """stages=[report] under a changed inpaint setting (nothing reruns): the inpaint, synthesize and segment
    results are left out of the tables, and neither their figures from the earlier report nor their segmenters
    are shown (the console listed the old segmenters as the run's)."""
    original, overrides = finished_run
    run_dir = tmp_path / "run"
    shutil.copytree(original, run_dir)
    base = [o for o in overrides if not o.startswith("stages=")]
    assert (run_dir / "report" / "segment_grid.png").exists()
    capsys.readouterr()
    run(compose([*base, "inpaint.module.filter_size=7", "stages=[report]"], run_dir=run_dir))
    printed = capsys.readouterr().out
    rows = json.loads((run_dir / "report" / "results.json").read_text())["rows"]
    assert "preliminary_masks" in rows and not {"refined_masks", "unet_refined", "unet_truth"} & set(rows)
    left = {p.name for p in (run_dir / "report").glob("*.png")}
    assert "masks_grid.png" in left and not {"inpaint_grid.png", "synthetic_grid.png", "segment_grid.png"} & left
    assert "segmenter:" not in printed and "results:" in printed
    # under the run's own settings they are all back
    run(compose([*base, "stages=[report]"], run_dir=run_dir))
    assert "segmenter:" in capsys.readouterr().out and (run_dir / "report" / "segment_grid.png").exists()


def test_predicted_masks_may_not_land_inside_the_input_folder(finished_run, tmp_path):
    run_dir, overrides = finished_run
    images = write_images(tmp_path / "in", 0)
    base = [o for o in overrides if not o.startswith("stages=")] + ["stages=[predict]", f"predict.input_dir={images}"]
    with pytest.raises(StageError, match="inside predict.input_dir"):
        run(compose([*base, f"predict.output_dir={images / 'seg'}"], run_dir=run_dir))


def test_the_run_folder_holds_one_folder_per_stage(finished_run):
    run_dir, _ = finished_run
    assert {p.name for p in run_dir.iterdir() if p.is_dir()} == set(ALL_STAGES)  # no stray trainer folders


def test_predicting_outside_then_inside_the_run_folder(finished_run, tmp_path):
    original, overrides = finished_run
    run_dir = tmp_path / "run"
    shutil.copytree(original, run_dir)
    images = write_images(tmp_path / "in", 0)
    base = [o for o in overrides if not o.startswith("stages=")] + ["stages=[predict]", f"predict.input_dir={images}"]
    run(compose([*base, f"predict.output_dir={tmp_path / 'out'}"], run_dir=run_dir))
    assert not (run_dir / "predict").exists()  # nothing of it lands in the run folder
    assert run(compose(base, run_dir=run_dir))["predict"]["images"] == 2  # then the default folder works


def test_any_changed_weight_changes_the_model_fingerprint(tmp_path):
    """Weights edited in place at the same file size (e.g. a merged LoRA) are a different model: finished
    stages that read it must rerun (hashing only the ends of large files missed this)."""
    from safetensors.torch import load_file, save_file

    from conceptdistill.diffusion.fingerprint import model_fingerprint
    from conceptdistill.diffusion.registry import PACKAGED_WORLD_MODEL

    copy = shutil.copytree(PACKAGED_WORLD_MODEL, tmp_path / "model")
    weights = copy / "unet" / "diffusion_pytorch_model.safetensors"
    assert weights.stat().st_size > 4 << 20  # a weight file larger than what a partial hash reads
    before, size = model_fingerprint(copy), weights.stat().st_size
    tensors = load_file(weights)
    name = sorted(tensors)[len(tensors) // 2]  # a tensor in the middle of the file
    tensors[name] = tensors[name] + 0.5
    save_file(tensors, weights, metadata={"format": "pt"})
    assert weights.stat().st_size == size
    assert model_fingerprint(copy) != before


def test_rerunning_a_stage_moves_aside_everything_made_from_its_old_outputs(finished_run, tmp_path, capsys):
    """After masks rerun with other settings, nothing downstream of the old masks looks finished: fine-tuned
    weights, segmenters and the report are moved aside (kept), so no command or person picks them up."""
    original, overrides = finished_run
    run_dir = tmp_path / "run"
    shutil.copytree(original, run_dir)
    base = [o for o in overrides if not o.startswith("stages=")]
    run(compose([*base, "masks.module.filter_size=5", "stages=[masks]"], run_dir=run_dir))
    present = {p.name for p in run_dir.iterdir() if p.is_dir() and ".stale-" not in p.name}
    assert present == {"masks"}
    for stage in ["finetune", "inpaint", "synthesize", "segment", "report"]:
        assert len(list(run_dir.glob(f"{stage}.stale-*"))) == 1, stage
    closing = capsys.readouterr().out
    assert "segmenter:" not in closing and "weights:" not in closing and "results:" not in closing
    images = write_images(tmp_path / "in", 0)
    with pytest.raises(FileNotFoundError, match="no segmentation checkpoint"):
        run(compose([*base, "stages=[predict]", f"predict.input_dir={images}"], run_dir=run_dir))


@pytest.mark.parametrize("bad", ["concept=[square]", "data.image_size=33"])
def test_a_setting_the_model_refuses_fails_before_finished_work_is_moved(finished_run, tmp_path, bad):
    """A concept word missing from the prompt or an image size the VAE cannot take used to fail only after the
    masks stage had moved the finished masks aside."""
    original, overrides = finished_run
    run_dir = tmp_path / "run"
    shutil.copytree(original, run_dir)
    with pytest.raises(ValueError, match="concept|data.image_size"):
        run(compose([*overrides, bad], run_dir=run_dir))
    assert not list(run_dir.glob("*.stale-*"))
    assert stale_stages(run_dir, overrides) == []

