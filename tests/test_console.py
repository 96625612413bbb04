"""What a person sees in the terminal: the `conceptdistill` command and its help, one line per stage, progress bars,
the results table and where the results are; no dependency chatter known to be harmless; a quiet mode."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CONF_DIR, REPO
from test_end_to_end import TINY_STEPS

#: known-harmless dependency messages the console must not show (utils/console.py filters them at the source)
CHATTER = ("💡 Tip", "LeafSpec", "in eval mode", "smaller than the logging interval", "Loading weights",
           "GPU available", "Seed set to", "weights_only")
STAGES = ["masks", "finetune", "inpaint", "synthesize", "segment", "report"]


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONPATH": str(REPO),
           "OMP_NUM_THREADS": "1", "COLUMNS": "120"}
    return subprocess.run([sys.executable, "-m", "conceptdistill", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def tiny_run_args(tiny_model):
    return [f"diffusion.path={tiny_model}", "data.num_train=8", "data.num_test=4", "logger=csv", *TINY_STEPS]


def test_a_run_prints_one_line_per_stage_the_table_and_where_results_are(tiny_run_args, tmp_path):
    result = cli(*tiny_run_args, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    for noise in CHATTER:
        assert noise not in output, noise
    for number, stage in enumerate(STAGES, start=1):
        assert f"stage {stage} ({number}/{len(STAGES)}): running" in output
        assert f"stage {stage} ({number}/{len(STAGES)}): done in" in output
    assert "stage masks (1/6): done in" in output and "preliminary_masks IoU" in output  # a one-line result
    assert "Predicting" in output  # Lightning's progress bars; a training stage's counts steps against its budget:
    assert re.search(r"^finetune\b.*\b(\d+)/\1\b", output, re.M) and re.search(r"^segment-\w+\b.*\b(\d+)/\1\b", output, re.M)
    assert "Epoch" not in output  # Lightning's own label of step-budget training, "Epoch 0/-2"
    assert "| method | acc | IoU | mIoU |" in result.stdout
    assert f"results:    {tmp_path / 'run' / 'report' / 'results.md'}" in result.stdout
    assert f"weights:    {tmp_path / 'run' / 'finetune' / 'weights'}" in result.stdout
    assert "segmenter:  " in result.stdout

    # a rerun skips every finished stage, and says so in one line each
    again = cli(*tiny_run_args, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert again.returncode == 0
    assert all(f"stage {stage} ({n}/6): complete, skipped" in again.stderr + again.stdout
               for n, stage in enumerate(STAGES[:-1], start=1))


def test_quiet_prints_only_the_results(tiny_run_args, tmp_path):
    result = cli(*tiny_run_args, "quiet=true", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "stage masks" not in output and "Predicting" not in output
    assert not re.search(r"^(finetune|segment-\w+)\b.*\d+/\d+", output, re.M)  # no training progress bar
    assert "| method | acc | IoU | mIoU |" in result.stdout and "results:    " in result.stdout


def test_the_command_and_its_help_explain_stages_experiments_and_examples(tmp_path):
    command = shutil.which("conceptdistill", path=str(Path(sys.executable).parent))
    assert command, "the `conceptdistill` command is installed with the package (pyproject [project.scripts])"
    result = subprocess.run([command, "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert "powered by Hydra" not in text
    from conceptdistill.pipeline.registry import known_stages

    for stage in known_stages():
        assert f"\n  {stage} " in text, stage
    for experiment in sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml")):
        assert f"\n  {experiment} " in text, experiment
    assert text.count("\n  conceptdistill ") >= 3  # the examples
    # the command is `python -m conceptdistill`: the same config, and +experiment= works as experiment=
    shown = subprocess.run([command, "+experiment=cub_birds", "--cfg", "job"], cwd=tmp_path, capture_output=True,
                           text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert "experiment: cub_birds" in shown.stdout


def test_a_wrong_setting_is_one_line_without_a_traceback(tmp_path):
    result = cli("stages=[mask]", "logger=none", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith(
        "conceptdistill.pipeline.registry.StageError: unknown stage 'mask'; choose from")
