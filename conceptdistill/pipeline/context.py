"""What a running stage is given: `RunContext` (config view, run folder layout, data, model, trainers,
loggers) and the fingerprints that decide whether a stage's outputs are current.

A stage's fingerprint hashes its declared settings (less presentation keys), the diffusion model's content if
it reads it, the data set's file listing, and its inputs' fingerprints (pipeline/registry.py), so a change
anywhere upstream changes every fingerprint downstream before anything reruns.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shlex
import sys
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from conceptdistill.pipeline.config import config_view, result_settings
from conceptdistill.pipeline.layout import RunLayout, move_aside, open_output_folder
from conceptdistill.pipeline.registry import INFRASTRUCTURE_KEYS, StageError, known_stages, stage_spec
from conceptdistill.utils.io import read_json

if TYPE_CHECKING:
    import pytorch_lightning as pl

    from conceptdistill.data.base import ConceptDataModule
    from conceptdistill.diffusion.parts import DiffusionParts

__all__ = ["RunContext", "command_line", "finish_loggers"]

log = logging.getLogger(__name__)


class RunContext:
    """What a stage needs: the config, the run folder, the data, trainers and loggers.

    `cfg` is the view of the configuration the running stage may read (its declared settings plus the
    infrastructure keys, see pipeline/registry.py); `full_cfg` is the whole composed config, for
    the runner's own shared resources (data module, model loading, trainers, loggers).
    """

    def __init__(self, cfg: DictConfig) -> None:
        self.full_cfg = cfg
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir).resolve()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.layout = RunLayout(self.run_dir)
        self.summaries: dict[str, dict] = {}
        # Fingerprints depend on the config (fixed for the run) and on the model folder, which a `world` stage
        # replaces: they are memoised and forgotten whenever a stage finishes.
        self._fingerprints: dict[str, str] = {}
        self._checked_parts: DiffusionParts | None = None  # loaded by check_model_settings, handed to one stage

    # ----- folders and completion ---------------------------------------------------------------
    def stage_dir(self, stage: str) -> Path:
        """The stage's folder in the run, created if missing."""
        path = self.layout.stage_dir(stage)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def done_record(self, stage: str) -> dict | None:
        """The stage's DONE.json (fingerprint, seconds, summary), or None if it has not finished."""
        path = self.layout.done_file(stage)
        return read_json(path) if path.exists() else None

    def fingerprint(self, stage: str) -> str:
        """Hash of everything the stage's results depend on: its declared settings (less presentation keys),
        the model's weights if it reads them, and its inputs' fingerprints as the current config would make
        them (so a change upstream changes every fingerprint downstream, before anything reruns)."""
        if stage not in self._fingerprints:
            spec = stage_spec(stage)
            settings: dict[str, Any] = {"settings": result_settings(self.full_cfg, spec.settings_for(self.full_cfg))}
            if spec.uses_model:
                settings["model_weights"] = self.model_fingerprint()
            if spec.reads_data and not spec.always_run:
                settings["data_files"] = self.data_fingerprint
            settings["inputs"] = {name: self.fingerprint(name) for name in spec.inputs_for(self.full_cfg)}
            blob = json.dumps(settings, sort_keys=True, default=str)
            self._fingerprints[stage] = hashlib.sha256(blob.encode()).hexdigest()[:16]
        return self._fingerprints[stage]

    def forget_fingerprints(self) -> None:
        """Called after each stage: a stage may have changed what fingerprints hash (the model folder)."""
        self._fingerprints.clear()
        self._checked_parts = None  # and the model itself (stage world)

    def model_fingerprint(self) -> str:
        from conceptdistill.diffusion.fingerprint import model_fingerprint

        return model_fingerprint(self.diffusion_source(), revision=self.full_cfg.diffusion.get("revision"))

    @cached_property
    def data_fingerprint(self) -> str | None:
        """Hash of the data set's files as listed (id, path, and `utils.digests.file_state` of each image and
        mask: size, modification and status-change times), so that files replaced or added under a data root
        invalidate finished work; None for generated data."""
        from conceptdistill.utils.digests import file_state

        records = self.datamodule.records
        if records("test") is None:  # generated data lists no files
            return None
        hasher = hashlib.sha256()
        for split in ("train", "val", "test"):
            for record in records(split):
                hasher.update(f"{split}\0{record.id}\0{record.boxes}\0{record.box_frame}".encode())
                for path in (record.image, record.mask):
                    state = file_state(path) if path is not None and os.path.exists(path) else None
                    hasher.update(f"\0{path}\0{state}".encode())
        return hasher.hexdigest()[:16]

    def is_complete(self, stage: str) -> bool:
        record = self.done_record(stage)
        return record is not None and record.get("fingerprint") == self.fingerprint(stage)

    def retire_stale_stages(self) -> list[str]:
        """Move aside every finished stage whose recorded inputs (DONE.json "inputs") are no longer the outputs
        on disk: a stage rerun with other settings leaves nothing downstream of it that looks finished, so no
        file a person or a later command picks up (weights, segmenters, exports) belongs to older inputs.
        Returns the stages moved aside."""
        retired: list[str] = []
        changed = True
        while changed:
            changed = False
            for stage in known_stages():
                record = self.done_record(stage)
                for name, fingerprint in ((record or {}).get("inputs") or {}).items():
                    current = self.done_record(name)
                    if current is None or current.get("fingerprint") != fingerprint:
                        move_aside(self.layout.stage_dir(stage), f"stage {stage} was made from outputs of stage "
                                   f"{name} that have been replaced since")
                        retired.append(stage)
                        changed = True
                        break
        return retired

    def prepare_stage_dir(self, stage: str) -> Path:
        """Open a stage folder for (re)work. Partial work done with the same settings is kept (the stage
        resumes it); work done with other settings is moved aside, never deleted."""
        return open_output_folder(self.layout.stage_dir(stage), self.fingerprint(stage), f"stage {stage}")

    def require_inputs(self, stage: str) -> None:
        """Raise StageError unless every stage `stage` reads is complete for the current settings."""
        for name in stage_spec(stage).inputs_for(self.full_cfg):
            if not self.is_complete(name):
                record = self.done_record(name)
                if record is None:
                    advice = f"run it first, e.g. stages=[{name},{stage}]"
                else:  # most often: the command lacks the overrides that made the run
                    advice = (f"repeat the settings that made it (its command: {record.get('command', 'unknown')}), "
                              f"with stages=[{stage}]; or run it anew with these settings, stages=[{name},{stage}]")
                problem = "has not run" if record is None else "was made with other settings"
                raise StageError(f"stage {stage} reads the outputs of stage {name}, which {problem} in {self.run_dir}: "
                                 f"{advice}")

    def view(self, stage: str) -> DictConfig:
        """The config as stage `stage` may read it: its declared settings and the infrastructure keys."""
        return config_view(self.full_cfg, (*INFRASTRUCTURE_KEYS, *stage_spec(stage).settings_for(self.full_cfg)))

    # ----- shared resources ---------------------------------------------------------------------
    @cached_property
    def datamodule(self) -> ConceptDataModule:
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
            if isinstance(err.__cause__, ValueError):  # the data module refused a setting (e.g. a concept word)
                from conceptdistill.checks import SettingsError

                raise SettingsError(f"data: {err.__cause__}") from err.__cause__
            raise

    def diffusion_source(self) -> str:
        """The diffusion model to use: the one this run's `world` stage trained, else `diffusion.path`."""
        trained = self.layout.world_model()
        if (trained / "model_index.json").exists():
            return str(trained)
        from conceptdistill.diffusion.registry import resolve_model_path

        return resolve_model_path(self.full_cfg.diffusion)

    def diffusion_options(self) -> dict:
        """`diffusion.options`: the model family's settings (max_sequence_length, guidance, ...), a plain dict."""
        options = self.full_cfg.diffusion.get("options")
        return {} if options is None else dict(OmegaConf.to_container(options, resolve=True))

    def load_parts(self, *, finetuned: bool = False) -> DiffusionParts:
        """The diffusion model's parts on the CPU (Lightning moves them to the device): float32 on the
        CPU, the configured dtype (e.g. float16) where the run uses a GPU; with `finetuned`, plus the weights
        written by this run's finetune stage."""
        import torch

        from conceptdistill.diffusion.loading import load_diffusion_parts
        from conceptdistill.diffusion.parts import check_image_size

        cfg = self.full_cfg
        if self._checked_parts is not None:  # the untouched model check_model_settings loaded: not loaded twice
            parts, self._checked_parts = self._checked_parts, None
        else:
            on_gpu = cfg.trainer.accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available()
            dtype = getattr(torch, str(cfg.diffusion.dtype)) if on_gpu else torch.float32
            parts = load_diffusion_parts(
                self.diffusion_source(), revision=cfg.diffusion.get("revision"), variant=cfg.diffusion.get("variant"),
                dtype=dtype, settings=self.diffusion_options(),
            )
            check_image_size(parts, cfg.data.image_size)  # before any image is processed
        if finetuned:
            from conceptdistill.diffusion.adapters import load_finetuned

            load_finetuned(parts, self.layout.finetuned_weights())
        return parts

    def check_model_settings(self) -> None:
        """The settings only the model can check, before any stage moves or writes anything: the image size its
        VAE takes, the concept words as whole words of the foreground prompt in its tokenizer, and the attention
        space stage 1 reads (ConceptAttention needs an MMDiT).

        Raises:
            SettingsError: naming `data.image_size`, `masks.module.attention_space`, the concept word that is not
                a whole word of the prompt, a diffusion config of another family than the folder's, or an adapter
                the denoiser cannot take.
        """
        from conceptdistill.checks import SettingsError

        cfg = self.full_cfg
        parts = self.load_parts()
        configured = cfg.diffusion.get("family")
        if configured and configured != parts.family:
            suggestion = {"sd": "sd15", "sdxl": "sdxl", "sd3": "sd3", "flux": "flux"}.get(parts.family, parts.family)
            raise SettingsError(
                f"diffusion={cfg.diffusion.name} configures a {configured} model, but {self.diffusion_source()} holds a "
                f"{parts.family} model ({parts.pipeline_class}): its precision, resolution and options would be "
                f"wrong; use diffusion={suggestion} with this folder"
            )
        space = OmegaConf.select(cfg, "masks.module.attention_space")
        if space is not None and {"masks", "synthesize"} & set(cfg.get("stages") or []):
            try:
                parts.check_attention_space(str(space))
            except ValueError as err:
                raise SettingsError(str(err)) from err
        try:
            parts.concept_token_indices(cfg.prompts.foreground, list(cfg.concept))
        except ValueError as err:
            raise SettingsError(f"concept={list(cfg.concept)} with prompts.foreground={cfg.prompts.foreground!r}: {err}") from err
        stages = list(cfg.stages)
        adapter = cfg.finetune.module.get("adapter") if "finetune" in cfg else None
        if "finetune" in stages and adapter == "inpaint9" and not hasattr(parts.denoiser, "conv_in"):
            raise SettingsError(f"finetune.module.adapter=inpaint9 (finetune=inpaint9) widens a UNet's input; this "
                                f"{parts.family} model's denoiser is a {type(parts.denoiser).__name__}: use "
                                "finetune=lora or finetune=full")
        size, native = int(cfg.data.image_size), parts.native_image_size
        if size >= 2 * native or 2 * size <= native:
            log.warning("data.image_size=%d but this model's native size is %d px (its denoiser's sample size times the "
                        "VAE factor): set diffusion.resolution=%d if the model folder is not the one the diffusion "
                        "config describes", size, native, native)
        self._checked_parts = parts  # the first stage that loads the model gets these

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

    def trainer(self, stage: str, **overrides) -> pl.Trainer:
        """The configured trainer (config `trainer`: hardware, precision, any Trainer argument) with the stage's
        own budget and callbacks (`overrides`, which win)."""
        from hydra.utils import instantiate

        from conceptdistill.utils.checkpoints import AtomicCheckpointIO

        configured = self.full_cfg.trainer
        kwargs: dict[str, Any] = {"enable_model_summary": False, "plugins": [AtomicCheckpointIO()]}
        # Defaults only where neither the config nor the caller gave one: each creates something (a folder,
        # a logger run).
        if "default_root_dir" not in overrides and "default_root_dir" not in configured:
            kwargs["default_root_dir"] = str(self.stage_dir(stage))
        if "logger" not in overrides and "logger" not in configured:
            kwargs["logger"] = self.logger(stage) or False
        if self.full_cfg.get("quiet"):
            kwargs["enable_progress_bar"] = False
        kwargs = {key: value for key, value in kwargs.items() if key not in configured}
        shown = overrides.get("enable_progress_bar", kwargs.get("enable_progress_bar", configured.get("enable_progress_bar", True)))
        if "max_steps" in overrides and shown:  # a step budget: the bar counts steps against it
            from conceptdistill.utils.console import step_progress_bar

            overrides["callbacks"] = [*overrides.get("callbacks", []), step_progress_bar(stage)]
        if "max_steps" in overrides and "log_every_n_steps" in overrides:
            # a logging interval longer than the run logs nothing (and Lightning warns about it)
            overrides["log_every_n_steps"] = max(1, min(overrides["log_every_n_steps"], overrides["max_steps"]))
        return instantiate(configured, **kwargs, **overrides)


def command_line() -> str:
    """How this run was started, for the records it writes (results.json, DONE.json, a world model's
    training.json): shell-quoted, so that it can be pasted back (`'prompts.foreground="a photo of a cat"'`)."""
    return shlex.join(["python", "-m", "conceptdistill", *sys.argv[1:]])


def finish_loggers() -> None:
    """Close a wandb run so that the next stage (or multirun job) starts its own."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()
