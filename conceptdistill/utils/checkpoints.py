"""Lightning checkpoints written atomically."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import NamedTuple

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import Callback


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, through a temp file and a rename: a run killed while saving leaves the
    previous last.ckpt intact, never a truncated file that the resumed run cannot read."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.partial")
        super().save_checkpoint(checkpoint, partial, storage_options)
        os.replace(partial, path)


def resumable_checkpoints(folder, every_n_steps: int):
    """Lightning's ModelCheckpoint keeping only `folder/last.ckpt`, rewritten every `every_n_steps` steps: what a
    killed run resumes from. (The default also keeps an `epoch=..-step=..ckpt` copy of the same weights, which
    doubles the disk a fine-tuning run takes: its checkpoints hold the whole model.)"""
    from pytorch_lightning.callbacks import ModelCheckpoint

    return ModelCheckpoint(dirpath=folder, save_last=True, save_top_k=0, every_n_train_steps=every_n_steps)


def drop_resume_checkpoint(last) -> None:
    """Remove a training stage's resume checkpoint once the stage's result is written: it holds the weights and
    the optimizer's moments (three copies of every trained parameter), which a finished stage never reads again.
    Its folder goes too when nothing else is left in it. Every process of a multi-GPU run may call this."""
    last = Path(last)
    last.unlink(missing_ok=True)
    try:
        last.parent.rmdir()
    except OSError:  # not empty (the segmenter's folder holds its result) or already gone
        pass


#: the summary key under which a resumed training stage reports the seconds its killed runs trained; the
#: runner adds them to the stage's own seconds (DONE.json)
SECONDS_BEFORE_RESUME = "seconds_before_resume"


def resumed_seconds(seconds: float) -> dict:
    """{SECONDS_BEFORE_RESUME: seconds} for a stage summary when earlier runs trained (`seconds` > 0), else {}."""
    return {SECONDS_BEFORE_RESUME: round(seconds, 2)} if seconds else {}


class TrainingClock(Callback):
    """Seconds of training across the runs of one training: the resume checkpoint keeps the seconds trained
    before it was written, so that a resumed stage reports its whole training time (`earlier` after `fit`
    starts: the seconds of the killed runs up to their last checkpoint; 0.0 when not resumed)."""

    def __init__(self) -> None:
        self.earlier, self._started = 0.0, None

    def on_train_start(self, trainer, pl_module) -> None:
        self._started = time.perf_counter()

    def total(self) -> float:
        """Seconds trained so far, the killed runs' included."""
        return self.earlier + (time.perf_counter() - self._started if self._started is not None else 0.0)

    def state_dict(self) -> dict:
        return {"seconds": self.total()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.earlier = float(state_dict["seconds"])

    def summary(self) -> dict:
        """`resumed_seconds` of this training, for its stage's summary."""
        return resumed_seconds(self.earlier)


class Resume(NamedTuple):
    """Where a training stage starts: `ckpt_path` for `Trainer.fit` (None: from scratch) and its global step
    (0 from scratch), which the step-indexed data stream (data/stream.py) starts from."""

    ckpt_path: str | None
    step: int


def checkpoint_step(path) -> int:
    """The global step stored in a Lightning checkpoint (0 when `path` is None or missing). Memory-mapped: the
    weights are not read."""
    if path is None or not Path(path).exists():
        return 0
    state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    return int(state.get("global_step", 0))


def resume_checkpoint(last, what: str) -> Resume:
    """Resume from `last` when a killed run left it (the log says from which step), else start from scratch.
    `what` names the training in that line, e.g. "segment-refined"."""
    last = Path(last)
    if not last.exists():
        return Resume(None, 0)
    step = checkpoint_step(last)
    logging.getLogger(__name__).info("%s: resuming from step %d (%s)", what, step, last)
    return Resume(str(last), step)
