"""Runs the selected stages of one experiment in order, skipping those already complete.

`run(cfg)` is what `python -m conceptdistill` calls and what tests call directly. Each stage is a function
`run(ctx: RunContext) -> dict` registered with `@register_stage` in its module `conceptdistill.stages.<stage>`;
it reads earlier stages' artifacts from the run folder (pipeline/layout.py), writes its own into its stage
folder, and returns a summary (metrics, counts). A stage is complete when its folder holds `DONE.json` with the
same fingerprint (pipeline/context.py); complete stages are skipped, so a rerun of an interrupted run resumes
where it stopped, and a stage whose settings or inputs changed runs again.
"""

from __future__ import annotations

import logging
import os
import time

from omegaconf import DictConfig

from conceptdistill.checks import check_hardware, check_settings
from conceptdistill.pipeline.context import RunContext, command_line, finish_loggers
from conceptdistill.pipeline.layout import move_aside
from conceptdistill.pipeline.registry import stage_spec
from conceptdistill.utils.checkpoints import SECONDS_BEFORE_RESUME
from conceptdistill.utils.console import quiet_dependencies, set_quiet
from conceptdistill.utils.io import write_json

__all__ = ["run"]

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict[str, dict]:
    """Run `cfg.stages` in order; returns each stage's summary.

    Settings are checked first (`check_settings`), then whether the data set is there, both before any
    model is loaded. A stage complete for the current settings is skipped; a stage whose inputs are missing
    or stale is refused (StageError).
    """
    _configure_torch()
    quiet_dependencies()
    set_quiet(bool(cfg.get("quiet")))
    cfg = check_settings(cfg)
    ctx = RunContext(cfg)
    specs = [stage_spec(stage) for stage in cfg.stages]
    to_run = [spec.name for spec in specs if spec.always_run or not ctx.is_complete(spec.name)]
    if any(stage_spec(name).reads_data for name in to_run):
        ctx.datamodule  # noqa: B018 - a missing or malformed data set fails here, before any model is loaded
    check_hardware(cfg, to_run)
    if "world" not in to_run and any(stage_spec(name).uses_model for name in to_run):
        ctx.check_model_settings()  # a concept or image size the model cannot take fails before anything moves
    ran_producing = False
    for number, spec in enumerate(specs, start=1):
        stage = spec.name
        name = f"stage {stage} ({number}/{len(specs)})"
        if not spec.always_run and ctx.is_complete(stage):
            log.info("%s: complete, skipped", name)
            ctx.summaries[stage] = ctx.done_record(stage)["summary"]
            continue
        ctx.require_inputs(stage)
        log.info("%s: running in %s", name, ctx.layout.stage_dir(stage))
        if not spec.always_run:
            ctx.prepare_stage_dir(stage)
        fingerprint = ctx.fingerprint(stage)
        started = time.perf_counter()
        ctx.cfg = ctx.view(stage)
        try:
            summary = spec.run(ctx) or {}
        finally:
            ctx.cfg = cfg
            finish_loggers()
        # a resumed training stage reports the seconds its killed runs trained (utils.checkpoints.TrainingClock)
        seconds = time.perf_counter() - started + float(summary.get(SECONDS_BEFORE_RESUME, 0.0))
        ctx.forget_fingerprints()  # e.g. `world` has just replaced the model that later stages read
        if not spec.always_run:  # an always-run stage is never skipped, and may write outside the run folder
            inputs = {read: ctx.fingerprint(read) for read in spec.inputs_for(cfg)}
            write_json(
                ctx.layout.done_file(stage),
                {"fingerprint": fingerprint, "inputs": inputs, "seconds": round(seconds, 2), "command": command_line(),
                 "summary": summary},
            )
            retired = ctx.retire_stale_stages()
            # the report shows stages that declare rows or figures; others (export, predict) leave it valid
            ran_producing = ran_producing or bool(spec.rows_for(cfg) or spec.figures or retired)
        ctx.summaries[stage] = summary
        log.info("%s: done in %.0f s%s", name, seconds, one_line(summary))
    report = ctx.layout.stage_dir("report")
    if ran_producing and "report" not in cfg.stages and report.exists():
        # it describes outputs that have changed since: never leave it where results are looked for
        move_aside(report, "the report describes earlier outputs (run stages=[report] to make it anew)")
    print(where_results_are(ctx))  # noqa: T201 - the run's last words, in quiet mode too
    return ctx.summaries


def one_line(summary: dict) -> str:
    """A stage summary as one readable line: its results rows' IoU, else its counts and scores."""
    rows = summary.get("rows")
    if isinstance(rows, dict) and rows:
        return ": " + ", ".join(f"{key} IoU {100 * row['iou']:.1f}" for key, row in rows.items() if "iou" in row)
    flat = [f"{key} {value:.3g}" if isinstance(value, float) else f"{key} {value}"
            for key, value in summary.items() if isinstance(value, (int, float)) and not isinstance(value, bool)]
    return ": " + ", ".join(flat[:6]) if flat else ""


def where_results_are(ctx: RunContext) -> str:
    """Where the run's results, trained weights and segmenters are, for the console's last lines: only those of
    stages complete for this command's settings (others are kept on disk until a rerun moves them aside)."""
    layout = ctx.layout
    lines = [f"run folder: {layout.root}"]
    report = layout.stage_dir("report")
    if (report / "results.md").exists():
        lines.append(f"results:    {report / 'results.md'}")
        lines.append(f"page:       {report / 'index.html'}")
    if layout.finetuned_weights().exists() and _current(ctx, "finetune"):
        lines.append(f"weights:    {layout.finetuned_weights()}")
    segmenters = sorted(layout.stage_dir("segment").glob("*/final.ckpt")) if _current(ctx, "segment") else []
    lines += [f"segmenter:  {path}" for path in segmenters]
    return "\n".join(lines)


def _current(ctx: RunContext, stage: str) -> bool:
    """Whether `stage`'s outputs are complete for this command's settings; False when that cannot be told
    because the diffusion model its fingerprint covers is not where the config points (e.g. a predict-only
    command that names no model)."""
    from conceptdistill.diffusion.loading import ModelNotFoundError

    try:
        return ctx.is_complete(stage)
    except ModelNotFoundError:
        return False


def _configure_torch() -> None:
    import torch

    # One process owns all cores (two processes sharing them slow each other several-fold), unless the
    # user pinned a thread count with OMP_NUM_THREADS, e.g. to run beside another job.
    if not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    torch.set_float32_matmul_precision("high")
