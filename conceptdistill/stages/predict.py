"""Stage "predict": segment a folder of new images with a trained segmentation model.

Masks are written as PNGs at each image's own resolution, named by the image's sample id: its path under the
input folder without its extension, with '/' replaced by '__' and every other character outside
[A-Za-z0-9._+-] by '_' (`a/b.jpg` -> `a__b.png`, `c d.jpg` -> `c_d.png`). Two images with one id stop the
stage before any model work. Every entry of the input folder is kept or skipped and counted (unreadable
images, non-image files, broken links ...), as the data readers do. The readers load each image as displayed
(EXIF orientation applied); `conceptdistill.data.decoding.image_size(path)` gives that (height, width), the
size a mask must be written at to lie on its image.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np

from conceptdistill.data.datasets.image_folder import ImageFolderDataModule
from conceptdistill.data.decoding import image_size
from conceptdistill.maskmath import upsample_mask
from conceptdistill.modules.segmenter import SegmentationModel
from conceptdistill.pipeline.artifacts import ArtifactStore, SampleWriter, pending
from conceptdistill.pipeline.config import result_settings
from conceptdistill.pipeline.context import RunContext
from conceptdistill.pipeline.layout import open_output_folder
from conceptdistill.pipeline.registry import StageError, register_stage
from conceptdistill.utils.digests import file_state

log = logging.getLogger(__name__)


class OriginalSizeMaskWriter(SampleWriter):
    """Writes each predicted mask resized (nearest) back to its image's original size."""

    def __init__(self, store: ArtifactStore, sizes: dict[str, tuple[int, int]]) -> None:
        super().__init__(store)
        self.sizes = sizes

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        for sample in prediction:
            mask = upsample_mask(np.asarray(sample["mask"]), self.sizes[sample["id"]])
            self.store.save(sample["id"], "mask", mask)


def prediction_fingerprint(ctx: RunContext, checkpoint: Path, records, image_size: int) -> str:
    """Hash of what makes a folder of predicted masks: the checkpoint's content, the settings, and each input
    image's path and `file_state` (size, modification and status-change times)."""
    digest = hashlib.sha256()
    with open(checkpoint, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    digest.update(json.dumps([result_settings(ctx.cfg, ("predict",)), image_size], sort_keys=True).encode())
    for record in records:
        digest.update(f"{record.id}\0{Path(record.image).resolve()}\0{file_state(record.image)}\n".encode())
    return digest.hexdigest()[:16]


def checkpoint_path(ctx: RunContext) -> Path:
    pr = ctx.cfg.predict
    if pr.checkpoint:
        return Path(pr.checkpoint).expanduser()
    return ctx.layout.segmenter_checkpoint(str(pr.source))


@register_stage("predict", settings=("predict", "segment.image_size"), always_run=True, reads_data=False)
def run_predict(ctx: RunContext) -> dict:
    pr = ctx.cfg.predict
    if not pr.input_dir:
        raise ValueError("stage predict needs predict.input_dir=/folder/of/images")
    checkpoint = checkpoint_path(ctx)
    if not checkpoint.exists():
        raise FileNotFoundError(
            f"no segmentation checkpoint at {checkpoint}: run the segment stage in this run folder first "
            f"(stages=[segment] with hydra.run.dir=<run>), or give predict.checkpoint=/path/to/final.ckpt"
        )
    model = SegmentationModel.load_from_checkpoint(checkpoint, map_location="cpu")
    # The size the segmenter was trained at, as its checkpoint records it: this command's segment.image_size is
    # only the config's default, not necessarily the run's (older checkpoints do not record it).
    trained_size = model.hparams.get("image_size") or ctx.cfg.segment.image_size
    images = ImageFolderDataModule(root=pr.input_dir, image_size=int(trained_size), batch_size=pr.batch_size,
                                   num_workers=0)
    dataset = images.dataset("train")
    sizes = {record.id: image_size(record.image) for record in dataset.records}  # as displayed (EXIF applied)
    output = Path(pr.output_dir).expanduser() if pr.output_dir else ctx.run_dir / "predict"
    source_dir = Path(pr.input_dir).expanduser().resolve()
    if output.resolve() == source_dir or source_dir in output.resolve().parents:
        raise StageError(f"predict.output_dir={output} lies inside predict.input_dir={pr.input_dir}: its masks would be "
                         "read as new images by the next run; choose a folder outside the input folder")
    # Masks made from other images, another checkpoint or other settings are never reused: the folder
    # records what made it and is moved aside when that changes.
    open_output_folder(output, prediction_fingerprint(ctx, checkpoint, dataset.records, int(trained_size)), "stage predict")
    store = ArtifactStore(output, {"mask": "mask"})
    todo = pending(dataset, store)
    if len(todo):
        trainer = ctx.trainer("predict", callbacks=[OriginalSizeMaskWriter(store, sizes)], logger=False,
                              default_root_dir=str(output))
        trainer.predict(model, images.loader(todo, batch_size=pr.batch_size), return_predictions=False)
    log.info("predicted %d masks into %s", len(store.ids("mask")), output / "mask")
    return {"images": len(store.ids("mask")), "skipped": dataset.skipped, "output": str(output / "mask"),
            "checkpoint": str(checkpoint)}
