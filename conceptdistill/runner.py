"""Runs the selected stages of one experiment in order, skipping those already complete.

`run(cfg)` is what `python -m conceptdistill` calls and what tests call directly. Each stage is a function
`run_<stage>(ctx: RunContext) -> dict` in `conceptdistill.stages.<stage>` that reads earlier stages'
artifacts from the run folder, writes its own into `ctx.stage_dir(<stage>)`, and returns a summary
(metrics, counts). A stage is complete when its folder holds `DONE.json` with the same fingerprint
(a hash of the settings it depends on and of its inputs' fingerprints); complete stages are skipped, so a
rerun of an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import shutil
import sys
import time
from functools import cached_property
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from conceptdistill.utils.io import read_json, write_json

log = logging.getLogger(__name__)

#: stage name -> the stages whose artifacts it reads (their fingerprints feed into its own)
STAGE_INPUTS: dict[str, tuple[str, ...]] = {
    "world": (),
    "masks": ("world",),
    "finetune": ("world", "masks"),
    "inpaint": ("finetune", "masks"),
    "synthesize": ("finetune",),
    "segment": ("masks", "inpaint", "synthesize"),
    "predict": ("segment",),
    "report": (),
}
#: stages that always run (cheap, and they summarise whatever exists)
ALWAYS_RUN = {"report", "predict"}
#: stages that read the data set (checked before anything runs, so a wrong data root fails at once)
STAGES_READING_DATA = set(STAGE_INPUTS) - {"report", "predict"}
#: config sections every stage's results depend on
SHARED_SETTINGS = ("seed", "concept", "prompts", "data", "model")


class StageError(RuntimeError):
    """A stage cannot run as configured; the message says what to do."""


class RunContext:
    """What a stage needs: the config, the run folder, the data, trainers and loggers."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir).resolve()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.summaries: dict[str, dict] = {}

    # ----- folders and completion ---------------------------------------------------------------
    def stage_dir(self, stage: str) -> Path:
        path = self.run_dir / stage
        path.mkdir(parents=True, exist_ok=True)
        return path

    def done_record(self, stage: str) -> dict | None:
        path = self.run_dir / stage / "DONE.json"
        return read_json(path) if path.exists() else None

    def fingerprint(self, stage: str) -> str:
        settings = {key: self._plain(key) for key in SHARED_SETTINGS}
        settings[stage] = self._plain(stage) if stage in self.cfg else None
        settings["inputs"] = {
            name: (self.done_record(name) or {}).get("fingerprint") for name in STAGE_INPUTS.get(stage, ())
        }
        blob = json.dumps(settings, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def _plain(self, key: str) -> Any:
        value = self.cfg.get(key)
        return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value

    def is_complete(self, stage: str) -> bool:
        record = self.done_record(stage)
        return record is not None and record.get("fingerprint") == self.fingerprint(stage)

    def prepare_stage_dir(self, stage: str) -> Path:
        """Open a stage folder for (re)work. Partial work done with the same settings is kept (the stage
        resumes it); work done with other settings is moved aside, never deleted."""
        folder = self.run_dir / stage
        marker = folder / "FINGERPRINT"
        fingerprint = self.fingerprint(stage)
        if folder.exists() and marker.exists() and marker.read_text().strip() != fingerprint:
            stale = folder.with_name(f"{stage}.stale-{time.strftime('%Y%m%d-%H%M%S')}")
            log.warning("settings of stage %s changed: moving its earlier outputs to %s", stage, stale)
            shutil.move(str(folder), str(stale))
        folder.mkdir(parents=True, exist_ok=True)
        marker.write_text(fingerprint + "\n")
        return folder

    # ----- shared resources ---------------------------------------------------------------------
    @cached_property
    def datamodule(self):
        from hydra.errors import InstantiationException
        from hydra.utils import instantiate

        from conceptdistill.data.readers import DatasetLayoutError

        try:
            return instantiate(self.cfg.data)
        except InstantiationException as err:
            # Hydra wraps the reader's one-paragraph "what is expected and where" message in its own
            # "Error in call to target ..." text; show the reader's message as it is.
            if isinstance(err.__cause__, DatasetLayoutError):
                raise err.__cause__ from None
            raise

    def diffusion_source(self) -> str:
        """The diffusion model to use: the one this run's `world` stage trained, else `model.path`."""
        trained = self.run_dir / "world" / "pipeline"
        if (trained / "model_index.json").exists():
            return str(trained)
        from conceptdistill.diffusion.registry import resolve_model_path

        return resolve_model_path(self.cfg.model)

    def load_parts(self, *, finetuned: bool = False):
        """The diffusion model's parts on the CPU (Lightning moves them to the device): float32 on the
        CPU, the configured dtype (e.g. float16) where the run uses a GPU; with `finetuned`, plus the weights
        written by this run's finetune stage."""
        import torch

        from conceptdistill.diffusion.loading import load_diffusion_parts

        on_gpu = self.cfg.trainer.accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available()
        dtype = getattr(torch, str(self.cfg.model.dtype)) if on_gpu else torch.float32
        parts = load_diffusion_parts(
            self.diffusion_source(), revision=self.cfg.model.get("revision"), variant=self.cfg.model.get("variant"),
            dtype=dtype,
        )
        if finetuned:
            from conceptdistill.stages.finetune import load_finetuned

            load_finetuned(parts, self.run_dir / "finetune" / "weights")
        return parts

    def logger(self, stage: str):
        """A fresh experiment logger for one stage job (or None), grouped by run folder."""
        spec = self.cfg.get("logger")
        if not spec or "_target_" not in spec:
            return None
        from hydra.utils import instantiate

        target = spec["_target_"]
        extra: dict[str, Any] = {}
        if target.endswith("WandbLogger"):
            extra = {"name": f"{self.cfg.experiment}-{stage}", "group": self.run_dir.name, "job_type": stage}
            os.environ.setdefault("WANDB_SILENT", "true")
        else:
            extra = {"name": stage, "version": ""}
        return instantiate(spec, **extra)

    def trainer(self, stage: str, **overrides):
        """A Lightning trainer with the configured hardware settings plus the stage's own budget."""
        import pytorch_lightning as pl

        kwargs = dict(OmegaConf.to_container(self.cfg.trainer, resolve=True))
        kwargs.setdefault("default_root_dir", str(self.stage_dir(stage)))
        kwargs.setdefault("logger", self.logger(stage) or False)
        kwargs.setdefault("enable_model_summary", False)
        kwargs.update(overrides)
        return pl.Trainer(**kwargs)


def command_line() -> str:
    """How this run was started, for the records it writes (results.json, a world model's training.json)."""
    return "python -m conceptdistill " + " ".join(sys.argv[1:])


def finish_loggers() -> None:
    """Close a wandb run so that the next stage (or multirun job) starts its own."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()


def stage_function(stage: str):
    if stage not in STAGE_INPUTS:
        raise StageError(f"unknown stage {stage!r}; choose from {', '.join(STAGE_INPUTS)} (e.g. stages=[masks,finetune])")
    module = importlib.import_module(f"conceptdistill.stages.{stage}")
    return getattr(module, f"run_{stage}")


def run(cfg: DictConfig) -> dict[str, dict]:
    """Run `cfg.stages` in order; returns each stage's summary."""
    _configure_torch()
    ctx = RunContext(cfg)
    if any(stage in STAGES_READING_DATA and not ctx.is_complete(stage) for stage in cfg.stages):
        ctx.datamodule  # noqa: B018 - a missing or malformed data set fails here, before any model is loaded
    for stage in cfg.stages:
        function = stage_function(stage)
        if stage not in ALWAYS_RUN and ctx.is_complete(stage):
            log.info("stage %s: complete, skipped", stage)
            ctx.summaries[stage] = ctx.done_record(stage)["summary"]
            continue
        log.info("stage %s: running in %s", stage, ctx.run_dir / stage)
        ctx.prepare_stage_dir(stage)
        started = time.perf_counter()
        try:
            summary = function(ctx) or {}
        finally:
            finish_loggers()
        seconds = time.perf_counter() - started
        write_json(
            ctx.stage_dir(stage) / "DONE.json",
            {"fingerprint": ctx.fingerprint(stage), "seconds": round(seconds, 2), "summary": summary},
        )
        ctx.summaries[stage] = summary
        log.info("stage %s: done in %.1f s %s", stage, seconds, _short(summary))
    return ctx.summaries


def _short(summary: dict) -> str:
    flat = {k: v for k, v in summary.items() if isinstance(v, (int, float, str))}
    return json.dumps(flat)[:300] if flat else ""


def _configure_torch() -> None:
    import torch

    # One process owns all cores (two processes sharing them slow each other several-fold), unless the
    # user pinned a thread count with OMP_NUM_THREADS, e.g. to run beside another job.
    if not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    torch.set_float32_matmul_precision("high")
