"""Segment images from Python with a finished run's segmenter, exactly as stage predict does.

    from conceptdistill.api import Segmenter

    segmenter = Segmenter.from_run("runs/shapes/2026-11-29_10-00-00")   # source "refined+synthetic"
    mask = segmenter.predict(Image.open("bird.jpg"))          # bool (H, W), the image's own size
    masks = segmenter.predict_files(["a.jpg", "b.png"])      # read as stage predict reads them (EXIF applied)

Preprocessing is stage predict's, step for step: the image as float32 RGB in [0, 1] (`pil_to_rgb_array`, the
readers' conversion: grey replicated, transparency on white), resized to the segmenter's S x S
(`resize_image_and_mask`: antialiased bicubic, clamped), the foreground probability thresholded at the
model's threshold, and the S x S mask resized back to the image's size by nearest neighbour
(`upsample_mask`). So for the same pictures its masks equal the PNGs of `stages=[predict]` run with a CPU
trainer in float32 (a `trainer=gpu` run predicts under bf16 autocast: pixels whose probability lies near the
threshold may then differ). PIL images are taken as given; `predict_files` applies the EXIF orientation as
the readers do.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image

from conceptdistill.data.decoding import load_rgb, pil_to_rgb_array
from conceptdistill.data.geometry import resize_image_and_mask
from conceptdistill.maskmath import resize_nearest
from conceptdistill.modules.segmenter import SegmentationModel
from conceptdistill.pipeline.layout import RunLayout

__all__ = ["ImageInput", "Segmenter"]

#: one image: a PIL image, a numpy array (H, W, 3) (or (H, W) grey) uint8 or float in [0, 1], or a torch
#: tensor (3, H, W) float in [0, 1] (or uint8)
ImageInput = Union[Image.Image, np.ndarray, torch.Tensor]  # noqa: UP007 - a runtime alias, for isinstance


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device} was asked for, but torch sees no CUDA device; use device='cpu'")
    return device


def as_rgb_array(image: ImageInput) -> np.ndarray:
    """One image as float32 (H, W, 3) in [0, 1], the array stage predict resizes.

    PIL images go through the readers' conversion (`pil_to_rgb_array`; their EXIF orientation is NOT
    applied). Numpy arrays: (H, W, 3) or (H, W) (grey, replicated), uint8 (divided by 255) or float in [0, 1].
    Torch tensors: (3, H, W), float in [0, 1] or uint8 (any device).

    Raises:
        TypeError: for another type, or an array of another dtype (bool, uint16, ...).
        ValueError: for another shape, an empty image, or float values outside [0, 1] (or NaN).
    """
    if isinstance(image, Image.Image):
        return np.ascontiguousarray(pil_to_rgb_array(image), dtype=np.float32)
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"a tensor image must be (3, H, W), got shape {tuple(image.shape)}")
        array = image.detach().cpu().permute(1, 2, 0).numpy()
    elif isinstance(image, np.ndarray):
        array = image[:, :, None].repeat(3, axis=2) if image.ndim == 2 else image
        if array.ndim != 3 or array.shape[2] != 3:
            raise ValueError(f"an array image must be (H, W, 3) or (H, W), got shape {image.shape}")
    else:
        raise TypeError(f"an image must be a PIL image, a numpy array or a torch tensor, got {type(image).__name__}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"an image has zero size: {array.shape}")
    if array.dtype == np.uint8:
        return np.ascontiguousarray(array, dtype=np.float32) / 255.0  # as pil_to_rgb_array divides RGB
    if not np.issubdtype(array.dtype, np.floating):
        raise TypeError(f"an image array must be uint8 or float in [0, 1], got dtype {array.dtype}")
    array = np.ascontiguousarray(array, dtype=np.float32)
    if not (np.all(array >= 0.0) and np.all(array <= 1.0)):  # also refuses NaN
        raise ValueError(f"float image values must lie in [0, 1], got [{array.min()}, {array.max()}] "
                         "(NaN counts as outside); divide 8-bit values by 255")
    return array


def _as_list(images) -> tuple[list, bool]:
    """(the images as a list, whether one image was given)."""
    if isinstance(images, Image.Image):
        return [images], True
    if isinstance(images, torch.Tensor | np.ndarray):
        # a 4-D tensor (B, 3, H, W) or array (B, H, W, 3) is a batch of images of one size
        return (list(images), False) if images.ndim == 4 else ([images], True)
    if isinstance(images, Iterable) and not isinstance(images, str | bytes | os.PathLike):
        return list(images), False
    raise TypeError(f"give an image or a list of images (PIL, numpy, torch), got {type(images).__name__}; "
                    "for files use predict_files(paths)")


class Segmenter:
    """A trained segmenter ready for new images: `predict` (bool masks) and `probabilities` (float maps), both
    at each image's own size, computed in batches on one device (see the module doc for the preprocessing).

    Attributes: `model` (the `SegmentationModel`, in eval mode on `device`), `image_size` (S, the side the
    images are resized to), `threshold` (foreground = probability > threshold), `device`.
    """

    def __init__(self, model: SegmentationModel, *, image_size: int, device: str | torch.device | None = None,
                 threshold: float | None = None) -> None:
        self.device = _resolve_device(device)
        self.model = model.to(self.device).eval()
        self.image_size = int(image_size)
        self.threshold = float(model.hparams.threshold if threshold is None else threshold)

    # ----- loading ------------------------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, *, device: str | torch.device | None = None,
                        image_size: int | None = None) -> Segmenter:
        """The segmenter of a `final.ckpt` (stage segment's, or any `SegmentationModel` checkpoint).

        `device`: "cpu", "cuda", "cuda:1", a torch.device, or None / "auto" (CUDA when available).
        `image_size`: S, needed only for checkpoints that do not record it (written before it was recorded:
        give the run's `segment.image_size`).

        Raises:
            FileNotFoundError: when `path` does not exist.
            ValueError: when the checkpoint records no image size and none is given, or another one than given;
                when CUDA is asked for and not available.
        """
        return cls._load(Path(path).expanduser(), device, image_size, None)

    @classmethod
    def _load(cls, path: Path, device, image_size: int | None, saved_size) -> Segmenter:
        """`from_checkpoint`; `saved_size()` gives the size to use when neither the checkpoint nor the caller does."""
        if not path.is_file():
            raise FileNotFoundError(f"no segmentation checkpoint at {path}")
        model = SegmentationModel.load_from_checkpoint(path, map_location="cpu")
        recorded = model.hparams.get("image_size")
        if recorded is not None and image_size is not None and int(recorded) != int(image_size):
            raise ValueError(f"the checkpoint {path} was trained at image_size={recorded}, not {image_size}")
        size = recorded if recorded is not None else image_size
        if size is None and saved_size is not None:
            size = saved_size()
        if size is None:
            raise ValueError(f"the checkpoint {path} does not record the image size it was trained at: give "
                             "image_size= (the run's segment.image_size)")
        return cls(model, image_size=int(size), device=device)

    @classmethod
    def from_run(cls, run_dir: str | os.PathLike, source: str = "refined+synthetic", *,
                 device: str | torch.device | None = None, image_size: int | None = None) -> Segmenter:
        """The segmenter stage segment trained on mask `source` in the run folder `run_dir`
        (`<run>/segment/<source, '+' written '_'>/final.ckpt`). `device` and `image_size` as in
        `from_checkpoint`; an older checkpoint without its image size takes it from the run's saved config
        (`<run>/.hydra/config.yaml`) when there is one.

        Raises:
            FileNotFoundError: when the run folder does not exist, or holds no finished segmenter (the message
                says to run stage segment), or the source's training has not finished.
            ValueError: when `source` is not one of the run's trained sources (the message lists them).
        """
        root = Path(run_dir).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"no run folder at {root}")
        layout = RunLayout(root)
        checkpoint = layout.segmenter_checkpoint(source)
        if not checkpoint.is_file():
            segment_dir = layout.stage_dir("segment")
            trained = sorted(folder.name.replace("_", "+") for folder in segment_dir.glob("*")
                             if (folder / "final.ckpt").is_file())
            if layout.segmenter_dir(source).is_dir():
                raise FileNotFoundError(
                    f"the segmenter of source {source!r} in {root} has not finished training (no {checkpoint}): "
                    f"rerun stage segment in this run folder (python -m conceptdistill stages=[segment] "
                    f"hydra.run.dir={root})")
            if not trained:
                raise FileNotFoundError(
                    f"no trained segmenter in {root} (no {checkpoint}): run stage segment first "
                    f"(python -m conceptdistill stages=[segment] hydra.run.dir={root})")
            raise ValueError(f"the run {root} has no segmenter for source {source!r}; its trained sources are: "
                             f"{', '.join(trained)}")
        return cls._load(checkpoint, device, image_size, lambda: _saved_image_size(root))

    # ----- prediction ---------------------------------------------------------------------------------------
    def prepare(self, image: ImageInput) -> torch.Tensor:
        """One image as the model's input: float32 (3, S, S) in [0, 1] on the CPU (errors of `as_rgb_array`)."""
        return resize_image_and_mask(as_rgb_array(image), None, self.image_size, "resize")[0]

    @torch.inference_mode()
    def probabilities(self, images: ImageInput | Sequence[ImageInput], batch_size: int = 16
                      ) -> np.ndarray | list[np.ndarray]:
        """Foreground probability of each image, float32 (H, W) in [0, 1] at the image's own size (the S x S
        map resized by nearest neighbour, so `probabilities(x) > threshold` equals `predict(x)`).

        `images`: one image or a list of them (PIL, numpy (H, W, 3) or (H, W), torch (3, H, W); a 4-D
        tensor or array is a batch); one image gives one array, a list a list. `batch_size` images go through
        the model at a time (results do not depend on it).

        Raises:
            TypeError, ValueError: for an image that is not one of the accepted kinds (see `as_rgb_array`),
                or batch_size < 1.
        """
        items, single = _as_list(images)
        maps = self._run(items, batch_size, as_rgb_array)
        return maps[0] if single else maps

    def predict(self, images: ImageInput | Sequence[ImageInput], batch_size: int = 16
                ) -> np.ndarray | list[np.ndarray]:
        """Foreground mask of each image, bool (H, W) at the image's own size: probability > `threshold`
        (as stage predict writes them). Arguments and errors as `probabilities`."""
        result = self.probabilities(images, batch_size=batch_size)
        return result > self.threshold if isinstance(result, np.ndarray) else [m > self.threshold for m in result]

    @torch.inference_mode()
    def predict_files(self, paths: Sequence[str | os.PathLike], batch_size: int = 16) -> list[np.ndarray]:
        """Masks (bool (H, W), the displayed size) of image files read as stage predict reads them: any format
        Pillow opens, EXIF orientation applied, transparency on white, grey replicated.

        Raises:
            conceptdistill.data.decoding.UnreadableImageError: for a file that cannot be decoded (an OSError).
        """
        if isinstance(paths, str | os.PathLike):
            paths = [paths]
        return [m > self.threshold for m in self._run(list(paths), batch_size, load_rgb)]

    def _run(self, items: list, batch_size: int, to_array) -> list[np.ndarray]:
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        maps = []
        for start in range(0, len(items), int(batch_size)):
            arrays = [to_array(item) for item in items[start:start + int(batch_size)]]
            batch = torch.stack([resize_image_and_mask(a, None, self.image_size, "resize")[0] for a in arrays])
            small = self.model(batch.to(self.device)).float().cpu().numpy()
            maps += [resize_nearest(p, a.shape[:2]) for p, a in zip(small, arrays, strict=True)]
        return maps


def _saved_image_size(root: Path) -> int | None:
    """segment.image_size of the run's saved config (<run>/.hydra/config.yaml), or None."""
    saved = root / ".hydra" / "config.yaml"
    if not saved.is_file():
        return None
    from omegaconf import OmegaConf

    size = OmegaConf.select(OmegaConf.load(saved), "segment.image_size", default=None)
    return int(size) if size is not None else None
