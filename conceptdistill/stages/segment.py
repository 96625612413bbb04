"""Stage "segment": train a segmentation U-Net on label-free masks and score it (docs/METHOD.md, stage 4).

One model per mask source, each trained for the same fixed budget with no tuning, as the paper does:
`preliminary` (D, M_pre), `refined` (D, M), `refined+synthetic` (D, M) u D'_s, and `truth` (the supervised
upper bound, where the data set has masks). Each is scored on the test split with pixels pooled over the
split (accuracy, foreground IoU, mIoU at threshold 0.5) and the per-image mean IoU beside them.
"""

from __future__ import annotations

import logging

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import ConcatDataset, Dataset

from conceptdistill.metrics import SegmentationScores
from conceptdistill.stages.registry import TRAINING_HARDWARE, register_stage
from conceptdistill.utils.seeding import sample_seed

log = logging.getLogger(__name__)

SOURCES = ("preliminary", "refined", "refined+synthetic", "truth")
#: each source's row in the results table
ROW_NAMES = {"preliminary": "unet_preliminary", "refined": "unet_refined",
             "refined+synthetic": "unet_refined_synthetic", "truth": "unet_truth"}


class SegmentationModel(pl.LightningModule):
    """A smp model (one factory call) trained with BCE and Adam, scored with pooled metrics."""

    def __init__(self, *, arch: str = "unet", encoder_name: str = "resnet18", encoder_weights: str | None = None,
                 encoder_depth: int = 5, decoder_channels: tuple[int, ...] = (256, 128, 64, 32, 16),
                 learning_rate: float = 2e-3, threshold: float = 0.5) -> None:
        super().__init__()
        self.save_hyperparameters()
        import segmentation_models_pytorch as smp

        self.net = smp.create_model(arch, encoder_name=encoder_name, encoder_weights=encoder_weights,
                                    encoder_depth=encoder_depth, decoder_channels=tuple(decoder_channels), classes=1)
        self.test_scores = SegmentationScores(threshold=threshold)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Foreground probability (B, H, W) of images (B, 3, H, W) in [0, 1]."""
        return torch.sigmoid(self.net(images * 2 - 1)[:, 0])

    def training_step(self, batch: dict, batch_index: int) -> torch.Tensor:
        logits = self.net(batch["image"] * 2 - 1)[:, 0]
        loss = F.binary_cross_entropy_with_logits(logits, batch["mask"].float())
        if not torch.isfinite(loss):
            raise FloatingPointError(f"segmentation loss is {float(loss)} at step {self.global_step} for the batch "
                                     f"{list(batch['id'])}: stopping (the last checkpoint is kept)")
        self.log("train/loss", loss, prog_bar=True, batch_size=len(logits))
        return loss

    def test_step(self, batch: dict, batch_index: int) -> None:
        probabilities = self(batch["image"])
        if probabilities.shape[-2:] != batch["mask"].shape[-2:]:
            probabilities = F.interpolate(probabilities[:, None], size=batch["mask"].shape[-2:], mode="bilinear")[:, 0]
        self.test_scores.update(probabilities.float().clamp(0, 1), batch["mask"])

    def on_test_epoch_end(self) -> None:
        for name, value in self.test_scores.compute().items():
            self.log(f"test/{name}", value)
        self.test_scores.reset()

    def predict_step(self, batch: dict, batch_index: int = 0) -> list[dict]:
        masks = self(batch["image"]) > self.hparams.threshold
        return [{"id": sid, "mask": m} for sid, m in zip(batch["id"], masks.cpu().numpy(), strict=True)]

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.learning_rate)


class MaskedImages(Dataset):
    """(image, mask) pairs for training: images of a data set with masks read from a stage's folder, or the
    synthetic set's own images and masks; resized to the segmenter's size, optionally augmented."""

    def __init__(self, dataset: Dataset, masks=None, *, size: int, augment: bool, image_store=None) -> None:
        from torchvision.transforms import v2

        self.dataset, self.masks, self.image_store, self.size = dataset, masks, image_store, size
        steps = [v2.RandomHorizontalFlip(), v2.RandomResizedCrop(size, scale=(0.6, 1.0), antialias=True)] if augment \
            else [v2.Resize((size, size), antialias=True)]
        self.transform = v2.Compose(steps)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        from torchvision import tv_tensors

        sample = self.dataset[index]
        sid = sample["id"]
        if self.image_store is not None:
            image = torch.from_numpy(self.image_store.load("image", sid).transpose(2, 0, 1).copy())
        else:
            image = sample["image"]
        mask = torch.from_numpy(self.masks.load("mask", sid)) if self.masks is not None else sample["mask"]
        if mask.shape != image.shape[-2:]:  # M_pre is at latent resolution
            mask = F.interpolate(mask[None, None].float(), size=image.shape[-2:], mode="nearest")[0, 0]
        image, mask = self.transform(tv_tensors.Image(image), tv_tensors.Mask(mask.to(torch.uint8)))
        return {"id": sid, "image": image.as_subclass(torch.Tensor).float(), "mask": mask.as_subclass(torch.Tensor).bool()}


def training_set(ctx, source: str) -> Dataset:
    from conceptdistill.stages.artifacts import SampleIds, with_output
    from conceptdistill.stages.inpaint import inpaint_store
    from conceptdistill.stages.masks import mask_store
    from conceptdistill.stages.synthesize import synthetic_store

    seg = ctx.cfg.segment
    train = ctx.datamodule.dataset("train")
    options = {"size": seg.image_size, "augment": seg.augment}
    # Only images whose masks exist: one skipped upstream (a non-finite latent, say) has none.
    if source == "preliminary":
        store = mask_store(ctx, "train")
        return MaskedImages(with_output(train, store, "mask"), store, **options)
    if source in ("refined", "refined+synthetic"):
        store = inpaint_store(ctx, "train")
        refined = MaskedImages(with_output(train, store, "mask"), store, **options)
        if source == "refined":
            return refined
        synthetic = synthetic_store(ctx)
        return ConcatDataset([refined, MaskedImages(SampleIds(synthetic.ids("mask")), synthetic, image_store=synthetic,
                                                    **options)])
    if source == "truth":
        if ctx.datamodule.truth != "mask":
            raise ValueError("segment source 'truth' needs a data set with ground-truth masks")
        return MaskedImages(train, None, **options)
    raise ValueError(f"unknown segment source {source!r}; choose from {SOURCES}")


def segment_inputs(cfg) -> tuple[str, ...]:
    """The stages whose masks the configured sources read (masks also for the evaluation split)."""
    needed = {"masks"}
    for source in cfg.segment.sources:
        needed |= {"refined": {"inpaint"}, "refined+synthetic": {"inpaint", "synthesize"}}.get(source, set())
    return tuple(stage for stage in ("masks", "inpaint", "synthesize") if stage in needed)


@register_stage(
    "segment", inputs=segment_inputs,
    settings=("seed", "data", "segment", "masks.splits", *TRAINING_HARDWARE),
)
def run_segment(ctx) -> dict:
    from pytorch_lightning.callbacks import ModelCheckpoint

    from conceptdistill.data.stream import checkpoint_step, step_loader
    from conceptdistill.evaluation import log_results
    from conceptdistill.figures import save_grid
    from conceptdistill.runner import finish_loggers

    seg = ctx.cfg.segment
    folder = ctx.stage_dir("segment")
    test = MaskedImages(ctx.datamodule.dataset("test"), None, size=seg.image_size, augment=False) \
        if ctx.datamodule.truth else None
    rows, figure_columns = {}, {}
    for source in seg.sources:
        if source == "truth" and ctx.datamodule.truth != "mask":
            log.info("segment: no ground-truth masks, skipping the supervised upper bound")
            continue
        source_dir = folder / source.replace("+", "_")
        final = source_dir / "final.ckpt"
        if final.exists():
            model = SegmentationModel.load_from_checkpoint(final)
        else:
            # Initial weights from (seed, source) alone, never from what ran earlier in the process.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(sample_seed(ctx.cfg.seed, source, "segment-init"))
                model = SegmentationModel(
                    arch=seg.arch, encoder_name=seg.encoder_name, encoder_weights=seg.encoder_weights,
                    encoder_depth=seg.encoder_depth, decoder_channels=tuple(seg.decoder_channels),
                    learning_rate=seg.learning_rate, threshold=seg.threshold,
                )
            checkpoints = ModelCheckpoint(dirpath=source_dir, save_last=True, every_n_train_steps=seg.checkpoint_every)
            trainer = ctx.trainer(f"segment-{source}", max_steps=seg.max_steps, callbacks=[checkpoints],
                                  log_every_n_steps=20, default_root_dir=str(source_dir))
            last = source_dir / "last.ckpt"
            resume = last if last.exists() else None
            loader = step_loader(ctx.datamodule, training_set(ctx, source), batch_size=seg.batch_size,
                                 seed=ctx.cfg.seed, salt=f"segment-{source}", start_step=checkpoint_step(resume),
                                 trainer=trainer)
            trainer.fit(model, loader, ckpt_path=str(resume) if resume else None)
            trainer.save_checkpoint(final)
            finish_loggers()  # one logger run per mask source
        if test is not None:
            tester = ctx.trainer(f"segment-{source}", logger=False, default_root_dir=str(source_dir))
            scores = tester.test(model, ctx.datamodule.loader(test, batch_size=seg.batch_size), verbose=False)[0]
            rows[ROW_NAMES[source]] = {k.removeprefix("test/"): float(v) for k, v in scores.items()}
            figure_columns[source] = _predictions(model, test, seg.figure_samples)
    summary = {"rows": rows}
    figures = {}
    if figure_columns:
        samples = [test[i] for i in range(min(seg.figure_samples, len(test)))]
        figures["segment_grid"] = save_grid(
            folder / "segment_grid.png",
            {"image": [s["image"].numpy() for s in samples], **figure_columns, "truth": [s["mask"].numpy() for s in samples]},
        )
    log_results(ctx, "segment", summary, figures)
    return summary


@torch.no_grad()
def _predictions(model: SegmentationModel, dataset: Dataset, count: int) -> list[np.ndarray]:
    model.eval()
    images = torch.stack([dataset[i]["image"] for i in range(min(count, len(dataset)))])
    return list((model.cpu()(images) > model.hparams.threshold).numpy())
