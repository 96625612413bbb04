"""Stage "segment" (docs/METHOD.md, stage 4): the model's test metrics, the training data set, and that it learns."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf

from conceptdistill.data.base import collate_samples
from conceptdistill.data.masked import MaskedImages
from conceptdistill.modules.segmenter import SegmentationModel
from conceptdistill.stages.segment import training_set

TINY = {"encoder_depth": 3, "decoder_channels": (16, 8, 4)}
pytestmark = pytest.mark.usefixtures("single_thread")



def quiet_trainer(**kwargs) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, **kwargs)


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, samples: list[dict]) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        return self.samples[index]


# ------------------------------------------------------------------------------------------ test metrics
def test_test_step_logs_pooled_and_per_image_iou():
    """Two 4 x 4 images scored through SegmentationModel.test_step, one image per batch.

    Image 0: truth = left half (8 px), prediction = exactly the left half -> IoU 1.
    Image 1: truth = 1 px, prediction = a 2 x 2 square holding it -> tp 1, fp 3, fn 0 -> IoU 1/4.
    Pooled: tp 9, fp 3, fn 0, tn 8 + 12 = 20 (32 px):
      acc = 29/32, IoU = 9/12 = 0.75, background IoU = 20/23, mIoU = (0.75 + 20/23) / 2;
      the per-image mean IoU is (1 + 1/4) / 2 = 0.625, not the pooled 0.75.
    """
    truths = torch.zeros(2, 4, 4, dtype=torch.bool)
    truths[0, :, :2] = True
    truths[1, 0, 0] = True
    probabilities = torch.full((2, 4, 4), 0.2)
    probabilities[0, :, :2] = 0.8
    probabilities[0, 3, 3] = 0.5  # exactly at the threshold: background (foreground is > 0.5)
    probabilities[1, :2, :2] = 0.9
    # each image carries its index in its pixels, so the patched forward knows which prediction to return
    samples = [{"id": f"img{i}", "image": torch.full((3, 4, 4), float(i)), "mask": truths[i]} for i in range(2)]

    model = SegmentationModel(**TINY)
    model.forward = lambda images: probabilities[images[:, 0, 0, 0].long()]
    loader = torch.utils.data.DataLoader(ListDataset(samples), batch_size=1, collate_fn=collate_samples)
    scores = quiet_trainer().test(model, loader, verbose=False)[0]

    assert scores["test/acc"] == pytest.approx(29 / 32)
    assert scores["test/iou"] == pytest.approx(0.75)
    assert scores["test/bg_iou"] == pytest.approx(20 / 23)
    assert scores["test/miou"] == pytest.approx((0.75 + 20 / 23) / 2)
    assert scores["test/iou_per_image"] == pytest.approx(0.625)
    # the accumulator is reset after the epoch: a second test gives the same numbers, not a running total
    again = quiet_trainer().test(model, loader, verbose=False)[0]
    assert again["test/iou"] == pytest.approx(0.75) and again["test/iou_per_image"] == pytest.approx(0.625)


# ------------------------------------------------------------------------------------------ MaskedImages
def block_image(seed: int, size: int = 32, block: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """A random image whose red channel is a 0/1 pattern of `block`-pixel squares; the mask is that channel."""
    rng = np.random.default_rng(seed)
    pattern = rng.random((size // block, size // block)) > 0.5
    pattern[0, 0], pattern[0, -1] = True, False  # not left-right symmetric, so a flip shows
    red = np.kron(pattern, np.ones((block, block))).astype(np.float32)
    image = torch.from_numpy(rng.random((3, size, size)).astype(np.float32))
    image[0] = torch.from_numpy(red)
    return image, torch.from_numpy(red > 0.5)


def test_augment_keeps_image_and_mask_aligned():
    image, mask = block_image(0)
    data = MaskedImages(ListDataset([{"id": "a", "image": image, "mask": mask}]), None, size=24, augment=True)
    torch.manual_seed(0)
    agreements, flipped_agreements, differs_from_plain = [], [], 0
    plain = torch.nn.functional.interpolate(mask[None, None].float(), size=(24, 24), mode="nearest")[0, 0].bool()
    for _ in range(40):
        sample = data[0]
        assert sample["image"].shape == (3, 24, 24) and sample["image"].dtype == torch.float32
        assert sample["mask"].shape == (24, 24) and sample["mask"].dtype == torch.bool
        from_image = sample["image"][0] > 0.5
        agreements.append(float((sample["mask"] == from_image).float().mean()))
        flipped_agreements.append(float((sample["mask"] == from_image.flip(-1)).float().mean()))
        differs_from_plain += int(not torch.equal(sample["mask"], plain))
    # the mask follows the image through every flip and crop: only resampling at block edges differs
    # (the image is interpolated, the mask taken nearest), a few percent of the pixels
    assert min(agreements) > 0.85 and np.mean(agreements) > 0.93, agreements
    # and the check has teeth: a mask flipped against its image agrees far less
    assert np.mean(flipped_agreements) < np.mean(agreements) - 0.15
    assert differs_from_plain > 30  # the augmentation really moves things


def test_no_augment_resizes_and_latent_masks_are_upsampled():
    image, _ = block_image(1)
    latent_mask = np.zeros((16, 16), dtype=bool)  # a mask at latent resolution (half the image's side)
    latent_mask[2:7, 3:12] = True

    class Store:
        def load(self, output: str, sample_id: str) -> np.ndarray:
            assert output == "mask" and sample_id == "a"
            return latent_mask

    data = MaskedImages(ListDataset([{"id": "a", "image": image}]), Store(), size=32, augment=False)
    sample = data[0]
    assert sample["id"] == "a" and sample["mask"].shape == (32, 32) and sample["mask"].dtype == torch.bool
    assert np.array_equal(sample["mask"].numpy(), np.kron(latent_mask, np.ones((2, 2), dtype=bool)))
    assert torch.allclose(sample["image"], image)
    small = MaskedImages(ListDataset([{"id": "a", "image": image}]), Store(), size=16, augment=False)[0]
    assert small["image"].shape == (3, 16, 16) and np.array_equal(small["mask"].numpy(), latent_mask)


def test_synthetic_images_come_from_the_image_store():
    from conceptdistill.modules.synthesizer import SyntheticIds

    pictures = {f"synth-{i:06d}": np.full((32, 32, 3), i / 4, np.float32) for i in range(3)}
    masks = {sid: np.eye(32, dtype=bool) for sid in pictures}

    class Store:
        def load(self, output: str, sample_id: str) -> np.ndarray:
            return pictures[sample_id] if output == "image" else masks[sample_id]

    data = MaskedImages(SyntheticIds(3), Store(), image_store=Store(), size=32, augment=False)
    assert len(data) == 3
    sample = data[2]
    assert sample["id"] == "synth-000002" and torch.allclose(sample["image"], torch.full((3, 32, 32), 0.5))
    assert np.array_equal(sample["mask"].numpy(), np.eye(32, dtype=bool))


# ------------------------------------------------------------------------------------------- training
def test_training_on_truth_reduces_the_loss():
    from conceptdistill.modules.callbacks import LossHistory
    from conceptdistill.world.datamodule import ShapesWorldDataModule

    datamodule = ShapesWorldDataModule(image_size=32, concept="circle", num_train=32, num_val=1, num_test=1,
                                       batch_size=8)
    segment = OmegaConf.create({"image_size": 32, "augment": True})
    ctx = SimpleNamespace(cfg=OmegaConf.create({"segment": segment}), datamodule=datamodule)
    dataset = training_set(ctx, "truth")
    assert len(dataset) == 32 and dataset[0]["mask"].any()

    pl.seed_everything(0, workers=True)
    model = SegmentationModel(**TINY, learning_rate=1e-2)
    history = LossHistory()
    quiet_trainer(max_steps=40, callbacks=[history]).fit(model, datamodule.loader(dataset, shuffle=True))
    losses = [loss for _, loss in history.history]
    assert len(losses) == 40
    first, last = np.mean(losses[:4]), np.mean(losses[-4:])
    assert last < 0.5 * first, (first, last)


def test_a_nonfinite_segmentation_loss_stops_training_naming_step_and_ids():
    model = SegmentationModel(encoder_depth=3, decoder_channels=(16, 8, 4))
    batch = {"id": ["x", "y"], "image": torch.full((2, 3, 32, 32), float("nan")), "mask": torch.zeros(2, 32, 32, dtype=bool)}
    with pytest.raises(FloatingPointError, match=r"at step 0 for the batch \['x', 'y'\]"):
        model.training_step(batch, 0)
