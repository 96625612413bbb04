"""Every stage, end to end, on tiny data and a tiny saved diffusion model: the shapes world, each paper
experiment on a tiny tree in its data set's official layout, the results file, resuming, the wandb logger,
and the errors a user sees for a missing data set or model."""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import CONF_DIR, REPO, compose
from trees import make_cars, make_chest_xray, make_cub, make_dogs, make_folder, make_h36m, write_image

from conceptdistill.runner import run
from conceptdistill.stages.report import table_rows

ALL_STAGES = ["masks", "finetune", "inpaint", "synthesize", "segment", "report"]
WORK_STAGES = ALL_STAGES[:-1]
ROWS = table_rows(compose())  # (key, label) of every results row, in the ladder's order
ROW_NAMES = [key for key, _ in ROWS]
#: the paper experiments (every experiment file but the shapes world's and the shared "_" fragments)
EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml")
                     if p.stem not in ("shapes", "shapes_demo") and not p.stem.startswith("_"))
#: experiment -> a tiny tree in its data set's official layout (returns the data root)
TREES = {
    "cub_birds": make_cub,
    "stanford_dogs": lambda folder: make_dogs(folder)[0],
    "stanford_cars": make_cars,
    "human36m": make_h36m,
    "chest_xray": make_chest_xray,
    "folder": make_folder,
}
#: experiment -> what it needs beyond a data root (a user's own folder names its concept and masks)
EXTRA = {"folder": lambda root: ["concept=[bird]", "prompts.foreground='a photo of a bird'",
                                 f"data.masks_root={root.parent / 'masks'}"]}
DATA_ENV = ["CUB_ROOT", "CUB_SEGMENTATIONS_ROOT", "STANFORD_DOGS_ROOT", "STANFORD_CARS_ROOT", "HUMAN36M_ROOT",
            "CHEST_XRAY_ROOT", "IMAGE_FOLDER_ROOT", "IMAGE_FOLDER_MASKS", "SD14_PATH", "SD15_PATH", "SD21_PATH"]

#: step budgets small enough for seconds on a CPU; every stage still runs its whole code path
TINY_STEPS = [
    "masks.module.num_steps=10", "masks.module.start_step=4",
    "finetune.max_steps=2", "finetune.sample_every=0", "finetune.sample_steps=2", "finetune.sample_count=2",
    "inpaint.module.num_steps=3",
    "synthesize.num_samples=4", "synthesize.module.num_steps=3",
    "segment.max_steps=2", "segment.batch_size=4",
    # a shallow segmenter: the default's 45 MB per checkpoint, four per run, filled a test machine's disk
    "segment.module.encoder_depth=3", "segment.module.decoder_channels=[16,8,4]",
]
#: what the paper experiments additionally need on a CPU with 32 px images
TINY_PAPER = [
    "trainer=cpu", "diffusion.dtype=float32", "diffusion.batch_size=8",
    "data.image_size=32", "data.num_workers=0", "data.scan_workers=1",
    "finetune.batch_size=4", "finetune.module.warmup_steps=0",
    "segment.image_size=32",
]


def prompt_words() -> list[str]:
    """Every word of every experiment's prompts, split the way CLIP splits them ("x-ray" -> x, ray)."""
    words: list[str] = []
    for experiment in EXPERIMENTS + ["shapes"]:
        own = EXTRA[experiment](Path("/tmp/unused")) if experiment in EXTRA else []
        cfg = compose([f"+experiment={experiment}", *own], run_dir=Path("/tmp/unused"))
        for text in (cfg.prompts.foreground, cfg.prompts.background, *cfg.concept):
            words += [w for w in re.findall(r"[a-z]+", text.lower()) if w not in words]
    return words


@pytest.fixture(scope="module")
def all_words_model(tmp_path_factory) -> Path:
    """A tiny random SD-shaped pipeline, saved in diffusers layout, whose tokenizer knows every prompt word."""
    from conceptdistill.diffusion.loading import save_diffusion_parts
    from conceptdistill.diffusion.tiny import DEFAULT_WORDS, build_tiny_parts

    words = list(dict.fromkeys([*DEFAULT_WORDS, *prompt_words()]))
    return save_diffusion_parts(build_tiny_parts(words=words), tmp_path_factory.mktemp("tiny") / "pipeline")


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, single_thread):
    """No data set or model paths from the environment, and torch on one thread."""
    for name in DATA_ENV:
        monkeypatch.delenv(name, raising=False)


def read_results(run_dir: Path) -> dict:
    return json.loads((run_dir / "report" / "results.json").read_text())


def check_rows(rows: dict, expected: list[str]) -> None:
    assert list(rows) == expected  # in the ladder's order, and only rows that were produced
    for name, row in rows.items():
        for metric in ("acc", "iou", "miou"):
            assert 0.0 <= row[metric] <= 1.0, (name, metric, row)


def done_records(run_dir: Path) -> dict[str, tuple[int, str]]:
    return {stage: ((run_dir / stage / "DONE.json").stat().st_mtime_ns, (run_dir / stage / "DONE.json").read_text())
            for stage in WORK_STAGES}


# ------------------------------------------------------------------------------------------ shapes world
def test_shapes_world_all_stages_results_file_and_resume(tmp_path, all_words_model):
    run_dir = tmp_path / "run"
    cfg = compose([f"stages=[{','.join(ALL_STAGES)}]", f"diffusion.path={all_words_model}", "data.num_train=8",
                   "data.num_test=4", "logger=none", *TINY_STEPS], run_dir=run_dir)
    summaries = run(cfg)
    assert list(summaries) == ALL_STAGES

    results = read_results(run_dir)
    assert results["experiment"] == "shapes_demo"  # the default experiment
    assert results["date"] == datetime.date.today().isoformat()
    assert results["command"].startswith("python -m conceptdistill")
    assert "git_commit" in results and (results["git_commit"] is None or re.fullmatch(r"[0-9a-f]{4,40}",
                                                                                      results["git_commit"]))
    assert 0.0 <= results["attention_auc"] <= 1.0
    check_rows(results["rows"], ROW_NAMES)  # the shapes world has masks: all eight rows
    seconds = results["seconds"]
    assert set(seconds) == {*WORK_STAGES, "total"}
    assert all(value >= 0 for value in seconds.values())
    assert seconds["total"] == pytest.approx(sum(seconds[s] for s in WORK_STAGES), abs=0.02)
    assert results["synthetic"]["samples"] == 4 and results["finetune"]["steps"] == 2
    # the world's truth judges what each background B shows (tests/stages/test_inpaint_stage.py checks the verdicts)
    removal = results["object_removal_rate"]
    assert removal["judged"] == 4 and removal["skipped"] == 0 and removal["value"] == removal["removed"] / 4

    markdown = (run_dir / "report" / "results.md").read_text()
    assert "| method | acc | IoU | mIoU |" in markdown
    positions = [markdown.index(f"| {label} |") for _, label in ROWS]
    assert positions == sorted(positions)  # the ladder, in order
    for figure in ("masks_grid.png", "inpaint_grid.png", "synthetic_grid.png", "segment_grid.png"):
        assert (run_dir / "report" / figure).exists()

    # a rerun skips every completed stage (only the report is rewritten) and changes nothing
    before = done_records(run_dir)
    started = time.perf_counter()
    again = run(cfg)
    assert time.perf_counter() - started < 10
    assert done_records(run_dir) == before
    assert {stage: again[stage] for stage in WORK_STAGES} == {stage: summaries[stage] for stage in WORK_STAGES}
    assert read_results(run_dir)["rows"] == results["rows"]
    assert not list(run_dir.glob("*.stale-*"))


def test_wandb_logger_writes_an_offline_run_in_the_run_folder(tmp_path, all_words_model, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "run"
    cfg = compose(["stages=[masks]", "logger=wandb", f"diffusion.path={all_words_model}", "data.num_train=2",
                   "data.num_test=4", "splits=[test]", *TINY_STEPS], run_dir=run_dir)
    run(cfg)
    offline_runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1, list(run_dir.rglob("*"))[:20]
    assert list(offline_runs[0].glob("*.wandb"))  # the run's log, for `wandb sync` later


# ------------------------------------------------------------------------------------- paper experiments
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_paper_experiment_runs_end_to_end_on_a_tiny_tree(tmp_path, all_words_model, experiment):
    from hydra.utils import instantiate

    if experiment not in TREES:
        pytest.fail(f"experiment {experiment!r} has no tiny data tree: add its builder to TREES (tests/trees.py)")
    root = TREES[experiment](tmp_path / "data")
    run_dir = tmp_path / "run"
    cfg = compose([f"+experiment={experiment}", f"stages=[{','.join(ALL_STAGES)}]", f"diffusion.path={all_words_model}",
                   f"data.root={root}", "logger=none", *TINY_STEPS, *TINY_PAPER,
                   *EXTRA.get(experiment, lambda root: [])(root)], run_dir=run_dir)

    # the tiny tokenizer holds every concept word as one token, as SD's does for these words
    from conceptdistill.diffusion.loading import load_diffusion_parts

    tokenizer = load_diffusion_parts(all_words_model).tokenizer
    for word in cfg.concept:
        assert tokenizer.tokenize(word) == [f"{word}</w>"]

    summaries = run(cfg)
    results = read_results(run_dir)
    assert results["experiment"] == experiment and results["concept"] == list(cfg.concept)
    assert 0.0 <= results["attention_auc"] <= 1.0
    datamodule = instantiate(cfg.data)
    truth = datamodule.truth
    assert truth in ("mask", "box")
    # box-scored data sets have no supervised row; the others have all eight
    check_rows(results["rows"], ROW_NAMES if truth == "mask" else [n for n in ROW_NAMES if n != "unet_truth"])
    # the masks rows are scored against the data set's truth, for box data sets the rasterised boxes:
    # predicting everything as foreground scores exactly the truth's pooled foreground fraction
    truths = torch.stack([sample["mask"] for sample in datamodule.dataset("test")])
    assert results["rows"]["baseline_all_foreground"]["acc"] == pytest.approx(float(truths.float().mean()))
    assert summaries["masks"]["images"] == len(truths)
    assert set(results["seconds"]) == {*WORK_STAGES, "total"}
    assert results["data"]["test"]["kept"] == len(truths) and results["data"]["train"]["kept"] >= 1
    # no judge of what an image shows outside the shapes world: the field is absent, not 0
    assert "object_removal_rate" not in results and "object_removal_rate" not in summaries["inpaint"].get("scalars", {})
    assert "object removal" not in (run_dir / "report" / "results.md").read_text()
    if truth == "box":
        check_box_protocols(run_dir, datamodule, results)
    else:
        assert not any("iou_box" in row for row in results["rows"].values())


def check_box_protocols(run_dir: Path, datamodule, results: dict) -> None:
    """Every row of a box-scored data set carries both box protocols, named distinctly, in results.json and
    results.md; M_pre's box IoU is what the stored masks give, and differs from its mask-vs-box IoU."""
    import numpy as np

    from conceptdistill.data.geometry import union_pixel_box
    from conceptdistill.maskmath import upsample_mask
    from conceptdistill.metrics import box_iou, tight_box
    from conceptdistill.pipeline.layout import RunLayout

    store = RunLayout(run_dir).mask_store("test")
    for name, row in results["rows"].items():
        assert row["iou_mask_vs_box"] == row["iou"] and 0.0 <= row["iou_box"] <= 1.0, (name, row)
    expected = []
    for sample in datamodule.dataset("test"):
        size = sample["mask"].shape
        mask = upsample_mask(store.load("mask", sample["id"]), size)
        expected.append(box_iou(tight_box(mask), union_pixel_box(*size, sample["boxes"])))
    prelim = results["rows"]["preliminary_masks"]
    assert prelim["iou_box"] == pytest.approx(float(np.mean(expected)))
    assert prelim["iou_box"] != pytest.approx(prelim["iou_mask_vs_box"])  # M_pre's blobs are not boxes
    markdown = (run_dir / "report" / "results.md").read_text()
    assert "| method | acc | IoU mask vs box | mIoU | IoU box |" in markdown
    assert "- IoU mask vs box (`iou_mask_vs_box`): " in markdown and "- IoU box (`iou_box`): " in markdown


# ----------------------------------------------------------------------------------- errors a user sees
def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key not in DATA_ENV}
    env.update(HF_HUB_OFFLINE="1", WANDB_MODE="offline", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "conceptdistill", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_missing_data_root_is_one_readable_paragraph(tmp_path):
    result = run_cli("+experiment=cub_birds", f"hydra.run.dir={tmp_path / 'run'}", "logger=none", cwd=tmp_path)
    assert result.returncode != 0
    err = result.stderr
    # checked before any model is loaded (this machine has no SD weights either), and not wrapped by Hydra
    assert "ModelNotFoundError" not in err and "Error in call to target" not in err, err[-3000:]
    paragraph = next(line for line in err.splitlines() if "images.txt" in line)
    assert paragraph.startswith("conceptdistill.data.readers.DatasetLayoutError: CUB-200-2011"), paragraph
    for expected in ("no root", "data.root=", "CUB_ROOT", "train_test_split.txt", "segmentations", "Official files"):
        assert expected in paragraph, expected


def test_missing_model_folder_says_how_to_provide_weights(tmp_path):
    result = run_cli("diffusion.path=/nonexistent", "stages=[masks]", "logger=none", "data.num_train=2",
                     "data.num_test=2", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode != 0
    paragraph = next((line for line in result.stderr.splitlines() if "ModelNotFoundError" in line), "")
    assert "'/nonexistent'" in paragraph and "does not exist" in paragraph, result.stderr[-3000:]
    for expected in ("diffusers layout", "model_index.json", "huggingface-cli download", "diffusion.path="):
        assert expected in paragraph, expected


# ------------------------------------------------------------------------------------ imperfect data sets
def test_corrupt_grayscale_and_rgba_images_are_skipped_or_converted_and_reported(tmp_path, all_words_model, caplog):
    root = make_cub(tmp_path / "data")
    lines = dict(line.split() for line in (root / "images.txt").read_text().splitlines())
    train = [rel for n, rel in lines.items() if int(n) <= 4]  # make_cub: images 1-4 are the train split
    write_image(root / "images" / train[1], w=32, h=24, mode="L", seed=11)  # grayscale JPEG
    write_image(root / "images" / train[2], w=32, h=24, mode="RGBA", seed=12, fmt="PNG")  # RGBA (a PNG named .jpg)
    (root / "images" / train[3]).write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG" * 20)  # corrupt
    run_dir = tmp_path / "run"
    cfg = compose(["+experiment=cub_birds", f"stages=[{','.join(ALL_STAGES)}]", f"diffusion.path={all_words_model}",
                   f"data.root={root}", "data.val_fraction=0", "logger=none", *TINY_STEPS, *TINY_PAPER],
                  run_dir=run_dir)
    caplog.set_level(logging.INFO, logger="conceptdistill.data")
    run(cfg)

    assert "skipped 1 unreadable image(s)" in caplog.text and Path(train[3]).name in caplog.text
    assert "converted 2 image(s)" in caplog.text
    stats = json.loads((run_dir / "masks" / "DONE.json").read_text())["summary"]["data"]
    assert stats["train"]["kept"] == 3 and stats["train"]["skipped"] == 1
    assert stats["train"]["converted_modes"] == {"L": 1, "RGBA": 1}
    assert stats["train"]["skipped_paths"][0].endswith(Path(train[3]).name)
    assert stats["test"] == {"kept": 2, "skipped": 0, "converted": 0, "converted_modes": {}, "skipped_paths": []}
    results = read_results(run_dir)
    assert results["data"] == stats
    check_rows(results["rows"], ROW_NAMES)
