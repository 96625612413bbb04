"""Stage "report": results.json and results.md from whatever the run's stages have produced.

The table is the paper's ladder (M_pre, M, U-Net on each mask source, supervised U-Net) beside the
baselines; a row a stage has not produced is absent, never zero. Figures are collected from the stages.
"""

from __future__ import annotations

import datetime
import logging
import shutil
import subprocess
from pathlib import Path

from conceptdistill.runner import command_line
from conceptdistill.stages.registry import register_stage
from conceptdistill.utils.io import write_json

log = logging.getLogger(__name__)

#: (key in results.json, label in results.md), in the ladder's order
ROWS = [
    ("baseline_all_foreground", "baseline: all foreground"),
    ("baseline_centre_box", "baseline: best centred square"),
    ("preliminary_masks", "preliminary masks M_pre"),
    ("refined_masks", "refined masks M"),
    ("unet_preliminary", "U-Net on (D, M_pre)"),
    ("unet_refined", "U-Net on (D, M)"),
    ("unet_refined_synthetic", "U-Net on (D, M) u D'_s"),
    ("unet_truth", "supervised U-Net (upper bound)"),
]
STAGES = ("world", "masks", "finetune", "inpaint", "synthesize", "segment")
#: figure name in the report -> where a stage left it (a glob: the last match in sorted order is taken)
FIGURES = {"masks_grid.png": "masks/masks_grid.png", "inpaint_grid.png": "inpaint/inpaint_grid.png",
           "finetune_samples.png": "finetune/samples/step_*.png", "synthetic_grid.png": "synthesize/synthetic_grid.png",
           "segment_grid.png": "segment/segment_grid.png", "world_samples.png": "world/samples_grid.png"}


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


def collect_results(ctx) -> dict:
    """results.json's content from the DONE records of the stages that are complete for the current settings:
    a stage whose outputs were made with other settings (or whose inputs changed since) is left out, with a
    warning, so the table never mixes results of different settings."""
    records = {stage: ctx.done_record(stage) if _current(ctx, stage) else None for stage in STAGES}
    summaries = {stage: (record or {}).get("summary", {}) for stage, record in records.items()}
    rows: dict = {}
    for stage in ("masks", "inpaint", "segment"):
        rows.update(summaries[stage].get("rows", {}))
    seconds = {stage: record["seconds"] for stage, record in records.items() if record}
    seconds["total"] = round(sum(seconds.values()), 2)
    results = {
        "experiment": ctx.cfg.experiment,
        "date": datetime.date.today().isoformat(),
        "command": command_line(),
        "git_commit": git_commit(),
        "concept": list(ctx.cfg.concept),
        "rows": {key: rows[key] for key, _ in ROWS if key in rows},
        "seconds": seconds,
    }
    if "attention_auc" in summaries["masks"]:
        results["attention_auc"] = summaries["masks"]["attention_auc"]
        results["attention_contrast"] = summaries["masks"].get("attention_contrast")
        results["attention_layers"] = summaries["masks"].get("layers")
    fidelity = summaries["world"] or _packaged_world_training(ctx)
    for key in ("prompt_fidelity", "shape_fidelity", "colour_fidelity", "background_fidelity"):
        if key in fidelity:
            results[key] = fidelity[key]
    if summaries["masks"].get("data"):
        results["data"] = summaries["masks"]["data"]
    if summaries["finetune"]:
        results["finetune"] = {k: v for k, v in summaries["finetune"].items() if k != "weights"}
    if summaries["synthesize"]:
        results["synthetic"] = summaries["synthesize"]
    return results


def _current(ctx, stage: str) -> bool:
    if ctx.done_record(stage) is None:
        return False
    try:
        current = ctx.is_complete(stage)
    except (OSError, ValueError) as err:  # e.g. the model folder is gone: its results cannot be checked
        log.warning("report: cannot check that stage %s is current (%s); leaving its results out", stage, err)
        return False
    if not current:
        log.warning("report: stage %s was run with other settings (or its inputs changed since); its results are "
                    "left out of the report: run it again (stages=[%s,...,report])", stage, stage)
    return current


def _packaged_world_training(ctx) -> dict:
    """Fidelity recorded when the diffusion model in use was trained (its training.json), if any."""
    path = Path(ctx.diffusion_source()) / "training.json"
    if path.exists():
        from conceptdistill.utils.io import read_json

        return read_json(path)
    return {}


def markdown(results: dict) -> str:
    lines = [f"# {results['experiment']}: concept {', '.join(results['concept'])}", "",
             f"Made on {results['date']} (commit {results['git_commit']}) by:", "", f"    {results['command']}", "",
             "Pooled over the test images, in %:", "", "| method | acc | IoU | mIoU |", "|---|---|---|---|"]
    labels = dict(ROWS)
    for key, row in results["rows"].items():
        lines.append(f"| {labels[key]} | {100 * row['acc']:.1f} | {100 * row['iou']:.1f} | {100 * row['miou']:.1f} |")
    lines.append("")
    for key in ("attention_auc", "prompt_fidelity", "background_fidelity"):
        if results.get(key) is not None:
            lines.append(f"- {key.replace('_', ' ')}: {results[key]:.3f}")
    lines += ["", "Seconds per stage: " + ", ".join(f"{k} {v:.0f}" for k, v in results["seconds"].items()), ""]
    for name in results.get("figures", []):
        lines.append(f"![{name}]({name})")
    return "\n".join(lines) + "\n"


@register_stage("report", settings=("concept",), always_run=True, reads_data=False)
def run_report(ctx) -> dict:
    folder = ctx.stage_dir("report")
    results = collect_results(ctx)
    figures = []
    for name, pattern in FIGURES.items():
        matches = sorted(ctx.run_dir.glob(pattern))
        if matches:
            shutil.copyfile(matches[-1], folder / name)
            figures.append(name)
    results["figures"] = figures
    write_json(folder / "results.json", results)
    text = markdown(results)
    (folder / "results.md").write_text(text)
    print(text)
    return {"results": str(folder / "results.json"), "rows": list(results["rows"])}
