"""Stage "report": results.json, results.md and index.html from whatever the run's stages have produced.

The table is the paper's ladder (M_pre, M, U-Net on each mask source, supervised U-Net) beside the
baselines; a row a stage has not produced is absent, never zero. Rows and figures are those the stages
declare (pipeline/registry.py), in the pipeline's order. index.html (report_page.py) adds the figures, data
counts, timings, links to the weights and the settings, in one page that needs no network.
"""

from __future__ import annotations

import datetime
import logging
import os
import shutil
import subprocess
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from conceptdistill.pipeline.context import RunContext, command_line
from conceptdistill.pipeline.registry import pipeline_order, register_stage, stage_spec
from conceptdistill.report_page import BOX_COLUMNS, percent, report_page, scalar_text, table_columns
from conceptdistill.utils.io import read_json, write_json

log = logging.getLogger(__name__)

def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


def table_rows(cfg) -> list[tuple[str, str]]:
    """(key in results.json, label in results.md) of every stage's rows, in the pipeline's order."""
    return [row for stage in pipeline_order(cfg) for row in stage_spec(stage).rows_for(cfg)]


def declared_scalars(cfg) -> list[tuple[str, str]]:
    """(key in results.json, label) of every stage's declared scalar results, in the pipeline's order."""
    return [scalar for stage in pipeline_order(cfg) for scalar in stage_spec(stage).scalars]


def collect_results(ctx: RunContext, current: set[str]) -> dict:
    """results.json's content from the DONE records of the stages that are complete for the current settings:
    a stage whose outputs were made with other settings (or whose inputs changed since) is left out, with a
    warning, so the table never mixes results of different settings."""
    stages = pipeline_order(ctx.full_cfg)
    records = {stage: ctx.done_record(stage) if stage in current else None for stage in stages}
    summaries = {stage: (record or {}).get("summary", {}) for stage, record in records.items()}
    rows: dict = {}
    for stage in stages:
        rows.update(summaries[stage].get("rows", {}))
    seconds = {stage: record["seconds"] for stage, record in records.items() if record}
    seconds["total"] = round(sum(seconds.values()), 2)
    results = {
        "experiment": ctx.cfg.experiment,
        "date": datetime.date.today().isoformat(),
        "command": command_line(),
        "git_commit": git_commit(),
        "concept": list(ctx.cfg.concept),
        "rows": {key: rows[key] for key, _ in table_rows(ctx.full_cfg) if key in rows},
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
    for stage in stages:  # a scalar the stage did not measure (e.g. no truth to judge by) stays absent
        measured = summaries[stage].get("scalars", {})
        results.update({key: measured[key] for key, _ in stage_spec(stage).scalars if key in measured})
    if summaries["masks"].get("data"):
        results["data"] = summaries["masks"]["data"]
    if summaries["finetune"]:
        results["finetune"] = {k: v for k, v in summaries["finetune"].items() if k != "weights"}
    if summaries["synthesize"]:
        results["synthetic"] = summaries["synthesize"]
    return results


def current_stages(ctx: RunContext) -> set[str]:
    """The stages whose outputs are complete for this command's settings; the others are left out, with a
    warning each."""
    return {stage for stage in pipeline_order(ctx.full_cfg) if _current(ctx, stage)}


def _current(ctx: RunContext, stage: str) -> bool:
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


def _packaged_world_training(ctx: RunContext) -> dict:
    """Fidelity recorded when the diffusion model in use was trained (its training.json), if any."""
    path = Path(ctx.diffusion_source()) / "training.json"
    if path.exists():
        return read_json(path)
    return {}


def markdown(results: dict, labels: dict[str, str], scalar_labels: dict[str, str] | None = None) -> str:
    columns = table_columns(results["rows"])
    lines = [f"# {results['experiment']}: concept {', '.join(results['concept'])}", "",
             f"Made on {results['date']} (commit {results['git_commit']}) by:", "", f"    {results['command']}", "",
             "Pooled over the test images, in %:", "",
             "| method | " + " | ".join(header for _, header in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for key, row in results["rows"].items():
        lines.append(f"| {labels[key]} | " + " | ".join(percent(row, column) for column, _ in columns) + " |")
    lines.append("")
    if any(key == "iou_box" for key, _ in columns):
        lines += [f"- {label} (`{key}`): {definition}." for key, label, definition in BOX_COLUMNS] + [""]
    for key in ("attention_auc", "prompt_fidelity", "background_fidelity"):
        if results.get(key) is not None:
            lines.append(f"- {key.replace('_', ' ')}: {results[key]:.3f}")
    for key, label in (scalar_labels or {}).items():
        if key in results:
            lines.append(f"- {label} (`{key}`): {scalar_text(results[key])}")
    lines += ["", "Seconds per stage: " + ", ".join(f"{k} {v:.0f}" for k, v in results["seconds"].items()), ""]
    for name in results.get("figures", []):
        lines.append(f"![{name}]({name})")
    return "\n".join(lines) + "\n"


@register_stage("report", settings=("concept",), always_run=True, reads_data=False)
def run_report(ctx: RunContext) -> dict:
    folder = ctx.stage_dir("report")
    current = current_stages(ctx)
    results = collect_results(ctx, current)
    figures = []
    for stage in pipeline_order(ctx.full_cfg):
        if stage not in current:  # figures of outputs made with other settings are left out too
            continue
        for name, pattern in stage_spec(stage).figures:
            matches = sorted(ctx.layout.stage_dir(stage).glob(pattern))  # the last match: e.g. the last step's samples
            if matches:
                shutil.copyfile(matches[-1], folder / name)
                figures.append(name)
    for stage in pipeline_order(ctx.full_cfg):  # an earlier report's copy of a figure left out now goes
        for name, _ in stage_spec(stage).figures:
            if name not in figures:
                (folder / name).unlink(missing_ok=True)
    results["figures"] = figures
    write_json(folder / "results.json", results)
    scalar_labels = dict(declared_scalars(ctx.full_cfg))
    text = markdown(results, dict(table_rows(ctx.full_cfg)), scalar_labels)
    (folder / "results.md").write_text(text)
    page = report_page(results, dict(table_rows(ctx.full_cfg)), folder=folder, settings=settings_text(ctx.full_cfg),
                       weights=weight_links(ctx, folder, current), scalar_labels=scalar_labels)
    (folder / "index.html").write_text(page, encoding="utf-8")
    print(text)
    return {"results": str(folder / "results.json"), "rows": list(results["rows"]), "page": str(folder / "index.html")}


def settings_text(cfg) -> str:
    """The composed config as YAML, interpolations resolved where they can be (an unset environment variable
    of an unused data set cannot, and is then shown as written)."""
    try:
        return OmegaConf.to_yaml(cfg, resolve=True)
    except OmegaConfBaseException:
        return OmegaConf.to_yaml(cfg)


def weight_links(ctx: RunContext, folder, current: set[str]) -> dict[str, str]:
    """Name -> path relative to the report folder of the run's trained weights that exist: the fine-tuned
    diffusion weights (finetune/weights) and each finished segmenter (segment/<source>/final.ckpt)."""
    found = {}
    weights = ctx.layout.finetuned_weights()
    if weights.exists() and "finetune" in current:
        found["fine-tuned diffusion weights"] = weights
    if "segment" in current:
        for checkpoint in sorted(ctx.layout.stage_dir("segment").glob("*/final.ckpt")):
            found[f"segmenter {checkpoint.parent.name}"] = checkpoint
    return {name: os.path.relpath(path, folder).replace(os.sep, "/") + ("/" if path.is_dir() else "")
            for name, path in found.items()}
