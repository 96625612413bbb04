"""Inputs that used to give a wrong number without a word: each must now be read right, or end in a clear
error or a counted, logged skip.

Mask encodings, mask/image size disagreements, EXIF orientation, every entry of an image folder, sample id
collisions, the sample id rule, and the permissions of written files.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from trees import make_messy_folder, write_image, write_oriented_jpeg

from conceptdistill.data.datasets.image_folder import ImageFolderDataModule
from conceptdistill.data.decoding import image_size, load_mask, load_rgb
from conceptdistill.data.image_list import ImageListDataset
from conceptdistill.data.scanning import ImageRecord, scan_records
from conceptdistill.utils.io import save_array, save_mask_png, write_json

SIZE = 16


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    for name in ("IMAGE_FOLDER_ROOT", "IMAGE_FOLDER_MASKS"):
        monkeypatch.delenv(name, raising=False)


def kw(**extra):
    return {"image_size": SIZE, "batch_size": 2, "num_workers": 0, "scan_workers": 1, "val_fraction": 0, **extra}


# ================================================================================ 1. mask encodings
EXPECTED = np.zeros((6, 8), bool)
EXPECTED[1:5, 2:6] = True
EXPECTED[0, 7] = True


def _gray(fg, bg=0, dtype=np.uint8) -> np.ndarray:
    return np.where(EXPECTED, fg, bg).astype(dtype)


def _soft_cub() -> np.ndarray:
    """CUB's averaged annotators: foreground pixels 153/204/255 (> half agree), background 0/51/102."""
    values = np.where(EXPECTED, 204, 51).astype(np.uint8)
    values[1, 2], values[2, 2], values[0, 7] = 255, 153, 153
    values[5, 0], values[5, 1], values[0, 0] = 0, 102, 102
    return values


def _rgb_on_black() -> np.ndarray:
    rgb = np.zeros((6, 8, 3), np.uint8)
    rgb[EXPECTED] = (200, 30, 0)  # a drawing tool's colour on black
    return rgb


def _rgba_transparent_background() -> np.ndarray:
    rgba = np.full((6, 8, 4), 255, np.uint8)  # white everywhere, transparent where background
    rgba[..., 3] = np.where(EXPECTED, 255, 0)
    return rgba


def _palette() -> Image.Image:
    image = Image.fromarray(np.where(EXPECTED, 2, 0).astype(np.uint8), "P")
    image.putpalette([0, 0, 0, 255, 255, 255, 200, 0, 0] + [0] * 759)
    return image


ENCODINGS = {
    "8-bit 0/255": (lambda: Image.fromarray(_gray(255), "L"), "png", ("L",)),
    "8-bit 0/1 label map": (lambda: Image.fromarray(_gray(1), "L"), "png", ("L",)),
    "16-bit 0/1": (lambda: Image.fromarray(_gray(1, dtype=np.uint16)), "png", ("I;16", "I")),
    "16-bit 0/255": (lambda: Image.fromarray(_gray(255, dtype=np.uint16)), "png", ("I;16", "I")),
    "16-bit 0/65535": (lambda: Image.fromarray(_gray(65535, dtype=np.uint16)), "png", ("I;16", "I")),
    "32-bit int 0/1": (lambda: Image.fromarray(_gray(1, dtype=np.int32)), "tif", ("I",)),
    "palette index": (_palette, "png", ("P",)),
    "RGB on black": (lambda: Image.fromarray(_rgb_on_black(), "RGB"), "png", ("RGB",)),
    "RGBA transparent background": (lambda: Image.fromarray(_rgba_transparent_background(), "RGBA"), "png", ("RGBA",)),
    "bilevel": (lambda: Image.fromarray(EXPECTED), "png", ("1",)),
    "CUB soft 0..255": (lambda: Image.fromarray(_soft_cub(), "L"), "png", ("L",)),
}


@pytest.mark.parametrize("encoding", list(ENCODINGS))
def test_every_mask_encoding_reads_as_the_same_mask(tmp_path, encoding):
    make, ext, modes = ENCODINGS[encoding]
    path = tmp_path / f"mask.{ext}"
    make().save(path)
    assert Image.open(path).mode in modes  # the file really is stored in the encoding under test
    mask = load_mask(path, 0.5)
    assert mask.dtype == bool and mask.shape == EXPECTED.shape
    assert np.array_equal(mask, EXPECTED), encoding


def test_mask_threshold_applies_to_soft_masks_only(tmp_path):
    Image.fromarray(_soft_cub(), "L").save(tmp_path / "soft.png")
    strict = load_mask(tmp_path / "soft.png", 0.7)  # 153 / 255 = 0.6 is no longer enough; 204 / 255 = 0.8 is
    assert np.array_equal(strict, EXPECTED & (_soft_cub() > 178))
    Image.fromarray(_gray(1), "L").save(tmp_path / "label.png")
    assert np.array_equal(load_mask(tmp_path / "label.png", 0.7), EXPECTED)  # a label map has no soft values


# ========================================================================= 2. mask size vs image size
def _pair(tmp_path: Path, name: str, mask_wh: tuple[int, int], image_wh=(48, 40)) -> ImageRecord:
    image = write_image(tmp_path / f"{name}.jpg", w=image_wh[0], h=image_wh[1], seed=1)
    mask = np.zeros(mask_wh[::-1], np.uint8)
    mask[: mask_wh[1] // 2] = 255  # top half
    Image.fromarray(mask, "L").save(tmp_path / f"{name}_mask.png")
    return ImageRecord(name, image, tmp_path / f"{name}_mask.png")


def test_mask_of_another_aspect_is_a_counted_skip_naming_both_files(tmp_path, caplog):
    records = [_pair(tmp_path, "same", (48, 40)), _pair(tmp_path, "half", (24, 20)), _pair(tmp_path, "odd", (24, 21)),
               _pair(tmp_path, "wrong", (97, 13))]
    with caplog.at_level(logging.WARNING, logger="conceptdistill.data"):
        ds = ImageListDataset.scan(records, image_size=SIZE, truth="mask", workers=1)
    assert ds.sample_ids() == ["same", "half", "odd"]
    assert ds.skipped == 1 and ds.report.summary()["skipped_kinds"] == {"mask size mismatch": 1}
    (path, kind, reason), = ds.report.skipped_items
    assert kind == "mask size mismatch"
    for words in ("wrong.jpg", "wrong_mask.png", "48x40", "97x13"):
        assert words in reason and words in caplog.text
    expected = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    expected[: SIZE // 2] = True
    for sample in ds:  # a mask stored at half resolution covers the same picture
        assert torch.equal(sample["mask"], expected), sample["id"]


# ============================================================================== 3. EXIF orientation
def _portrait(tmp_path: Path) -> tuple[Path, np.ndarray]:
    """A 40 x 24 (w x h) JPEG with EXIF orientation 6: a viewer shows it 24 wide and 40 high. The stored
    left half is white, so the displayed TOP half is white; the returned mask (40 rows x 24 columns) marks it."""
    stored = np.zeros((24, 40, 3), np.uint8)
    stored[:, :20] = 255
    path = write_oriented_jpeg(tmp_path / "portrait.jpg", stored, 6)
    shown = np.zeros((40, 24), bool)
    shown[:20] = True
    return path, shown


def test_exif_orientation_is_applied_to_images_and_masks_alike(tmp_path, caplog):
    path, shown = _portrait(tmp_path)
    assert Image.open(path).size == (40, 24)  # stored landscape
    assert image_size(path) == (40, 24)  # (h, w) as displayed: portrait
    assert load_rgb(path).shape == (40, 24, 3)
    assert np.allclose(load_rgb(path), np.asarray(ImageOps.exif_transpose(Image.open(path)), np.float32) / 255)
    Image.fromarray(shown).save(tmp_path / "drawn_on_screen.png")
    Image.fromarray(shown.T.copy()).save(tmp_path / "drawn_on_stored_pixels.png")
    records = [ImageRecord("screen", path, tmp_path / "drawn_on_screen.png"),
               ImageRecord("stored", path, tmp_path / "drawn_on_stored_pixels.png")]
    with caplog.at_level(logging.WARNING, logger="conceptdistill.data"):
        ds = ImageListDataset.scan(records, image_size=SIZE, truth="mask", workers=1)
    assert ds.sample_ids() == ["screen"]
    sample = ds[0]
    assert float(sample["image"][:, sample["mask"]].mean()) > 0.9  # the white half is the marked half
    assert float(sample["image"][:, ~sample["mask"]].mean()) < 0.1
    (_, kind, reason), = ds.report.skipped_items
    assert kind == "mask size mismatch" and "EXIF" in reason and "40x24" in reason and "24x40" in reason


def test_exif_orientation_in_an_image_folder_and_box_frames(tmp_path):
    path, shown = _portrait(tmp_path / "photos")
    (tmp_path / "masks").mkdir()
    Image.fromarray(shown).save(tmp_path / "masks" / "portrait.png")
    dm = ImageFolderDataModule(root=tmp_path / "photos", **kw(masks_root=str(tmp_path / "masks")))
    sample = dm.dataset("test")[0]
    assert float(sample["image"][:, sample["mask"]].mean()) > 0.9
    # boxes are given on the displayed picture; a frame that fits only the stored pixels is a counted skip
    box = ((0.0, 0.0, 24.0, 20.0),)
    records = [ImageRecord("shown", path, boxes=box, box_frame=(24.0, 40.0)),
               ImageRecord("halved", path, boxes=((0.0, 0.0, 12.0, 10.0),), box_frame=(12.0, 20.0)),
               ImageRecord("stored", path, boxes=box, box_frame=(40.0, 24.0))]
    ds = ImageListDataset.scan(records, image_size=SIZE, truth="box", workers=1)
    assert ds.sample_ids() == ["shown", "halved"] and ds.report.summary()["skipped_kinds"] == {"box frame mismatch": 1}
    for sample in ds:
        assert float(sample["image"][:, sample["mask"]].mean()) > 0.9 and sample["mask"].sum() == SIZE * SIZE // 2


# ===================================================================== 4. every folder entry is accounted for
def test_every_entry_of_an_image_folder_is_kept_or_a_counted_skip(tmp_path, caplog):
    root, entries = make_messy_folder(tmp_path)
    with caplog.at_level(logging.WARNING, logger="conceptdistill.data"):
        dm = ImageFolderDataModule(root=root, **kw())
        train = dm.dataset("train")
    stats = dm.stats()["train"]
    assert stats["kept"] + stats["skipped"] == len(entries)
    kept = {str(r.image.relative_to(root)) for r in train.records}
    assert kept == {rel for rel, kind in entries.items() if kind is None}
    skipped = {str(Path(p).relative_to(root)): kind for p, kind, _ in train.report.skipped_items}
    assert skipped == {rel: kind for rel, kind in entries.items() if kind is not None}
    kinds = {kind for kind in entries.values() if kind is not None}
    assert stats["skipped_kinds"] == {k: sum(v == k for v in entries.values()) for k in kinds}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == len(kinds)  # one line per kind
    for kind in kinds:
        assert sum(f"[{kind}]" in line for line in warnings) == 1, kind
    assert all(len(s["image"]) == 3 for s in train)  # nothing left that a loader worker could fail on


def test_presplit_folder_accounts_for_entries_outside_train_and_test(tmp_path):
    for split in ("train", "test"):
        write_image(tmp_path / split / "a.png", seed=1)
    write_image(tmp_path / "stray.png", seed=2)
    (tmp_path / "README.txt").write_text("train/ and test/ hold the images\n")
    dm = ImageFolderDataModule(root=tmp_path, **kw())
    assert len(dm.dataset("train")) == 1 and len(dm.dataset("test")) == 1
    stats = dm.stats()
    assert stats["train"]["skipped_kinds"] == {"outside train/ and test/": 1, "not an image file": 1}
    assert stats["test"]["skipped"] == 0


# ========================================================================= 5. duplicate sample ids
@pytest.mark.parametrize("names", [("a b.jpg", "a_b.jpg"), ("x.jpg", "x.png"), ("p/q.jpg", "p__q.jpg")])
def test_colliding_sample_ids_name_every_file_and_the_rule(tmp_path, names):
    for n, name in enumerate(names):
        write_image(tmp_path / name, seed=n)
    dm = ImageFolderDataModule(root=tmp_path, **kw())
    with pytest.raises(ValueError) as info:
        dm.dataset("train")
    message = str(info.value)
    for name in names:
        assert str(tmp_path / name) in message
    for words in ("without its extension", "'__'", "[A-Za-z0-9._+-]", "rename"):
        assert words in message


def test_duplicate_ids_are_found_before_any_file_is_decoded(tmp_path, monkeypatch):
    import conceptdistill.data.scanning as images

    records = [ImageRecord("x", tmp_path / "x.jpg"), ImageRecord("x", tmp_path / "x.png")]
    monkeypatch.setattr(images, "_probe", lambda path: pytest.fail("decoded before checking ids"))
    with pytest.raises(ValueError, match="x.jpg.*x.png"):
        ImageListDataset.scan(records, image_size=SIZE, workers=1)


# ================================================================================= 6. the sample id rule
def test_nested_image_id_and_the_documented_rule(tmp_path):
    write_image(tmp_path / "a" / "b.jpg")
    write_image(tmp_path / "c d+e.png")
    dm = ImageFolderDataModule(root=tmp_path, **kw())
    assert dm.dataset("train").sample_ids() == ["a__b", "c_d+e"]
    import conceptdistill.stages.predict as predict

    assert "`a/b.jpg` -> `a__b.png`" in predict.__doc__ and "a_b.png" not in predict.__doc__
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert "`a/b.jpg` -> `a__b`" in readme


# ===================================================================== 7. written files follow the umask
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_follow_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        save_mask_png(tmp_path / "m.png", np.eye(4, dtype=bool))
        write_json(tmp_path / "d.json", {"a": 1})
        save_array(tmp_path / "a.npy", np.zeros(3))
    finally:
        os.umask(old)
    for name in ("m.png", "d.json", "a.npy"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name


def test_scan_of_records_in_threads_counts_the_same(tmp_path):
    root, entries = make_messy_folder(tmp_path)
    records = ImageFolderDataModule(root=root, **kw()).records("train")
    threaded, serial = scan_records(records * 3, workers=2), scan_records(records * 3, workers=1)
    assert threaded.summary() == serial.summary() and threaded.skipped + len(threaded.kept) == 3 * len(entries)
