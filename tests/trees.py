"""Tiny data set trees in each reader's official layout, shared by the reader tests and the end-to-end runs.

Every builder writes under the folder it is given and returns the data set root (Stanford Dogs: also the boxes
it wrote). Images are small random-noise pictures; nothing is ever downloaded.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.io import savemat


def write_image(path: Path, w: int = 40, h: int = 20, mode: str = "RGB", seed: int = 0, fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode).save(path, format=fmt)
    return path


def cell(strings) -> np.ndarray:
    """A MATLAB cell column of strings, as savemat writes it (and loadmat reads it back: (N, 1) object array)."""
    array = np.empty((len(strings), 1), dtype=object)
    for i, s in enumerate(strings):
        array[i, 0] = s
    return array


def make_cub(tmp_path: Path, segmentations_beside: bool = False) -> Path:
    root = tmp_path / "CUB_200_2011"
    seg_root = (tmp_path if segmentations_beside else root) / "segmentations"
    entries = []
    for n, (cls, name) in enumerate([
        ("001.Black_footed_Albatross", "Black_Footed_Albatross_0046_18"),
        ("001.Black_footed_Albatross", "Black_Footed_Albatross_0009_34"),
        ("002.Laysan_Albatross", "Laysan_Albatross_0002_1027"),
        ("002.Laysan_Albatross", "Laysan_Albatross_0003_1033"),
        ("003.Sooty_Albatross", "Sooty_Albatross_0001_1071"),
        ("003.Sooty_Albatross", "Sooty_Albatross_0003_1078"),
    ], start=1):
        write_image(root / "images" / cls / f"{name}.jpg", w=32, h=24, seed=n)
        soft = np.zeros((24, 32), np.uint8)
        soft[:, :16] = 153  # 3 of 5 annotators: foreground
        soft[:, 16:24] = 102  # 2 of 5: background
        (seg_root / cls).mkdir(parents=True, exist_ok=True)
        Image.fromarray(soft, "L").save(seg_root / cls / f"{name}.png")
        entries.append((n, f"{cls}/{name}.jpg", 1 if n <= 4 else 0))
    (root / "images.txt").write_text("".join(f"{n} {rel}\n" for n, rel, _ in entries))
    (root / "train_test_split.txt").write_text("".join(f"{n} {flag}\n" for n, _, flag in entries))
    return root


DOG_XML = """<annotation>
  <folder>02085620</folder><filename>{name}</filename>
  <source><database>ImageNet database</database></source>
  <size><width>{w}</width><height>{h}</height><depth>3</depth></size>
  <segment>0</segment>
  {objects}
</annotation>"""
DOG_OBJECT = """<object><name>Chihuahua</name><pose>Unspecified</pose><truncated>0</truncated><difficult>0</difficult>
    <bndbox><xmin>{}</xmin><ymin>{}</ymin><xmax>{}</xmax><ymax>{}</ymax></bndbox></object>"""


def make_dogs(tmp_path: Path) -> tuple[Path, dict]:
    root = tmp_path / "stanford_dogs"
    boxes = {}
    lists = {"train": [], "test": []}
    items = [("n02085620-Chihuahua", "n02085620_10074", "train"), ("n02085620-Chihuahua", "n02085620_10131", "test"),
             ("n02085782-Japanese_spaniel", "n02085782_1039", "train"), ("n02085782-Japanese_spaniel", "n02085782_82", "train"),
             ("n02085782-Japanese_spaniel", "n02085782_919", "test")]
    for n, (synset, name, split) in enumerate(items):
        write_image(root / "Images" / synset / f"{name}.jpg", w=40, h=20, seed=n)
        box_list = [(11, 6, 20, 15)] if n != 0 else [(1, 1, 10, 10), (31, 11, 40, 20)]  # two dogs in the first
        boxes[name] = box_list
        objects = "\n".join(DOG_OBJECT.format(*b) for b in box_list)
        ann = root / "Annotation" / synset / name  # no extension, as in annotation.tar
        ann.parent.mkdir(parents=True, exist_ok=True)
        ann.write_text(DOG_XML.format(name=name, w=40, h=20, objects=objects))
        lists[split].append((f"{synset}/{name}.jpg", f"{synset}/{name}", float(n % 2 + 1)))
    for split, entries in lists.items():
        savemat(root / f"{split}_list.mat", {
            "file_list": cell([e[0] for e in entries]),
            "annotation_list": cell([e[1] for e in entries]),
            "labels": np.array([[e[2]] for e in entries]),
        })
    return root, boxes


def cars_struct(rows, with_class=True) -> np.ndarray:
    """An 'annotations' 1 x N struct array like the devkit's (uint8/uint16 1x1 fields, fname a char array)."""
    fields = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2"] + (["class"] if with_class else []) + ["fname"]
    array = np.empty((1, len(rows)), dtype=[(f, object) for f in fields])
    for i, (box, cls, fname) in enumerate(rows):
        values = [np.array([[v]], dtype=np.uint16) for v in box] + ([np.array([[cls]], np.uint8)] if with_class else [])
        array[0, i] = tuple(values + [np.array([fname])])
    return array


def make_cars(tmp_path: Path) -> Path:
    root = tmp_path / "stanford_cars"
    train_rows = [((11, 6, 20, 15), 14, "00001.jpg"), ((1, 1, 40, 20), 3, "00002.jpg"), ((21, 1, 40, 10), 91, "00003.jpg")]
    test_rows = [((11, 6, 20, 15), 181, "00001.jpg"), ((2, 2, 39, 19), 103, "00002.jpg")]
    for n, (_, _, fname) in enumerate(train_rows):
        write_image(root / "cars_train" / fname, w=40, h=20, seed=n)
    for n, (_, _, fname) in enumerate(test_rows):
        write_image(root / "cars_test" / fname, w=40, h=20, seed=10 + n)
    (root / "devkit").mkdir(parents=True)
    savemat(root / "devkit" / "cars_train_annos.mat", {"annotations": cars_struct(train_rows)})
    savemat(root / "devkit" / "cars_test_annos.mat", {"annotations": cars_struct(test_rows, with_class=False)})
    savemat(root / "cars_test_annos_withlabels.mat", {"annotations": cars_struct(test_rows)})
    savemat(root / "devkit" / "cars_meta.mat", {"class_names": cell(["AM General Hummer SUV 2000"]).T})
    return root


def make_h36m(tmp_path: Path, with_split: bool = True) -> Path:
    root = tmp_path / "h36m"
    rows = []
    for n in range(6):
        rel = f"S{1 + n % 2}/Walking_{n}.{'png' if n % 2 else 'jpg'}"
        write_image(root / "frames" / rel, w=40, h=20, seed=n)
        split = "test" if n >= 4 else "train"
        rows.append([rel, 10, 5, 20, 15, split])
    rows.append(["S1/Walking_0.jpg", 30, 0, 40, 4, "train"])  # a second box on the first frame
    write_image(root / "frames" / "S2" / "Empty.png", w=40, h=20, seed=9)
    rows.append(["S2/Empty.png", "", "", "", "", "test"])  # listed frame without a person
    with open(root / "boxes.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "x0", "y0", "x1", "y1"] + (["split"] if with_split else []))
        for row in rows:
            writer.writerow(row if with_split else row[:5])
    return root


def make_chest_xray(tmp_path: Path) -> Path:
    """An MS-CXR-style tree: grayscale JPEGs under images/ and one CSV naming the .dcm paths, with boxes drawn
    on an 80 x 40 original of each 40 x 20 image, an official split column and a second finding on d000."""
    root = tmp_path / "ms_cxr"
    header = ["dicom_id", "category_name", "label_text", "path", "x", "y", "w", "h", "image_width", "image_height", "split"]
    rows = []
    for n in range(5):
        dicom = f"d{n:03d}"
        rel = f"files/p10/p1000{n}/s5000{n}/{dicom}"
        gray = np.random.default_rng(n).integers(0, 256, (20, 40), dtype=np.uint8)
        (root / "images" / Path(rel).parent).mkdir(parents=True, exist_ok=True)
        Image.fromarray(gray, "L").save(root / "images" / f"{rel}.jpg")  # the CSV names the .dcm
        split = "test" if n == 4 else "val" if n == 3 else "train"
        # boxes drawn on an 80 x 40 original: halve them for the stored 40 x 20 image
        rows.append([dicom, "Pneumonia", "opacity", f"{rel}.dcm", 20, 10, 20, 20, 80, 40, split])
    rows.append(["d000", "Cardiomegaly", "big heart", "files/p10/p10000/s50000/d000.dcm", 60, 0, 20, 8, 80, 40, "train"])
    (root / "images").mkdir(exist_ok=True)
    with open(root / "MS_CXR_Local_Alignment_v1.1.0.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return root


def write_oriented_jpeg(path: Path, stored: np.ndarray, orientation: int) -> Path:
    """A JPEG whose pixels are `stored` (H, W, 3) uint8 and whose EXIF Orientation tag is `orientation`
    (6: a viewer rotates it 90 degrees clockwise, as phones write portrait photos)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(stored).save(path, format="JPEG", quality=95, exif=exif)
    return path


def make_messy_folder(tmp_path: Path) -> tuple[Path, dict[str, str | None]]:
    """An image folder in which every kind of entry a real folder collects appears once.

    Returns (root, entries): every entry under root (relative path) -> the skip kind the reader must report,
    or None for an image that must be kept. Plain sub-folders are containers, not entries; a folder named
    like an image is an entry (and its contents are entries of their own).
    """
    import os

    root = tmp_path / "messy"
    entries: dict[str, str | None] = {}
    for n, rel in enumerate(["a.jpg", "sub/b.png", "sub/deeper/c.JPG"]):
        write_image(root / rel, seed=n)
        entries[rel] = None
    write_image(root / "gray.png", mode="L", seed=7)
    entries["gray.png"] = None
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG" * 20)
    entries["corrupt.jpg"] = "unreadable image"
    (root / "text.png").write_text("a text file with an image extension\n")
    entries["text.png"] = "unreadable image"
    (root / "notes.txt").write_text("where these pictures come from\n")
    entries["notes.txt"] = "not an image file"
    (root / "sub" / "Thumbs.db").write_bytes(b"\x00" * 64)
    entries["sub/Thumbs.db"] = "not an image file"
    (root / ".DS_Store").write_bytes(b"\x00" * 64)
    entries[".DS_Store"] = "hidden file or folder"
    write_image(root / ".thumbnails" / "a.jpg", seed=8)  # a viewer's cache: not part of the data
    entries[".thumbnails"] = "hidden file or folder"
    os.symlink(root / "gone.jpg", root / "dangling.jpg")
    entries["dangling.jpg"] = "broken link"
    (root / "album.jpg").mkdir()
    entries["album.jpg"] = "folder named like an image"
    write_image(root / "album.jpg" / "inside.png", seed=9)
    entries["album.jpg/inside.png"] = None
    write_image(tmp_path / "elsewhere" / "linked.png", seed=10)
    os.symlink(tmp_path / "elsewhere" / "linked.png", root / "link_to_image.png")
    entries["link_to_image.png"] = None
    os.symlink(tmp_path / "elsewhere", root / "linked_folder")  # a linked folder is read like a folder
    entries["linked_folder/linked.png"] = None
    os.symlink(root / "sub", root / "sub" / "deeper" / "loop")  # a link back up the tree
    entries["sub/deeper/loop"] = "folder link already read"
    if hasattr(os, "mkfifo"):
        os.mkfifo(root / "pipe.png")  # opening it to decode would block forever
        entries["pipe.png"] = "not a regular file"
    return root, entries


def make_folder(tmp_path: Path) -> Path:
    """A folder of images in two subfolders, with a binary mask per image under a `masks` folder beside it
    (the same relative path, `.png`); returns the images' root."""
    root, masks = tmp_path / "images", tmp_path / "masks"
    rng = np.random.default_rng(5)
    for index, rel in enumerate(["a/one.jpg", "a/two.png", "b/three.jpg", "b/four.jpg", "five.png", "six.jpg"]):
        write_image(root / rel, w=40, h=32, seed=20 + index)
        mask = np.zeros((32, 40), dtype=np.uint8)
        top, left = rng.integers(2, 12), rng.integers(2, 16)
        mask[top: top + 14, left: left + 18] = 255
        (masks / rel).with_suffix(".png").parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask).save((masks / rel).with_suffix(".png"))
    return root
