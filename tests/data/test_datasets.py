"""Real-data readers on tiny trees written in each data set's official layout (no download ever happens)."""

from __future__ import annotations

import io
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.io import savemat
from trees import make_cars, make_chest_xray, make_cub, make_dogs, make_h36m, write_image

from conceptdistill.data.base import collate_samples
from conceptdistill.data.datasets.chest_xray import ChestXrayDataModule
from conceptdistill.data.datasets.cub import CUBDataModule
from conceptdistill.data.datasets.human36m import Human36MDataModule
from conceptdistill.data.datasets.image_folder import ImageFolderDataModule
from conceptdistill.data.datasets.stanford_cars import StanfordCarsDataModule
from conceptdistill.data.datasets.stanford_dogs import StanfordDogsDataModule
from conceptdistill.data.decoding import UnreadableImageError, load_mask, load_rgb, pil_to_rgb_array
from conceptdistill.data.geometry import boxes_to_mask, resize_image_and_mask, transform_boxes
from conceptdistill.data.image_list import ImageListDataset
from conceptdistill.data.readers import DatasetLayoutError, hash_split
from conceptdistill.data.scanning import ImageRecord, scan_records

SIZE = 16
ENV_VARS = ["CUB_ROOT", "CUB_SEGMENTATIONS_ROOT", "STANFORD_DOGS_ROOT", "STANFORD_CARS_ROOT", "HUMAN36M_ROOT",
            "CHEST_XRAY_ROOT", "IMAGE_FOLDER_ROOT", "IMAGE_FOLDER_MASKS"]


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)


def check_sample(sample: dict, truth: str | None) -> None:
    assert isinstance(sample["id"], str) and "/" not in sample["id"] and sample["id"]
    image = sample["image"]
    assert image.dtype == torch.float32 and tuple(image.shape) == (3, SIZE, SIZE)
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
    if truth is None:
        assert "mask" not in sample
    else:
        assert sample["mask"].dtype == torch.bool and tuple(sample["mask"].shape) == (SIZE, SIZE)


def expected_box_mask(box_1based, w: int, h: int) -> np.ndarray:
    """The mask a 1-based inclusive box on a (w, h) image must give at SIZE x SIZE."""
    x1, y1, x2, y2 = box_1based
    return boxes_to_mask(SIZE, SIZE, [((x1 - 1) * SIZE / w, (y1 - 1) * SIZE / h, x2 * SIZE / w, y2 * SIZE / h)])


def kw(**extra):
    return {"image_size": SIZE, "batch_size": 2, "num_workers": 0, "scan_workers": 1, **extra}


# ================================================================================== images.py unit tests
def test_load_rgb_conversions(tmp_path):
    gray = Image.fromarray(np.full((4, 6), 128, np.uint8), "L")
    assert np.allclose(pil_to_rgb_array(gray), 128 / 255)
    rgba = np.zeros((4, 6, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:, :3, 3] = 255  # left half opaque red, right half fully transparent (colour black underneath)
    out = pil_to_rgb_array(Image.fromarray(rgba, "RGBA"))
    assert np.allclose(out[:, :3], [1, 0, 0]) and np.allclose(out[:, 3:], 1.0)  # composited on white
    la = Image.fromarray(np.zeros((4, 6, 2), np.uint8), "LA")
    assert np.allclose(pil_to_rgb_array(la), 1.0)
    sixteen = Image.fromarray(np.array([[0, 32768, 65535]], np.uint16))
    assert sixteen.mode == "I;16"
    assert np.allclose(pil_to_rgb_array(sixteen)[0, :, 0], [0, 32768 / 65535, 1], atol=1e-6)
    as_int = Image.fromarray(np.array([[0, 65535]], np.int32))
    assert as_int.mode == "I" and np.allclose(pil_to_rgb_array(as_int)[0, :, 1], [0, 1])
    cmyk = tmp_path / "cmyk.jpg"
    Image.new("RGB", (8, 8), (255, 0, 0)).convert("CMYK").save(cmyk)
    assert Image.open(cmyk).mode == "CMYK"
    assert np.allclose(load_rgb(cmyk)[2, 2], [1, 0, 0], atol=0.05)
    palette = Image.new("P", (4, 4), 0)
    palette.info["transparency"] = 0
    assert np.allclose(pil_to_rgb_array(palette), 1.0)
    for array in (out, load_rgb(cmyk)):
        assert array.dtype == np.float32 and array.shape[2] == 3


def test_unreadable_files_raise(tmp_path):
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    for path in (junk, truncated, tmp_path / "missing.png"):
        with pytest.raises(UnreadableImageError):
            load_rgb(path)
    report = scan_records([ImageRecord("a", junk), ImageRecord("b", truncated)], workers=1)
    assert report.skipped == 2 and not report.kept


def test_load_mask_threshold(tmp_path):
    values = np.array([[0, 102, 127, 128, 153, 255]], np.uint8)
    Image.fromarray(values, "L").save(tmp_path / "m.png")
    assert load_mask(tmp_path / "m.png").tolist() == [[False, False, False, True, True, True]]
    Image.fromarray(np.array([[0, 1, 2]], np.uint8), "P").save(tmp_path / "p.png")
    assert load_mask(tmp_path / "p.png").tolist() == [[False, True, True]]


def test_boxes_to_mask_and_resize_geometry():
    mask = boxes_to_mask(6, 8, [(1, 1, 3, 4), (5.0, 0.0, 8.0, 1.0)])
    assert mask.sum() == 2 * 3 + 3 and mask[1:4, 1:3].all() and mask[0, 5:8].all()
    assert boxes_to_mask(4, 4, [(1.2, 1.2, 1.4, 1.4)]).sum() == 1  # a sub-pixel box keeps one pixel
    assert boxes_to_mask(4, 4, []).sum() == 0
    image = np.zeros((20, 40, 3), np.float32)
    image[5:15, 10:20] = 1.0  # a white box at x 10..20, y 5..15 on a 40 x 20 image
    box_mask = boxes_to_mask(20, 40, [(10, 5, 20, 15)])
    out, out_mask, boxes = resize_image_and_mask(image, box_mask, SIZE, "resize", boxes=[(10, 5, 20, 15)])
    assert out.shape == (3, SIZE, SIZE) and out.dtype == torch.float32
    assert np.allclose(boxes, [[4, 4, 8, 12]])
    assert torch.equal(out_mask, torch.from_numpy(boxes_to_mask(SIZE, SIZE, boxes)))
    assert out[:, 8, 6].min() > 0.9 and out[:, 8, 1].max() < 0.1
    # pad: 40 x 20 goes onto a centred 40 x 40 square (10 rows above), then 40 -> 16
    out, out_mask, boxes = resize_image_and_mask(image, box_mask, SIZE, "pad", boxes=[(10, 5, 20, 15)])
    assert np.allclose(boxes, [[4, 6, 8, 10]])
    assert np.allclose(transform_boxes([(10, 5, 20, 15)], (20, 40), SIZE, "pad"), boxes)
    assert torch.equal(out_mask, torch.from_numpy(boxes_to_mask(SIZE, SIZE, boxes)))
    assert out[:, :3].max() < 0.05 and out[:, 8, 6].min() > 0.9  # padding is black, content in the middle
    with pytest.raises(ValueError):
        resize_image_and_mask(image, None, SIZE, "crop")


def test_hash_split_is_deterministic_and_order_free():
    records = [ImageRecord(f"img{i}", Path(f"{i}.jpg")) for i in range(40)]
    rest, picked = hash_split(records, 0.25, seed=3)
    assert len(picked) == 10 and len(rest) == 30
    rest2, picked2 = hash_split(records[::-1], 0.25, seed=3)
    assert {r.id for r in picked} == {r.id for r in picked2}
    assert hash_split(records[:1], 0.5)[1] == [] and len(hash_split(records[:2], 0.01)[1]) == 1


# ======================================================================================== CUB-200-2011
@pytest.mark.parametrize("beside", [False, True])
def test_cub(tmp_path, beside):
    root = make_cub(tmp_path, segmentations_beside=beside)
    dm = CUBDataModule(root=str(root), **kw(val_fraction=0.25))
    assert dm.truth == "mask"
    assert [len(dm.dataset(s)) for s in ("train", "val", "test")] == [3, 1, 2]
    ids = {s["id"] for split in ("train", "val", "test") for s in dm.dataset(split)}
    assert "Sooty_Albatross_0001_1071" in ids and len(ids) == 6
    sample = dm.dataset("test")[0]
    check_sample(sample, "mask")
    expected = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    expected[:, : SIZE // 2] = True  # columns 0..15 of 32 are foreground; 16..23 (2 of 5 annotators) are not
    assert torch.equal(sample["mask"], expected)
    batch = next(iter(dm.test_dataloader()))
    assert batch["image"].shape == (2, 3, SIZE, SIZE) and batch["mask"].shape == (2, SIZE, SIZE)
    assert dm.stats()["test"]["skipped"] == 0
    small = CUBDataModule(root=str(root), **kw(val_fraction=0.25, max_images=2))
    assert [len(small.records(s)) for s in ("train", "val", "test")] == [2, 1, 2]
    assert {r.id for r in small.records("train")} <= {r.id for r in dm.records("train")}


def test_cub_missing_mask_is_skipped_and_env_root(tmp_path, monkeypatch, caplog):
    root = make_cub(tmp_path)
    (root / "segmentations" / "003.Sooty_Albatross" / "Sooty_Albatross_0001_1071.png").unlink()
    monkeypatch.setenv("CUB_ROOT", str(root))
    dm = CUBDataModule(root=None, **kw())
    with caplog.at_level(logging.WARNING, logger="conceptdistill.data"):
        test = dm.dataset("test")
    assert len(test) == 1 and test.skipped == 1
    assert "skipped 1 image(s) without a mask file [missing mask]" in caplog.text
    assert "Sooty_Albatross_0001_1071.png" in caplog.text and dm.stats()["test"]["skipped_kinds"] == {"missing mask": 1}


# ======================================================================================== Stanford Dogs
def test_stanford_dogs(tmp_path):
    root, boxes = make_dogs(tmp_path)
    dm = StanfordDogsDataModule(root=root, **kw(val_fraction=0.0))
    assert dm.truth == "box"
    assert len(dm.dataset("train")) == 3 and len(dm.dataset("test")) == 2 and len(dm.dataset("val")) == 0
    for split in ("train", "test"):
        for sample in dm.dataset(split):
            check_sample(sample, "box")
            expected = np.zeros((SIZE, SIZE), bool)
            for box in boxes[sample["id"]]:
                expected |= expected_box_mask(box, 40, 20)
            assert np.array_equal(sample["mask"].numpy(), expected), sample["id"]
    first = next(s for s in dm.dataset("train") if s["id"] == "n02085620_10074")
    assert first["mask"][0, 0] and first["mask"][-1, -1] and not first["mask"][0, -1]  # union of two boxes


def test_stanford_dogs_missing_annotation_is_skipped(tmp_path, caplog):
    root, _ = make_dogs(tmp_path)
    (root / "Annotation" / "n02085782-Japanese_spaniel" / "n02085782_919").unlink()
    dm = StanfordDogsDataModule(root=root, **kw())
    with caplog.at_level(logging.WARNING, logger="conceptdistill.data"):
        assert len(dm.dataset("test")) == 1
    assert "skipped 1" in caplog.text and "no readable box annotation" in caplog.text


# ======================================================================================== Stanford Cars
def test_stanford_cars(tmp_path):
    root = make_cars(tmp_path)
    dm = StanfordCarsDataModule(root=root, **kw(val_fraction=0.34))
    assert [len(dm.dataset(s)) for s in ("train", "val", "test")] == [2, 1, 2]
    test = {s["id"]: s for s in dm.dataset("test")}
    assert set(test) == {"test_00001", "test_00002"}  # the two folders reuse names: ids carry the split
    for sample in test.values():
        check_sample(sample, "box")
    assert np.array_equal(test["test_00001"]["mask"].numpy(), expected_box_mask((11, 6, 20, 15), 40, 20))
    train_ids = {s["id"] for split in ("train", "val") for s in dm.dataset(split)}
    assert train_ids == {"train_00001", "train_00002", "train_00003"}


def test_stanford_cars_combined_layout_and_nested_mirror(tmp_path):
    root = tmp_path / "cars_b"
    rows = [("car_ims/000001.jpg", (11, 6, 20, 15), 0), ("car_ims/000002.jpg", (1, 1, 20, 20), 1)]
    fields = ["relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test"]
    array = np.empty((1, len(rows)), dtype=[(f, object) for f in fields])
    for i, (rel, box, is_test) in enumerate(rows):
        write_image(root / rel, seed=i)
        array[0, i] = tuple([np.array([rel])] + [np.array([[v]], np.uint16) for v in box]
                            + [np.array([[1]], np.uint8), np.array([[is_test]], np.uint8)])
    savemat(root / "cars_annos.mat", {"annotations": array})
    dm = StanfordCarsDataModule(root=root, **kw(val_fraction=0.0))
    assert [s["id"] for s in dm.dataset("train")] == ["000001"] and [s["id"] for s in dm.dataset("test")] == ["000002"]
    assert np.array_equal(dm.dataset("train")[0]["mask"].numpy(), expected_box_mask((11, 6, 20, 15), 40, 20))
    # a Kaggle-style mirror: cars_train/cars_train/*.jpg
    nested = make_cars(tmp_path / "nested")
    for split in ("train", "test"):
        inner = nested / f"cars_{split}" / f"cars_{split}"
        inner.mkdir()
        for f in list((nested / f"cars_{split}").glob("*.jpg")):
            f.rename(inner / f.name)
    assert len(StanfordCarsDataModule(root=nested, **kw()).dataset("test")) == 2


# =========================================================================================== Human3.6M
def test_human36m(tmp_path):
    root = make_h36m(tmp_path)
    dm = Human36MDataModule(root=root, **kw(val_fraction=0.25))
    assert [len(dm.dataset(s)) for s in ("train", "val", "test")] == [3, 1, 3]
    samples = {s["id"]: s for split in ("train", "val", "test") for s in dm.dataset(split)}
    assert "S1__Walking_0" in samples and len(samples) == 7
    for sample in samples.values():
        check_sample(sample, "box")
    expected = boxes_to_mask(SIZE, SIZE, [(4, 4, 8, 12), (12, 0, 16, 3.2)])
    assert np.array_equal(samples["S1__Walking_0"]["mask"].numpy(), expected)
    assert not samples["S2__Empty"]["mask"].any()
    no_split = Human36MDataModule(root=make_h36m(tmp_path / "b", with_split=False), **kw(test_fraction=0.5, val_fraction=0))
    assert len(no_split.dataset("train")) == 3 and len(no_split.dataset("test")) == 4  # round(0.5 * 7)


# ============================================================================================ Chest X-ray
def test_chest_xray_ms_cxr_style(tmp_path):
    root = make_chest_xray(tmp_path)
    dm = ChestXrayDataModule(root=root, **kw())
    assert [len(dm.dataset(s)) for s in ("train", "val", "test")] == [3, 1, 1]  # the official val split is used
    first = next(s for s in dm.dataset("train") if s["id"].endswith("d000"))
    check_sample(first, "box")
    assert torch.allclose(first["image"][0], first["image"][1])  # grayscale replicated
    assert dm.dataset("train").converted == 3
    expected = boxes_to_mask(SIZE, SIZE, [(4, 4, 8, 12), (12, 0, 16, 3.2)])  # union of both findings
    assert np.array_equal(first["mask"].numpy(), expected)
    only = ChestXrayDataModule(root=root, **kw(category="pneumonia"))
    first = next(s for s in only.dataset("train") if s["id"].endswith("d000"))
    assert np.array_equal(first["mask"].numpy(), boxes_to_mask(SIZE, SIZE, [(4, 4, 8, 12)]))
    by_dicom = ChestXrayDataModule(root=root, **kw(path_column="dicom_id"))
    assert {s["id"] for s in by_dicom.dataset("test")} == {"d004"}


def test_chest_xray_images_in_a_linked_folder_are_found_by_dicom_id(tmp_path):
    """images/files/ kept on another disk and linked in: found by dicom id as in a plain tree."""
    root = make_chest_xray(tmp_path)
    shutil.move(root / "images" / "files", tmp_path / "elsewhere")
    (root / "images" / "files").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    by_dicom = ChestXrayDataModule(root=root, **kw(path_column="dicom_id"))
    assert [len(by_dicom.dataset(s)) for s in ("train", "val", "test")] == [3, 1, 1]


# =========================================================================================== image folder
def test_image_folder_with_masks(tmp_path):
    root = tmp_path / "birds"
    masks = root / "masks"  # inside root: must not be read as images
    for n in range(4):
        write_image(root / "sub" / f"img{n}.jpg", w=32, h=32, seed=n)
        m = np.zeros((32, 32), np.uint8)
        m[8:24, 8:24] = 255
        (masks / "sub").mkdir(parents=True, exist_ok=True)
        Image.fromarray(m, "L").save(masks / "sub" / f"img{n}.png")
    dm = ImageFolderDataModule(root=root, **kw(masks_root=str(masks), test_fraction=0.5, val_fraction=0))
    assert dm.truth == "mask"
    assert len(dm.dataset("train")) == 2 and len(dm.dataset("test")) == 2
    sample = dm.dataset("test")[0]
    check_sample(sample, "mask")
    assert sample["mask"][4:12, 4:12].all() and sample["mask"].sum() == 64
    plain = ImageFolderDataModule(root=root / "sub", **kw(val_fraction=0))
    assert plain.truth is None and len(plain.dataset("train")) == 4 and len(plain.dataset("test")) == 4
    check_sample(plain.dataset("train")[0], None)


def test_image_folder_presplit(tmp_path):
    for split, n in (("train", 3), ("test", 2)):
        for i in range(n):
            write_image(tmp_path / split / f"{i}.png", seed=i)
    dm = ImageFolderDataModule(root=tmp_path, **kw(val_fraction=0))
    assert len(dm.dataset("train")) == 3 and len(dm.dataset("test")) == 2
    assert dm.dataset("test")[0]["id"] == "test__0"


def test_corrupt_grayscale_rgba_16bit_are_handled(tmp_path, caplog):
    root = tmp_path / "mixed"
    write_image(root / "a_rgb.jpg", seed=1)
    write_image(root / "b_gray.png", mode="L", seed=2)
    write_image(root / "c_rgba.png", mode="RGBA", seed=3)
    Image.fromarray((np.arange(20 * 40).reshape(20, 40) * 80).astype(np.uint16)).save(root / "d_16bit.png")
    assert Image.open(root / "d_16bit.png").mode == "I;16"
    (root / "e_corrupt.jpg").write_bytes(np.random.default_rng(5).integers(0, 256, 2048, dtype=np.uint8).tobytes())
    dm = ImageFolderDataModule(root=root, **kw(val_fraction=0))
    with caplog.at_level(logging.INFO, logger="conceptdistill.data"):
        dm.setup("fit")
    train = dm.dataset("train")
    assert len(train) == 4 and train.skipped == 1 and train.converted == 3
    assert "skipped 1 unreadable image(s)" in caplog.text and "e_corrupt.jpg" in caplog.text
    assert "converted 3 image(s)" in caplog.text
    stats = dm.stats()["train"]
    assert stats["converted_modes"] == {"L": 1, "RGBA": 1, "I;16": 1} and stats["skipped_paths"][0].endswith("e_corrupt.jpg")
    batch = collate_samples([train[i] for i in range(len(train))])
    assert batch["image"].shape == (4, 3, SIZE, SIZE) and "mask" not in batch
    sixteen = next(s for s in train if s["id"] == "d_16bit")["image"]
    assert float(sixteen.max()) > 0.5  # scaled by 65535, not truncated to 8 bits or left as raw counts
    loader = dm.dataloader("train", batch_size=4)
    assert next(iter(loader))["image"].shape == (4, 3, SIZE, SIZE)
    ds = ImageListDataset.scan([ImageRecord("x", root / "e_corrupt.jpg"), ImageRecord("y", root / "a_rgb.jpg")],
                               image_size=SIZE, workers=1)
    assert len(ds) == 1 and ds.skipped == 1 and ds.converted == 0


# ============================================================================================ layout errors
@pytest.mark.parametrize(
    "cls, env, must_mention",
    [
        (CUBDataModule, "CUB_ROOT", ["images.txt", "train_test_split.txt", "segmentations"]),
        (StanfordDogsDataModule, "STANFORD_DOGS_ROOT", ["Annotation", "train_list.mat"]),
        (StanfordCarsDataModule, "STANFORD_CARS_ROOT", ["cars_train", "cars_train_annos.mat"]),
        (Human36MDataModule, "HUMAN36M_ROOT", ["frames", "boxes.csv"]),
        (ChestXrayDataModule, "CHEST_XRAY_ROOT", ["images", "x, y, w, h"]),
        (ImageFolderDataModule, "IMAGE_FOLDER_ROOT", ["jpg"]),
    ],
)
def test_missing_or_wrong_root_explains_layout(tmp_path, cls, env, must_mention):
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetLayoutError) as info:
        cls(root=missing, **kw())
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert cls.name in message and str(missing) in message and env in message and "data.root=" in message
    assert "Official files" in message and "\n" not in message
    for word in must_mention:
        assert word in message
    with pytest.raises(DatasetLayoutError, match="no root"):
        cls(root=None, **kw())
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetLayoutError, match="missing|no image"):
        cls(root=tmp_path / "empty", **kw())


def test_cub_layout_error_names_missing_segmentations(tmp_path):
    root = make_cub(tmp_path)
    import shutil

    shutil.rmtree(root / "segmentations")
    with pytest.raises(DatasetLayoutError, match="segmentations"):
        CUBDataModule(root=root, **kw())


# ================================================================================================ configs
CONF = Path(__file__).resolve().parents[2] / "conf" / "data"


@pytest.mark.parametrize(
    "name, maker",
    [
        ("cub", lambda p: make_cub(p)),
        ("stanford_dogs", lambda p: make_dogs(p)[0]),
        ("stanford_cars", make_cars),
        ("human36m", make_h36m),
        ("folder", lambda p: (write_image(p / "imgs" / "a.jpg"), p / "imgs")[1]),
    ],
)
def test_hydra_configs_instantiate(tmp_path, monkeypatch, name, maker):
    from conftest import compose
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = compose([f"data={name}", "diffusion=sd14"]).data  # image_size follows the model's native resolution
    assert cfg.image_size == 512 and cfg.resize_mode == "resize"
    assert compose([f"data={name}", "diffusion=sd21"]).data.image_size == 768
    env = OmegaConf.to_container(cfg)["root"].split(":")[1].split(",")[0]  # ${oc.env:NAME,null}
    with pytest.raises(Exception) as info:  # env var unset -> root null -> the layout error (Hydra wraps it)
        instantiate(cfg, image_size=SIZE, num_workers=0)
    assert isinstance(info.value.__cause__ or info.value, DatasetLayoutError) and env in str(info.value)
    root = maker(tmp_path)
    monkeypatch.setenv(env, str(root))
    dm = instantiate(cfg, image_size=SIZE, num_workers=0, val_fraction=0.0)
    check_sample(dm.dataset("train")[0], dm.truth)


def test_chest_config_keys_are_constructor_args(tmp_path):
    import inspect

    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(OmegaConf.load(CONF / "chest_xray.yaml"))
    params = set()
    for klass in ChestXrayDataModule.__mro__:
        if "__init__" in vars(klass):
            params |= set(inspect.signature(klass.__init__).parameters)
    assert set(cfg) - {"_target_"} <= params


def test_threaded_scan_matches_serial(tmp_path):
    records = [ImageRecord(f"i{n}", write_image(tmp_path / f"{n}.png", w=8, h=8, seed=n, mode="L" if n % 3 else "RGB"))
               for n in range(20)]
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    records.append(ImageRecord("bad", tmp_path / "bad.png"))
    threaded, serial = scan_records(records, workers=2), scan_records(records, workers=1)
    assert [r.id for r in threaded.kept] == [r.id for r in serial.kept] == [f"i{n}" for n in range(20)]
    assert threaded.skipped == serial.skipped == 1 and threaded.converted == serial.converted == 13
