"""The segmenter (docs/METHOD.md, stage 4): a segmentation_models_pytorch model trained with BCE and Adam on
(image, mask) pairs, scored with pixels pooled over the test split (metrics.SegmentationScores)."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from conceptdistill.metrics import SegmentationScores


def foreground_probability(net: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Foreground probability (B, H, W) in [0, 1] of images (B, 3, H, W) in [0, 1], from a one-class smp model."""
    return torch.sigmoid(net(images * 2 - 1)[:, 0])


class ForegroundProbability(torch.nn.Module):
    """`SegmentationModel.forward` as a plain torch module sharing its network (no Lightning attributes), for
    `torch.jit.trace` and `torch.onnx.export`."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return foreground_probability(self.net, images)


class SegmentationModel(pl.LightningModule):
    """A smp model (one factory call) trained with BCE and Adam, scored with pooled metrics.

    `image_size` is the side S of the square images it was trained on (stage segment sets it from
    `segment.image_size`); it is stored with the weights so that a checkpoint alone says how to prepare new
    images (conceptdistill.api). None in checkpoints written before it was recorded.
    """

    def __init__(self, *, arch: str = "unet", encoder_name: str = "resnet18", encoder_weights: str | None = None,
                 encoder_depth: int = 5, decoder_channels: tuple[int, ...] = (256, 128, 64, 32, 16),
                 learning_rate: float = 2e-3, threshold: float = 0.5, image_size: int | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        import segmentation_models_pytorch as smp

        self.net = smp.create_model(arch, encoder_name=encoder_name, encoder_weights=encoder_weights,
                                    encoder_depth=encoder_depth, decoder_channels=tuple(decoder_channels), classes=1)
        self.test_scores = SegmentationScores(threshold=threshold)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Foreground probability (B, H, W) of images (B, 3, H, W) in [0, 1]."""
        return foreground_probability(self.net, images)

    def probability_module(self) -> ForegroundProbability:
        """`forward` as a plain torch module (the same weights, in this model's train/eval mode), for tracing and
        ONNX export."""
        return ForegroundProbability(self.net).train(self.training)

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
