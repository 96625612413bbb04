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
