"""The run folder's layout: every path rule of a run, in one place.

A run folder holds one subfolder per stage; a stage is complete when its folder holds `DONE.json`::

    <run>/masks/<split>/{attention,mask,skipped}/<id>.*    per-image outputs (see pipeline/artifacts.py)
    <run>/finetune/{checkpoints,samples,weights}/, loss.json
    <run>/inpaint/<split>/{background,mask,skipped}/<id>.*
    <run>/synthesize/samples/{image,prelim_mask,background,mask,foreground}/<id>.png
    <run>/segment/<source>/{last,final}.ckpt                one folder per mask source ('+' -> '_')
    <run>/export/<source>/segmenter.{pt,onnx}, export.json  the segmenter as TorchScript and ONNX
    <run>/world/{build,checkpoints,pipeline}/               the shapes world's trained diffusion model
    <run>/report/results.{json,md}, *.png

Stages and the evaluation find each other's outputs through this class, never through each other.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from conceptdistill.pipeline.artifacts import ArtifactStore, Kind
from conceptdistill.pipeline.registry import StageError

log = logging.getLogger(__name__)

#: what each per-image store holds: output name -> kind of file
MASK_OUTPUTS: dict[str, Kind] = {"attention": "array", "mask": "mask"}
INPAINT_OUTPUTS: dict[str, Kind] = {"background": "image", "mask": "mask"}
SYNTHETIC_OUTPUTS: dict[str, Kind] = {
    "image": "image", "prelim_mask": "mask", "background": "image", "mask": "mask", "foreground": "image",
}


class RunLayout:
    """Paths inside one run folder `root` (created on demand by the stage that writes them)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def stage_dir(self, stage: str) -> Path:
        return self.root / stage

    def done_file(self, stage: str) -> Path:
        return self.stage_dir(stage) / "DONE.json"

    def checkpoints(self, stage: str) -> Path:
        """Lightning checkpoints of a training stage (`last.ckpt` is what a rerun resumes from)."""
        return self.stage_dir(stage) / "checkpoints"

    # ----- per-image stores ------------------------------------------------------------------------
    def mask_store(self, split: str) -> ArtifactStore:
        """Stage masks: the attention map A (float16 .npy, latent grid) and M_pre (PNG) of each image."""
        return ArtifactStore(self.stage_dir("masks") / split, MASK_OUTPUTS)

    def inpaint_store(self, split: str) -> ArtifactStore:
        """Stage inpaint: the background B and the refined mask M of each image (PNGs, image size)."""
        return ArtifactStore(self.stage_dir("inpaint") / split, INPAINT_OUTPUTS)

    def synthetic_store(self) -> ArtifactStore:
        """Stage synthesize: the synthetic set D'_s, five PNGs per sample."""
        return ArtifactStore(self.stage_dir("synthesize") / "samples", SYNTHETIC_OUTPUTS)

    # ----- models -----------------------------------------------------------------------------------
    def finetuned_weights(self) -> Path:
        """Stage finetune's exported weights (diffusion/adapters.py says what the folder holds)."""
        return self.stage_dir("finetune") / "weights"

    def segmenter_dir(self, source: str) -> Path:
        """Stage segment's folder for one mask source, e.g. `refined+synthetic` -> segment/refined_synthetic."""
        return self.stage_dir("segment") / source.replace("+", "_")

    def segmenter_checkpoint(self, source: str) -> Path:
        """The trained segmenter of one mask source (written once its training has finished)."""
        return self.segmenter_dir(source) / "final.ckpt"

    def export_dir(self, source: str) -> Path:
        """Stage export's folder for one mask source's segmenter ('+' -> '_', as `segmenter_dir`)."""
        return self.stage_dir("export") / source.replace("+", "_")

    def world_model(self) -> Path:
        """The diffusers-layout folder of the shapes world model a `world` stage trained in this run."""
        return self.stage_dir("world") / "pipeline"


def move_aside(folder: Path, why: str) -> Path:
    """Rename `folder` to ``<name>.stale-<time>`` (never delete work), logging `why`; returns the new path."""
    stale = folder.with_name(f"{folder.name}.stale-{time.strftime('%Y%m%d-%H%M%S')}")
    suffix = 1
    while stale.exists():  # two retirements within one second
        stale, suffix = folder.with_name(f"{folder.name}.stale-{time.strftime('%Y%m%d-%H%M%S')}-{suffix}"), suffix + 1
    log.warning("%s: moving %s to %s", why, folder, stale)
    shutil.move(str(folder), str(stale))
    return stale


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
            move_aside(folder, f"{what}: its outputs were made from other inputs or settings")
    folder.mkdir(parents=True, exist_ok=True)
    marker.write_text(fingerprint + "\n")
    return folder
