"""Stage "predict": segment a folder of new images with a trained segmentation model.

Masks are written as PNGs at each image's own resolution, named by the image's sample id: its path under the
input folder without its extension, with '/' replaced by '__' and every other character outside
[A-Za-z0-9._+-] by '_' (`a/b.jpg` -> `a__b.png`, `c d.jpg` -> `c_d.png`). Two images with one id stop the
stage before any model work. Every entry of the input folder is kept or skipped and counted (unreadable
images, non-image files, broken links ...), as the data readers do. The readers load each image as displayed
(EXIF orientation applied); `conceptdistill.data.images.image_size(path)` gives that (height, width), the
size a mask must be written at to lie on its image.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image

from conceptdistill.maskmath import upsample_mask
from conceptdistill.stages.artifacts import ArtifactStore, SampleWriter, pending

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


def checkpoint_path(ctx) -> Path:
    pr = ctx.cfg.predict
    if pr.checkpoint:
        return Path(pr.checkpoint).expanduser()
    return ctx.run_dir / "segment" / str(pr.source).replace("+", "_") / "final.ckpt"


def run_predict(ctx) -> dict:
    from conceptdistill.data.readers import ImageFolderDataModule
    from conceptdistill.stages.segment import SegmentationModel

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
    images = ImageFolderDataModule(root=pr.input_dir, image_size=ctx.cfg.segment.image_size, batch_size=pr.batch_size,
                                   num_workers=0)
    dataset = images.dataset("train")
    sizes = {record.id: Image.open(record.image).size[::-1] for record in dataset.records}
    output = Path(pr.output_dir).expanduser() if pr.output_dir else ctx.stage_dir("predict")
    store = ArtifactStore(output, {"mask": "mask"})
    todo = pending(dataset, store)
    if len(todo):
        trainer = ctx.trainer("predict", callbacks=[OriginalSizeMaskWriter(store, sizes)], logger=False)
        trainer.predict(model, images.loader(todo, batch_size=pr.batch_size), return_predictions=False)
    log.info("predicted %d masks into %s", len(store.ids("mask")), output / "mask")
    return {"images": len(store.ids("mask")), "skipped": dataset.skipped, "output": str(output / "mask"),
            "checkpoint": str(checkpoint)}
