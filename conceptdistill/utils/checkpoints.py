"""Lightning checkpoints written atomically."""

from __future__ import annotations

import os
from pathlib import Path

from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, through a temp file and a rename: a run killed while saving leaves the
    previous last.ckpt intact, never a truncated file that the resumed run cannot read."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.partial")
        super().save_checkpoint(checkpoint, partial, storage_options)
        os.replace(partial, path)
