"""Rerun some stages of a finished run in a copy of its folder, through the command a user runs: the helper of
this folder's sweeps (segmenter_budget.py, finetune_curve.py, concepts.py), so that each setting they compare
differs from the recorded run by its overrides alone. The run's own overrides (its `.hydra/overrides.yaml`, less
where files and logs go and which stages run) are replayed first, then the sweep's. Also the sweeps' shared
command line (`sweep_parser`) and record header (`record_header`)."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
#: overrides of the recorded command that say where and how it ran, not what it computed
NOT_REPLAYED = ("hydra.", "stages=", "logger=", "quiet=")


def require_finished(run: Path, stages: tuple[str, ...]) -> None:
    """Exit with a message (no traceback) unless `run` is a run folder whose `stages` are finished."""
    if not (run / ".hydra" / "overrides.yaml").is_file():
        sys.exit(f"{run} is not a run folder made by `python -m conceptdistill` (no .hydra/overrides.yaml)")
    missing = [stage for stage in stages if not (run / stage / "DONE.json").is_file()]
    if missing:
        sys.exit(f"{run} has not finished stage(s) {', '.join(missing)}: finish it first with the command that "
                 f"made it (python -m conceptdistill hydra.run.dir={run} ...)")


def recorded_overrides(run: Path) -> list[str]:
    """The overrides `run` was made with (from its .hydra record), less those in NOT_REPLAYED."""
    from omegaconf import OmegaConf

    given = OmegaConf.to_container(OmegaConf.load(run / ".hydra" / "overrides.yaml"))
    return [str(o) for o in given if not str(o).lstrip("+~").startswith(NOT_REPLAYED)]


def rerun(run: Path, work: Path, keep: tuple[str, ...], overrides: list[str], *, reuse: bool = False) -> tuple[float, str]:
    """Copy the stages `keep` of `run` (and its .hydra record) into a fresh `work` folder, then run
    `python -m conceptdistill <run's overrides> hydra.run.dir=<work> logger=none quiet=true <overrides>` there
    (a later value of a setting wins). With `reuse`, a `work` folder an earlier sweep left is kept: the command
    then skips the stages it finished with the same settings and inputs, and redoes the rest (the runner's own
    fingerprints decide).

    Returns the command's wall-clock seconds and the command as a user would type it. Exits with the command and
    its exit code when it fails (its own message is printed above)."""
    if not (reuse and (work / ".hydra").is_dir()):
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        for name in (".hydra", *keep):
            shutil.copytree(run / name, work / name)
    args = [*recorded_overrides(run), f"hydra.run.dir={work}", "logger=none", "quiet=true", *overrides]
    command = shlex.join(["python", "-m", "conceptdistill", *args]).replace(f"{REPO}/", "")  # as typed in the checkout
    started = time.perf_counter()
    finished = subprocess.run([sys.executable, "-m", "conceptdistill", *args], cwd=REPO)
    if finished.returncode:
        sys.exit(f"this rerun failed (exit code {finished.returncode}; its message is above):\n  {command}")
    return time.perf_counter() - started, command


def summary_of(work: Path, stage: str) -> dict:
    """The summary a finished stage recorded in its DONE.json."""
    return json.loads((work / stage / "DONE.json").read_text())["summary"]


def stage_seconds(work: Path, stages: tuple[str, ...]) -> float:
    """The seconds the finished `stages` of `work` took, as their DONE.json records them (the stages' own time,
    also when a reused rerun skipped them; a resumed stage's includes its killed runs' training)."""
    return sum(json.loads((work / stage / "DONE.json").read_text())["seconds"] for stage in stages)


def concept_of(run: Path) -> str:
    """The concept word(s) of `run`, from its saved config."""
    from omegaconf import OmegaConf

    return " ".join(OmegaConf.load(run / ".hydra" / "config.yaml").concept)


def prepare_output(out: Path) -> None:
    """Make `out`'s folder and remove the files an earlier record left under its name, so that no old figure or
    table stands beside new results."""
    out.parent.mkdir(parents=True, exist_ok=True)
    for suffix in (".json", ".md", ".png"):
        out.with_suffix(suffix).unlink(missing_ok=True)


def sweep_parser(doc: str, name: str, run_help: str | None) -> argparse.ArgumentParser:
    """The options every sweep takes: `--run` (a finished run to vary; omitted when `run_help` is None),
    `--work` (its rerun folders, runs/<name>), `--out` (its record's stem, experiments/shapes/<name>) and Hydra
    overrides of every rerun after `--`. Also sets HF_HUB_OFFLINE (nothing is downloaded)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if run_help is not None:
        parser.add_argument("--run", type=Path, required=True, help=run_help)
    parser.add_argument("--work", type=Path, default=REPO / "runs" / name.replace("_", "-"),
                        help="where the runs go")
    parser.add_argument("--out", type=Path, default=HERE / name, help="the record's path without suffix")
    if run_help is not None:
        parser.add_argument("--reuse", action="store_true",
                            help="keep the reruns an earlier sweep left in --work (a rerun then skips what it "
                                 "finished with the same settings and redoes the rest)")
    parser.add_argument("extra", nargs="*", help="Hydra overrides of every rerun (after --)")
    return parser


def record_header(script: str) -> dict:
    """The head of a sweep's record: today's date, the command as typed in the checkout, the machine."""
    return {"date": datetime.date.today().isoformat(),
            "command": shlex.join(["python", f"experiments/shapes/{script}", *sys.argv[1:]]),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs"}
