"""What a run prints: dependencies' known-harmless messages filtered at their source, and quiet mode.

Only messages known to be harmless for this project's use are dropped, each with the reason; every other
warning and log line of the dependencies still shows.
"""

from __future__ import annotations

import logging
import re
import warnings

#: (logger name, message pattern, why it is harmless here)
HARMLESS_LOG_MESSAGES = (
    ("pytorch_lightning.utilities.rank_zero", r"💡 Tip", "advertising for optional cloud packages"),
    ("pytorch_lightning.utilities.rank_zero", r"^(GPU|TPU|HPU) available", "the trainer config says which device"),
    ("pytorch_lightning.utilities.rank_zero", r"^`Trainer.fit` stopped: `max_steps=\d+` reached",
     "the stage's own budget: the stage reports its steps"),
    ("pytorch_lightning.trainer.connectors.checkpoint_connector", r"^`weights_only` was not set",
     "our own checkpoints, written by this run"),
    ("lightning_fabric.utilities.seed", r"^Seed set to", "the run seed is in the config and the results"),
)
#: (warning message pattern, why it is harmless here)
HARMLESS_WARNINGS = (
    (r".*isinstance\(treespec, LeafSpec\)", "a deprecation inside Lightning itself, not in this project's code"),
    (r".*module\(s\) in eval mode at the start of training",
     "the frozen VAE and text encoder are in eval mode on purpose (dropout and norm statistics stay fixed)"),
    (r".*callbacks used to create the checkpoint need to be provided",
     "resumed runs pass the same callbacks; Lightning cannot see that they are the same"),
)


class _DropHarmless(logging.Filter):
    def __init__(self, patterns: list[str]) -> None:
        super().__init__()
        self.patterns = [re.compile(pattern) for pattern in patterns]

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(pattern.search(message) for pattern in self.patterns)


def quiet_dependencies() -> None:
    """Drop the known-harmless messages above (idempotent), and the weight-loading progress bars of
    transformers and diffusers (a model loads in seconds; the stage's own bar shows the work)."""
    by_logger: dict[str, list[str]] = {}
    for name, pattern, _why in HARMLESS_LOG_MESSAGES:
        by_logger.setdefault(name, []).append(pattern)
    for name, patterns in by_logger.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropHarmless) for f in logger.filters):
            logger.addFilter(_DropHarmless(patterns))
    for pattern, _why in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    import diffusers.utils.logging
    import transformers.utils.logging

    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.disable_progress_bar()


def set_quiet(quiet: bool) -> None:
    """Quiet: only warnings and errors are logged (the results table is still printed)."""
    if quiet:
        # Lightning sets its own loggers to INFO, so the root level alone would not quiet them.
        for name in ("", "pytorch_lightning", "lightning_fabric"):
            logging.getLogger(name).setLevel(logging.WARNING)


def step_progress_bar(description: str):
    """Lightning's own progress bar (Rich where it is installed, else tqdm) for a training stage with a step
    budget (`max_steps` on an endless stream, `max_epochs=-1`), labelled `description` and counting batches
    against the batches `max_steps` takes (max_steps x trainer.accumulate_grad_batches), from where a resumed
    run starts. Lightning's bar labels such training "Epoch 0/-2" (Rich) and, after a resume, counts on from the
    restored step against the steps left ("200/194")."""
    from pytorch_lightning.callbacks.progress.rich_progress import _RICH_AVAILABLE, RichProgressBar
    from pytorch_lightning.callbacks.progress.tqdm_progress import TQDMProgressBar

    base = RichProgressBar if _RICH_AVAILABLE else TQDMProgressBar

    class StepProgressBar(base):
        @property
        def total_train_batches(self):
            trainer = self.trainer
            if trainer.max_epochs == -1 and trainer.max_steps is not None and trainer.max_steps > 0:
                return trainer.max_steps * trainer.accumulate_grad_batches
            return super().total_train_batches

        @property
        def train_description(self) -> str:  # the label a bar starts with
            return description

        def _get_train_description(self, current_epoch: int) -> str:  # Rich's label of each epoch's bar
            return description

        def init_train_tqdm(self):  # a resumed epoch does not pass through on_train_epoch_start
            bar = super().init_train_tqdm()
            bar.total = self.total_train_batches
            # a resumed run starts at its restored step; its speed counts only the batches it runs itself
            bar.n = bar.initial = bar.last_print_n = self.trainer.global_step * self.trainer.accumulate_grad_batches
            bar.refresh()
            return bar

        def on_train_epoch_start(self, trainer, module) -> None:
            super().on_train_epoch_start(trainer, module)
            if isinstance(self, TQDMProgressBar):  # tqdm's label, reset by the line above
                self.train_progress_bar.set_description(description)

    return StepProgressBar()
