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

from conceptdistill.checks import check_hardware, check_settings
from conceptdistill.stages.registry import INFRASTRUCTURE_KEYS, PRESENTATION_KEYS, StageError, stage_spec
from conceptdistill.utils.io import read_json, write_json

__all__ = ["RunContext", "StageError", "run", "open_output_folder", "config_view", "result_settings"]

log = logging.getLogger(__name__)



class RunContext:
    """What a stage needs: the config, the run folder, the data, trainers and loggers.

    `cfg` is the view of the configuration the running stage may read (its declared settings plus the
    infrastructure keys, see `conceptdistill.stages.registry`); `full_cfg` is the whole composed config, for
    the runner's own shared resources (data module, model loading, trainers, loggers).
    """

    def __init__(self, cfg: DictConfig) -> None:
        self.full_cfg = cfg
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir).resolve()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.summaries: dict[str, dict] = {}
        # Fingerprints depend on the config (fixed for the run) and on the model folder, which a `world` stage
        # replaces: they are memoised and forgotten whenever a stage finishes.
        self._fingerprints: dict[str, str] = {}

    # ----- folders and completion ---------------------------------------------------------------
    def stage_dir(self, stage: str) -> Path:
        path = self.run_dir / stage
        path.mkdir(parents=True, exist_ok=True)
        return path

    def done_record(self, stage: str) -> dict | None:
        path = self.run_dir / stage / "DONE.json"
        return read_json(path) if path.exists() else None

    def fingerprint(self, stage: str) -> str:
        """Hash of everything the stage's results depend on: its declared settings (less presentation keys),
        the model's weights if it reads them, and its inputs' fingerprints as the current config would make
        them (so a change upstream changes every fingerprint downstream, before anything reruns)."""
        if stage not in self._fingerprints:
            spec = stage_spec(stage)
            settings: dict[str, Any] = {"settings": result_settings(self.full_cfg, spec.settings)}
            if spec.uses_model:
                settings["model_weights"] = self.model_fingerprint()
            if spec.reads_data and not spec.always_run:
                settings["data_files"] = self.data_fingerprint
            settings["inputs"] = {name: self.fingerprint(name) for name in spec.inputs_for(self.full_cfg)}
            blob = json.dumps(settings, sort_keys=True, default=str)
            self._fingerprints[stage] = hashlib.sha256(blob.encode()).hexdigest()[:16]
        return self._fingerprints[stage]

    def model_fingerprint(self) -> str:
        from conceptdistill.diffusion.loading import model_fingerprint

        return model_fingerprint(self.diffusion_source(), revision=self.full_cfg.model.get("revision"))

    @cached_property
    def data_fingerprint(self) -> str | None:
        """Hash of the data set's files as listed (id, path, size, modification time of each image and mask),
        so that files replaced or added under a data root invalidate finished work; None for generated data."""
        records = self.datamodule.records
        if records("test") is None:  # generated data lists no files
            return None
        hasher = hashlib.sha256()
        for split in ("train", "val", "test"):
            for record in records(split):
                hasher.update(f"{split}\0{record.id}\0{record.boxes}\0{record.box_frame}".encode())
                for path in (record.image, record.mask):
                    stat = os.stat(path) if path is not None and os.path.exists(path) else None
                    hasher.update(f"\0{path}\0{stat and stat.st_size}\0{stat and stat.st_mtime_ns}".encode())
        return hasher.hexdigest()[:16]

    def is_complete(self, stage: str) -> bool:
        record = self.done_record(stage)
        return record is not None and record.get("fingerprint") == self.fingerprint(stage)

    def prepare_stage_dir(self, stage: str) -> Path:
        """Open a stage folder for (re)work. Partial work done with the same settings is kept (the stage
        resumes it); work done with other settings is moved aside, never deleted."""
        return open_output_folder(self.run_dir / stage, self.fingerprint(stage), f"stage {stage}")

    def require_inputs(self, stage: str) -> None:
        """Raise StageError unless every stage `stage` reads is complete for the current settings."""
        for name in stage_spec(stage).inputs_for(self.full_cfg):
            if not self.is_complete(name):
                problem = "has not run" if self.done_record(name) is None else "was made with other settings"
                raise StageError(
                    f"stage {stage} reads the outputs of stage {name}, which {problem} in {self.run_dir}: run it "
                    f"first, e.g. stages=[{name},{stage}]"
                )

    def view(self, stage: str) -> DictConfig:
        """The config as stage `stage` may read it: its declared settings and the infrastructure keys."""
        return config_view(self.full_cfg, (*INFRASTRUCTURE_KEYS, *stage_spec(stage).settings))

    # ----- shared resources ---------------------------------------------------------------------
    @cached_property
    def datamodule(self):
        from hydra.errors import InstantiationException
        from hydra.utils import instantiate

        from conceptdistill.data.readers import DatasetLayoutError

        try:
            return instantiate(self.full_cfg.data)
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

        return resolve_model_path(self.full_cfg.model)

    def load_parts(self, *, finetuned: bool = False):
        """The diffusion model's parts on the CPU (Lightning moves them to the device): float32 on the
        CPU, the configured dtype (e.g. float16) where the run uses a GPU; with `finetuned`, plus the weights
        written by this run's finetune stage."""
        import torch

        from conceptdistill.diffusion.loading import check_image_size, load_diffusion_parts

        cfg = self.full_cfg
        on_gpu = cfg.trainer.accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available()
        dtype = getattr(torch, str(cfg.model.dtype)) if on_gpu else torch.float32
        parts = load_diffusion_parts(
            self.diffusion_source(), revision=cfg.model.get("revision"), variant=cfg.model.get("variant"), dtype=dtype,
        )
        check_image_size(parts, cfg.data.image_size)  # before any image is processed
        if finetuned:
            from conceptdistill.stages.finetune import load_finetuned

            load_finetuned(parts, self.run_dir / "finetune" / "weights")
        return parts

    def logger(self, stage: str):
        """A fresh experiment logger for one stage job (or None), grouped by run folder."""
        spec = self.full_cfg.get("logger")
        if not spec or "_target_" not in spec:
            return None
        from hydra.utils import instantiate

        target = spec["_target_"]
        extra: dict[str, Any] = {}
        if target.endswith("WandbLogger"):
            extra = {"name": f"{self.full_cfg.experiment}-{stage}", "group": self.run_dir.name, "job_type": stage}
            os.environ.setdefault("WANDB_SILENT", "true")
        else:
            extra = {"name": stage, "version": ""}
        return instantiate(spec, **extra)

    def trainer(self, stage: str, **overrides):
        """A Lightning trainer with the configured hardware settings plus the stage's own budget."""
        import pytorch_lightning as pl

        from conceptdistill.utils.checkpoints import AtomicCheckpointIO

        kwargs = dict(OmegaConf.to_container(self.full_cfg.trainer, resolve=True))
        # Defaults only where the caller gave none: each creates something (a folder, a logger run).
        if "default_root_dir" not in overrides:
            kwargs.setdefault("default_root_dir", str(self.stage_dir(stage)))
        if "logger" not in overrides:
            kwargs.setdefault("logger", self.logger(stage) or False)
        kwargs.setdefault("enable_model_summary", False)
        kwargs.setdefault("plugins", [AtomicCheckpointIO()])
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


def open_output_folder(folder: Path, fingerprint: str, what: str) -> Path:
    """Open `folder` for outputs made under `fingerprint` (a hash of what makes them).

    Files made under the same fingerprint are kept (interrupted work resumes); a folder made under another
    fingerprint is moved aside to ``<name>.stale-<time>``, never deleted; a non-empty folder with no
    fingerprint record was not made by this tool and is refused.

    Raises:
        StageError: for a non-empty folder without a FINGERPRINT record.
    """
    marker = folder / "FINGERPRINT"
    if folder.exists() and any(folder.iterdir()):
        if not marker.exists():
            raise StageError(
                f"{what}: {folder} is not empty and was not written by this tool (no FINGERPRINT file); "
                "choose an empty or new folder"
            )
        if marker.read_text().strip() != fingerprint:
            stale = folder.with_name(f"{folder.name}.stale-{time.strftime('%Y%m%d-%H%M%S')}")
            log.warning("%s: its outputs were made from other inputs or settings: moving them to %s", what, stale)
            shutil.move(str(folder), str(stale))
    folder.mkdir(parents=True, exist_ok=True)
    marker.write_text(fingerprint + "\n")
    return folder


def _select(cfg: DictConfig, keys, transform=lambda value, key: value) -> dict:
    """The resolved values of the dotted `keys` of `cfg` that exist, nested as in `cfg`."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    selected: dict = {}
    for key in keys:
        value, found = _lookup(plain, key)
        if found:
            _assign(selected, key, transform(value, key))
    return selected


def config_view(cfg: DictConfig, keys) -> DictConfig:
    """A struct config holding only `keys` (dotted) of `cfg`, resolved; reading any other key raises."""
    result = OmegaConf.create(_select(cfg, keys))
    OmegaConf.set_struct(result, True)
    return result


def result_settings(cfg: DictConfig, keys) -> dict:
    """The values of `keys` that can change results (`keys` less PRESENTATION_KEYS, at any depth)."""
    return _select(cfg, keys, _without_presentation)


def _without_presentation(value: Any, prefix: str) -> Any:
    if prefix in PRESENTATION_KEYS:
        return None
    if isinstance(value, dict):
        return {k: _without_presentation(v, f"{prefix}.{k}") for k, v in value.items() if f"{prefix}.{k}" not in PRESENTATION_KEYS}
    return value


def _lookup(plain: dict, key: str) -> tuple[Any, bool]:
    node: Any = plain
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None, False
        node = node[part]
    return node, True


def _assign(target: dict, key: str, value: Any) -> None:
    *parents, last = key.split(".")
    for part in parents:
        target = target.setdefault(part, {})
    target[last] = value


def run(cfg: DictConfig) -> dict[str, dict]:
    """Run `cfg.stages` in order; returns each stage's summary.

    Settings are checked first (`check_settings`), then whether the data set is there, both before any
    model is loaded. A stage complete for the current settings is skipped; a stage whose inputs are missing
    or stale is refused (StageError).
    """
    _configure_torch()
    cfg = check_settings(cfg)
    ctx = RunContext(cfg)
    specs = [stage_spec(stage) for stage in cfg.stages]
    to_run = [spec.name for spec in specs if spec.always_run or not ctx.is_complete(spec.name)]
    if any(stage_spec(name).reads_data for name in to_run):
        ctx.datamodule  # noqa: B018 - a missing or malformed data set fails here, before any model is loaded
    check_hardware(cfg, to_run)
    for spec in specs:
        stage = spec.name
        if not spec.always_run and ctx.is_complete(stage):
            log.info("stage %s: complete, skipped", stage)
            ctx.summaries[stage] = ctx.done_record(stage)["summary"]
            continue
        ctx.require_inputs(stage)
        log.info("stage %s: running in %s", stage, ctx.run_dir / stage)
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
        seconds = time.perf_counter() - started
        ctx._fingerprints.clear()  # e.g. `world` has just replaced the model that later stages read
        if not spec.always_run:  # an always-run stage is never skipped, and may write outside the run folder
            write_json(
                ctx.stage_dir(stage) / "DONE.json",
                {"fingerprint": fingerprint, "seconds": round(seconds, 2), "summary": summary},
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
