"""The Python API (`conceptdistill.api.Segmenter`) gives stage predict's masks: the same pixels for the same
pictures given as PIL images, numpy arrays or tensors, whatever the batch size, and clear errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose, one_torch_thread
from PIL import Image
from test_end_to_end import TINY_STEPS

from conceptdistill.api import Segmenter
from conceptdistill.runner import run
from conceptdistill.utils.io import load_mask_png

#: (height, width) of the made-up images: none square, none at the segmenter's 32 px
SIZES = [(20, 24), (37, 29), (17, 40), (50, 16)]


def tiny_run_overrides(model: Path) -> list[str]:
    return [f"diffusion.path={model}", "data.num_train=4", "data.num_test=4", "logger=none", *TINY_STEPS,
            "segment.sources=[preliminary]"]


def write_new_images(folder: Path) -> Path:
    """RGB PNGs of several sizes, a grey one, a transparent one, and a JPEG whose EXIF turns it a quarter."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for index, size in enumerate(SIZES):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / f"rgb {index}.png")
    Image.fromarray(rng.integers(0, 256, (22, 31), dtype=np.uint8), mode="L").save(folder / "grey.png")
    Image.fromarray(rng.integers(0, 256, (26, 19, 4), dtype=np.uint8), mode="RGBA").save(folder / "alpha.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned a quarter: stored 18 x 33 (w x h), displayed 33 x 18
    Image.fromarray(rng.integers(0, 256, (33, 18, 3), dtype=np.uint8)).save(folder / "turned.jpg", exif=exif)
    return folder


@pytest.fixture(scope="module")
def predicted(tmp_path_factory, tiny_model):
    """A tiny finished run (one segmenter, source preliminary) and stage predict's masks of new images."""
    with one_torch_thread():
        run_dir = tmp_path_factory.mktemp("api") / "run"
        images = write_new_images(tmp_path_factory.mktemp("new-images"))
        overrides = tiny_run_overrides(tiny_model)
        run(compose([*overrides, "stages=[masks,finetune,segment]"], run_dir=run_dir))
        run(compose([*overrides, "stages=[predict]", "predict.source=preliminary", f"predict.input_dir={images}"],
                    run_dir=run_dir))
        yield run_dir, images


def stage_mask(run_dir: Path, image: Path) -> np.ndarray:
    return load_mask_png(run_dir / "predict" / "mask" / f"{image.stem.replace(' ', '_')}.png")


@pytest.mark.usefixtures("single_thread")
def test_api_masks_equal_the_predict_stage_for_every_kind_of_input(predicted):
    run_dir, images = predicted
    segmenter = Segmenter.from_run(run_dir, "preliminary", device="cpu")
    assert segmenter.image_size == 32 and segmenter.threshold == 0.5
    files = sorted(images.iterdir())
    expected = [stage_mask(run_dir, path) for path in files]
    assert not all(m.all() or not m.any() for m in expected)  # masks with both classes: a real comparison

    # files, read as the stage reads them (the JPEG turned by its EXIF orientation)
    by_file = segmenter.predict_files(files, batch_size=3)
    for path, mask, truth in zip(files, by_file, expected, strict=True):
        assert mask.dtype == bool and mask.shape == truth.shape, path.name
        np.testing.assert_array_equal(mask, truth, err_msg=path.name)
    assert expected[files.index(images / "turned.jpg")].shape == (18, 33)

    # PIL images as given (the caller turns the JPEG), in one list with mixed modes and sizes
    from PIL import ImageOps

    pictures = [ImageOps.exif_transpose(Image.open(path)) for path in files]
    for mask, truth in zip(segmenter.predict(pictures), expected, strict=True):
        np.testing.assert_array_equal(mask, truth)

    # the RGB ones as uint8 arrays, float arrays, float tensors and uint8 tensors
    rgb = [(np.array(Image.open(path)), stage_mask(run_dir, path)) for path in files if path.name.startswith("rgb")]
    assert [array.shape[:2] for array, _ in rgb] == SIZES
    kinds = {
        "uint8 array": [a for a, _ in rgb],
        "float array": [a.astype(np.float32) / 255 for a, _ in rgb],
        "float64 array": [a / 255.0 for a, _ in rgb],
        "float tensor": [torch.from_numpy(a).permute(2, 0, 1).float() / 255 for a, _ in rgb],
        "uint8 tensor": [torch.from_numpy(a).permute(2, 0, 1) for a, _ in rgb],
    }
    for kind, inputs in kinds.items():
        masks = segmenter.predict(inputs)
        assert isinstance(masks, list) and len(masks) == len(rgb), kind
        for mask, (_, truth) in zip(masks, rgb, strict=True):
            assert mask.dtype == bool and mask.shape == truth.shape, kind
            np.testing.assert_array_equal(mask, truth, err_msg=kind)
    single = segmenter.predict(kinds["float tensor"][1])
    assert isinstance(single, np.ndarray) and single.shape == SIZES[1]
    np.testing.assert_array_equal(single, rgb[1][1])
    grey = segmenter.predict(np.asarray(Image.open(images / "grey.png")))  # (H, W) arrays are grey images
    np.testing.assert_array_equal(grey, stage_mask(run_dir, images / "grey.png"))


@pytest.mark.usefixtures("single_thread")
def test_probabilities_batches_and_devices(predicted):
    run_dir, images = predicted
    segmenter = Segmenter.from_run(run_dir, "preliminary", device="auto")
    assert segmenter.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    segmenter = Segmenter.from_checkpoint(run_dir / "segment" / "preliminary" / "final.ckpt", device="cpu")
    pictures = [Image.open(path) for path in sorted(images.glob("rgb*.png"))]
    maps = segmenter.probabilities(pictures)
    for picture, probability in zip(pictures, maps, strict=True):
        assert probability.dtype == np.float32 and probability.shape == (picture.height, picture.width)
        assert 0 <= probability.min() <= probability.max() <= 1
    masks = segmenter.predict(pictures)
    for probability, mask in zip(maps, masks, strict=True):
        np.testing.assert_array_equal(probability > segmenter.threshold, mask)
    for batch_size in (1, 2, 3, 64):  # batch-mates change nothing
        for mask, again in zip(masks, segmenter.predict(pictures, batch_size=batch_size), strict=True):
            np.testing.assert_array_equal(mask, again, err_msg=f"batch_size={batch_size}")
    stacked = torch.stack([torch.from_numpy(np.array(p.resize((24, 20)))).permute(2, 0, 1) for p in pictures])
    assert len(segmenter.predict(stacked)) == len(pictures)  # a 4-D tensor is a batch


def test_errors_say_what_to_do(predicted, tmp_path):
    run_dir, images = predicted
    with pytest.raises(ValueError, match="trained sources are: preliminary"):
        Segmenter.from_run(run_dir, "refined+synthetic")
    with pytest.raises(FileNotFoundError, match=r"stages=\[segment\]"):
        Segmenter.from_run(tmp_path)  # a folder with no segmenter
    with pytest.raises(FileNotFoundError, match="no run folder"):
        Segmenter.from_run(tmp_path / "missing")
    unfinished = tmp_path / "unfinished"
    shutil.copytree(run_dir / "segment", unfinished / "segment")
    (unfinished / "segment" / "refined").mkdir()
    with pytest.raises(FileNotFoundError, match="has not finished training"):
        Segmenter.from_run(unfinished, "refined")
    with pytest.raises(FileNotFoundError, match="no segmentation checkpoint"):
        Segmenter.from_checkpoint(tmp_path / "final.ckpt")

    # a checkpoint that does not record its image size: given by the caller, or by the run's saved config
    checkpoint = torch.load(run_dir / "segment" / "preliminary" / "final.ckpt", map_location="cpu", weights_only=False)
    del checkpoint["hyper_parameters"]["image_size"]
    torch.save(checkpoint, unfinished / "segment" / "preliminary" / "final.ckpt")
    with pytest.raises(ValueError, match="give image_size="):
        Segmenter.from_run(unfinished, "preliminary")
    assert Segmenter.from_run(unfinished, "preliminary", image_size=32).image_size == 32
    (unfinished / ".hydra").mkdir()
    (unfinished / ".hydra" / "config.yaml").write_text("segment:\n  image_size: 32\n")
    assert Segmenter.from_run(unfinished, "preliminary").image_size == 32
    with pytest.raises(ValueError, match="trained at image_size=32, not 64"):
        Segmenter.from_run(run_dir, "preliminary", image_size=64)

    segmenter = Segmenter.from_run(run_dir, "preliminary", device="cpu")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        segmenter.predict(np.full((8, 8, 3), 2.0, dtype=np.float32))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        segmenter.predict(np.full((8, 8, 3), np.nan, dtype=np.float32))
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        segmenter.predict(torch.rand(8, 8, 3))
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        segmenter.predict(np.zeros((8, 8, 4), dtype=np.uint8))
    with pytest.raises(TypeError, match="uint8 or float"):
        segmenter.predict(np.zeros((8, 8, 3), dtype=np.int64))
    with pytest.raises(TypeError, match="predict_files"):
        segmenter.predict(str(images / "grey.png"))
    with pytest.raises(ValueError, match="batch_size"):
        segmenter.predict([np.zeros((8, 8, 3), dtype=np.uint8)], batch_size=0)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device='cpu'"):
            Segmenter.from_run(run_dir, "preliminary", device="cuda")


@pytest.mark.usefixtures("single_thread")
def test_predict_resizes_as_the_segmenter_was_trained_whatever_this_commands_segment_size(predicted, tmp_path):
    """A later `stages=[predict]` command need not repeat the run's settings: the checkpoint says its size (the
    stage used this command's segment.image_size, and wrote other masks with exit code 0)."""
    run_dir, images = predicted
    output = tmp_path / "masks-at-64"
    run(compose([*tiny_run_overrides(Path("/unused")), "stages=[predict]", "predict.source=preliminary",
                 f"predict.input_dir={images}", f"predict.output_dir={output}", "segment.image_size=64"],
                run_dir=run_dir))
    for path in sorted(images.iterdir()):
        name = f"{path.stem.replace(' ', '_')}.png"
        assert np.array_equal(load_mask_png(output / "mask" / name), stage_mask(run_dir, path)), name
