"""Rerun some stages of a finished run in a copy of its folder, through the command a user runs: the helper of
this folder's sweeps (segmenter_budget.py, finetune_curve.py), so that each setting they compare differs from
the recorded run by its overrides alone."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent


def experiment_of(run: Path) -> list[str]:
    """The `experiment=...` argument(s) of the command that made `run` (read from its masks stage's record)."""
    command = json.loads((run / "masks" / "DONE.json").read_text())["command"]
    return [a for a in shlex.split(command)[3:] if a.startswith(("experiment=", "+experiment="))]


def rerun(run: Path, work: Path, keep: tuple[str, ...], overrides: list[str]) -> tuple[float, str]:
    """Copy the stages `keep` of `run` (and its .hydra record) into a fresh `work` folder, then run
    `python -m conceptdistill <run's experiment> hydra.run.dir=<work> logger=none quiet=true <overrides>` there.

    Returns the command's wall-clock seconds and the command as a user would type it. Raises
    subprocess.CalledProcessError when the command fails."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    for name in (".hydra", *keep):
        shutil.copytree(run / name, work / name)
    args = [*experiment_of(run), f"hydra.run.dir={work}", "logger=none", "quiet=true", *overrides]
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "conceptdistill", *args], check=True, cwd=REPO)
    return time.perf_counter() - started, shlex.join(["python", "-m", "conceptdistill", *args])


def summary_of(work: Path, stage: str) -> dict:
    """The summary a finished stage recorded in its DONE.json."""
    return json.loads((work / stage / "DONE.json").read_text())["summary"]


def concept_of(run: Path) -> str:
    """The concept word(s) of `run`, from its saved config."""
    from omegaconf import OmegaConf

    return " ".join(OmegaConf.load(run / ".hydra" / "config.yaml").concept)
