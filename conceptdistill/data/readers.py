"""Readers for the real data sets, in their official layouts. All share `FileDataModule`.

Every reader takes (Hydra config ``data.*``):

- ``root``: the data set folder. When null, the reader's environment variable is used (below; the configs
  in ``conf/data/`` also read it). ``~`` and ``$VARS`` are expanded.
- ``image_size`` (512, the paper's), ``resize_mode`` ("resize": stretch to square, the paper's; "pad":
  centre-pad to square, then resize), ``batch_size``, ``num_workers``.
- ``val_fraction`` (default 0: no stage uses a val split, so D keeps the whole train split): "val" is a deterministic slice of the official train split, chosen by a
  hash of (``split_seed``, sample id) so it does not depend on file order or on unreadable files; "train"
  is the rest. A data set with an official validation split uses it instead.
- ``max_images``: keep at most this many images per split (again a hash-ordered, class-balanced-in-
  expectation subset) for quick runs; null = all.
- ``scan_workers``: threads for the setup scan that drops unreadable files (default min(8, CPUs)).

| class | env var | truth | specifics |
|---|---|---|---|
| `CUBDataModule` | CUB_ROOT (+ CUB_SEGMENTATIONS_ROOT) | mask | ``segmentations_root``, ``mask_threshold`` |
| `StanfordDogsDataModule` | STANFORD_DOGS_ROOT | box | |
| `StanfordCarsDataModule` | STANFORD_CARS_ROOT | box | |
| `Human36MDataModule` | HUMAN36M_ROOT | box | ``csv``, ``frames_dir``, ``test_fraction`` |
| `ChestXrayDataModule` | CHEST_XRAY_ROOT | box | ``csv``, ``images_dir``, ``path_column``, ``category``, ``test_fraction`` |
| `ImageFolderDataModule` | IMAGE_FOLDER_ROOT (+ IMAGE_FOLDER_MASKS) | mask or None | ``masks_root``, ``test_fraction``, ``mask_threshold`` |

A wrong or missing root raises `DatasetLayoutError` (a `FileNotFoundError`) whose message names the data
set, the root looked at, how to set it, the expected layout and where the official files come from.
Sample ids are file-name safe and unique within a data set (Stanford Cars prefixes ``train_``/``test_``,
since its two folders reuse file names). An id is the image's path (CSV readers: as the CSV lists it; image
folder: under the root; CUB, Stanford Dogs and Cars: the file name alone) without its extension, with ``/``
replaced by ``__`` and every other character outside ``[A-Za-z0-9._+-]`` by ``_`` (`safe_id`): ``a/b.jpg``
becomes ``a__b``. Two files with one id (``a b.jpg`` and ``a_b.jpg``; ``x.jpg`` and ``x.png``) stop the run at
setup with an error that names them all.

Nothing listed vanishes: every listed image is kept or skipped with a kind and a reason (`scan_records`),
one warning line per kind, and `FileDataModule.stats()` counts them per split.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from conceptdistill.data.base import ConceptDataModule, Split
from conceptdistill.data.decoding import IMAGE_EXTENSIONS
from conceptdistill.data.geometry import RESIZE_MODES
from conceptdistill.data.image_list import ImageListDataset
from conceptdistill.data.scanning import ImageRecord

_SAFE_RULE = "without its extension, with '/' replaced by '__' and every other character outside [A-Za-z0-9._+-] by '_'"

log = logging.getLogger("conceptdistill.data")

Box = tuple[float, float, float, float]


class DatasetLayoutError(FileNotFoundError):
    """The data set's root is missing or does not hold the expected (official) layout."""


def safe_id(text: str) -> str:
    """A file-name-safe sample id from a path given without its extension: ``/`` (and ``\\``) become ``__``,
    every other character outside ``[A-Za-z0-9._+-]`` becomes ``_`` (``a/b c`` -> ``a__b_c``)."""
    text = text.replace("\\", "/").strip("/")
    text = text.replace("/", "__")
    return re.sub(r"[^A-Za-z0-9._+-]", "_", text) or "_"


def _hash_key(seed: int, sample_id: str, salt: str) -> bytes:
    return hashlib.sha256(f"{seed}/{salt}/{sample_id}".encode()).digest()


def hash_split(
    records: Sequence[ImageRecord], fraction: float, *, seed: int = 0, salt: str = "split"
) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """Deterministically split records into (rest, slice) with round(fraction * n) records in the slice.

    Membership depends only on (seed, salt, id), not on file order. A positive fraction of two or more
    records always gives at least one record to each side.
    """
    n = len(records)
    if fraction <= 0 or n < 2:
        return list(records), []
    k = min(n - 1, max(1, round(fraction * n)))
    order = sorted(range(n), key=lambda i: _hash_key(seed, records[i].id, salt))
    chosen = set(order[:k])
    rest = [r for i, r in enumerate(records) if i not in chosen]
    picked = [r for i, r in enumerate(records) if i in chosen]
    return rest, picked


def _mat_scalar(value):
    """Unwrap scipy.io.loadmat's nested 1x1 arrays down to a Python scalar or str."""
    while isinstance(value, np.ndarray):
        if value.size == 0:
            return None
        if value.dtype.kind == "U":  # a MATLAB char array: array(['text']) (rows of a char matrix joined)
            return "".join(str(v) for v in value.ravel())
        value = value.ravel()[0]
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _mat_strings(value) -> list[str]:
    """A MATLAB cell array of strings (as loadmat returns it, any nesting) as a list of str."""
    array = np.asarray(value, dtype=object) if not isinstance(value, np.ndarray) else value
    if array.dtype.kind == "U":
        return [str(s) for s in array.ravel()]
    return [str(_mat_scalar(item)) for item in array.ravel()]


def _load_mat(path: Path) -> dict:
    from scipy.io import loadmat

    return loadmat(str(path))


class FileDataModule(ConceptDataModule):
    """Shared logic: root resolution, layout errors, train/val/test partition, scanning, datasets.

    Subclasses set `name`, `env_var`, `layout`, `source`, `truth`, implement `_check_layout()` (raise via
    `self.layout_error`) and `_list(split)` for split "train" and "test" (and "val" when the data set has
    an official one; return None otherwise).
    """

    name: str = "data set"
    env_var: str = ""
    layout: str = ""
    source: str = ""
    #: how this reader forms sample ids, stated in the error for two files with one id
    id_rule: str = f"a sample id is the image's path under the data root {_SAFE_RULE}"

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        *,
        image_size: int = 512,
        resize_mode: str = "resize",
        batch_size: int = 4,
        num_workers: int = 4,
        val_fraction: float = 0.0,
        split_seed: int = 0,
        max_images: int | None = None,
        mask_threshold: float = 0.5,
        scan_workers: int | None = None,
    ) -> None:
        super().__init__(image_size=image_size, batch_size=batch_size, num_workers=num_workers)
        if resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {resize_mode!r}")
        if not 0.0 <= float(val_fraction) < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.resize_mode = resize_mode
        self.val_fraction = float(val_fraction)
        self.split_seed = int(split_seed)
        self.max_images = max_images
        self.mask_threshold = float(mask_threshold)
        self.scan_workers = scan_workers
        self.root = self._resolve_root(root)
        self._datasets: dict[str, ImageListDataset] = {}
        self._lists: dict[str, list[ImageRecord] | None] = {}

    # ---------------------------------------------------------------------------------- layout, errors
    def _resolve_root(self, root) -> Path:
        if root is None or str(root).strip() in ("", "None", "null"):
            root = os.environ.get(self.env_var) if self.env_var else None
        if root is None or str(root).strip() == "":
            self._root_for_message = None
            raise self.layout_error("no root folder was given")
        path = Path(os.path.expandvars(os.path.expanduser(str(root))))
        self._root_for_message = path
        if not path.is_dir():
            raise self.layout_error("the root folder does not exist" if not path.exists() else "the root is not a folder")
        self.root = path
        self._check_layout()
        return path

    def layout_error(self, problem: str) -> DatasetLayoutError:
        root = getattr(self, "_root_for_message", None)
        where = f"looked at root '{root}'" if root is not None else "no root was set"
        how = "set it with `data.root=/path`" + (f" or the {self.env_var} environment variable" if self.env_var else "")
        return DatasetLayoutError(
            f"{self.name}: {problem} ({where}; {how}). Expected layout under root: {self.layout}. "
            f"Official files: {self.source}"
        )

    def _require(self, *relative: str | Path, kind: str = "any") -> list[Path]:
        missing = []
        paths = []
        for rel in relative:
            path = self.root / rel
            ok = path.is_dir() if kind == "dir" else path.is_file() if kind == "file" else path.exists()
            if not ok:
                missing.append(str(rel))
            paths.append(path)
        if missing:
            raise self.layout_error("missing " + ", ".join(missing))
        return paths

    def _check_layout(self) -> None:  # pragma: no cover - overridden
        pass

    def _list(self, split: str) -> list[ImageRecord] | None:  # pragma: no cover - overridden
        raise NotImplementedError

    # ---------------------------------------------------------------------------------------- splits
    def _listed(self, split: str) -> list[ImageRecord] | None:
        if split not in self._lists:
            self._lists[split] = self._list(split)
        return self._lists[split]

    def records(self, split: Split) -> list[ImageRecord]:
        """The records of a split before scanning (deterministic; see the module doc)."""
        if split not in ("train", "val", "test"):
            raise ValueError(f"unknown split {split!r}")
        if split == "test":
            chosen = list(self._listed("test") or [])
        else:
            official_val = self._listed("val")
            if official_val is not None:
                chosen = list(official_val if split == "val" else self._listed("train") or [])
            else:
                rest, val = hash_split(self._listed("train") or [], self.val_fraction, seed=self.split_seed, salt="val")
                chosen = val if split == "val" else rest
        if self.max_images is not None and len(chosen) > self.max_images:
            order = sorted(chosen, key=lambda r: _hash_key(self.split_seed, r.id, "subset"))
            keep = {r.id for r in order[: int(self.max_images)]}
            chosen = [r for r in chosen if r.id in keep]
        return chosen

    def dataset(self, split: Split) -> ImageListDataset:
        if split not in self._datasets:
            self._datasets[split] = ImageListDataset.scan(
                self.records(split),
                workers=self.scan_workers,
                name=f"{self.name} {split}",
                image_size=self.image_size,
                resize_mode=self.resize_mode,
                truth=self.truth,
                mask_threshold=self.mask_threshold,
                id_rule=self.id_rule,
            )
        return self._datasets[split]

    def setup(self, stage: str | None = None) -> None:
        splits = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
        for split in splits.get(stage, ("train", "val", "test")):
            self.dataset(split)

    def stats(self) -> dict:
        """Per built split: kept / skipped / converted counts, the skipped paths and, when any were skipped,
        "skipped_kinds" (kind -> count), for a stage to report. kept + skipped = the records listed."""
        return {split: ds.report.summary() for split, ds in self._datasets.items()}

    # ------------------------------------------------------------------------------------ helpers
    def _find_file(self, *candidates: Path) -> Path | None:
        for path in candidates:
            if path.is_file():
                return path
        return None


# ================================================================================================ CUB
class CUBDataModule(FileDataModule):
    """CUB-200-2011 birds with the separately distributed segmentation masks (truth = "mask").

    Extra options: ``segmentations_root`` (default: $CUB_SEGMENTATIONS_ROOT, else root/segmentations, else
    the ``segmentations`` folder beside root — where the two official archives land when unpacked in the same
    place). The masks are soft (mean of several annotators: 0, 51, 102, ... 255); foreground =
    value / 255 > ``mask_threshold`` (default 0.5, i.e. > 127: a majority of annotators). An image whose
    mask is missing is skipped and counted.
    """

    name = "CUB-200-2011"
    env_var = "CUB_ROOT"
    truth = "mask"
    id_rule = f"a sample id is the image's file name (no folder) {_SAFE_RULE}"
    layout = (
        "images.txt ('<image_id> <class_dir>/<file>.jpg' per line), train_test_split.txt ('<image_id> <1=train|"
        "0=test>'), images/<class_dir>/<file>.jpg, and the segmentation masks segmentations/<class_dir>/<file>"
        ".png either inside root or beside it (option segmentations_root / CUB_SEGMENTATIONS_ROOT)"
    )
    source = (
        "CUB_200_2011.tgz and segmentations.tgz from https://www.vision.caltech.edu/datasets/cub_200_2011/ "
        "(Caltech DATA, doi:10.22002/D1.20098); root is the unpacked CUB_200_2011 folder"
    )

    def __init__(self, root=None, *, segmentations_root=None, **kwargs) -> None:
        self._segmentations_arg = segmentations_root
        super().__init__(root, **kwargs)

    def _check_layout(self) -> None:
        self._require("images.txt", "train_test_split.txt", kind="file")
        self._require("images", kind="dir")
        seg = self._segmentations_arg or os.environ.get("CUB_SEGMENTATIONS_ROOT")
        if seg:
            candidates = [Path(os.path.expanduser(str(seg)))]
        else:
            candidates = [self.root / "segmentations", self.root.parent / "segmentations"]
        found = next((c for c in candidates if c.is_dir()), None)
        if found is None:
            raise self.layout_error("no segmentations folder at " + " or ".join(str(c) for c in candidates))
        self.segmentations_root = found

    def _read_pairs(self, name: str) -> dict[str, str]:
        pairs: dict[str, str] = {}
        with open(self.root / name, encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                parts = line.split(maxsplit=1)
                if len(parts) != 2:
                    raise self.layout_error(f"{name} line {number} is not '<id> <value>': {line.strip()!r}")
                pairs[parts[0]] = parts[1].strip()
        return pairs

    def _list(self, split: str) -> list[ImageRecord] | None:
        if split == "val":
            return None
        images = self._read_pairs("images.txt")
        is_train = self._read_pairs("train_test_split.txt")
        want = "1" if split == "train" else "0"
        records = []
        for image_id, rel in images.items():
            flag = is_train.get(image_id)
            if flag is None:
                raise self.layout_error(f"image id {image_id} of images.txt is missing from train_test_split.txt")
            if flag != want:
                continue
            rel_path = Path(rel)
            records.append(
                ImageRecord(
                    id=safe_id(rel_path.stem),
                    image=self.root / "images" / rel_path,
                    mask=self.segmentations_root / rel_path.with_suffix(".png"),
                )
            )
        return records


# ======================================================================================== Stanford Dogs
def read_voc_boxes(path: Path) -> tuple[list[Box], tuple[float, float] | None] | None:
    """PASCAL VOC XML: all <object><bndbox> boxes (1-based inclusive corners -> continuous pixel edges)
    and the annotated (width, height) from <size> when present; None if the file is missing or malformed."""
    try:
        tree = ET.parse(path)
    except (OSError, ET.ParseError):
        return None
    root = tree.getroot()
    boxes: list[Box] = []
    for obj in root.iter("object"):
        bnd = obj.find("bndbox")
        if bnd is None:
            continue
        try:
            x0, y0, x1, y1 = (float(bnd.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
        except (TypeError, ValueError):
            return None
        boxes.append((x0 - 1.0, y0 - 1.0, x1, y1))
    frame = None
    size = root.find("size")
    if size is not None:
        try:
            w, h = float(size.findtext("width")), float(size.findtext("height"))
            frame = (w, h) if w > 0 and h > 0 else None
        except (TypeError, ValueError):
            frame = None
    return boxes, frame


class StanfordDogsDataModule(FileDataModule):
    """Stanford Dogs (truth = "box": the union of the dog boxes of each image, as the paper scores it).

    Splits from the official train_list.mat / test_list.mat ('file_list' cell arrays of
    '<synset-dir>/<file>.jpg'; 'annotation_list' when present). Boxes from Annotation/<synset-dir>/<file>
    (PASCAL VOC XML without extension, 1-based corners); every <object> in the file counts. An image whose
    annotation is missing or unreadable is skipped and counted.
    """

    name = "Stanford Dogs"
    env_var = "STANFORD_DOGS_ROOT"
    truth = "box"
    id_rule = f"a sample id is the image's file name (no folder) {_SAFE_RULE}"
    layout = (
        "Images/<synset-dir>/<file>.jpg, Annotation/<synset-dir>/<file> (PASCAL VOC XML, no extension), "
        "train_list.mat and test_list.mat (MATLAB, cell array 'file_list'; also accepted under lists/)"
    )
    source = (
        "images.tar, annotation.tar and lists.tar from http://vision.stanford.edu/aditya86/ImageNetDogs/ "
        "unpacked into one folder"
    )

    def _list_file(self, split: str) -> Path | None:
        return self._find_file(self.root / f"{split}_list.mat", self.root / "lists" / f"{split}_list.mat")

    def _check_layout(self) -> None:
        self._require("Images", "Annotation", kind="dir")
        missing = [f"{s}_list.mat" for s in ("train", "test") if self._list_file(s) is None]
        if missing:
            raise self.layout_error("missing " + ", ".join(missing))

    def _list(self, split: str) -> list[ImageRecord] | None:
        if split == "val":
            return None
        path = self._list_file(split)
        mat = _load_mat(path)
        if "file_list" not in mat:
            raise self.layout_error(f"{path.name} has no 'file_list' variable")
        files = _mat_strings(mat["file_list"])
        annotations = _mat_strings(mat["annotation_list"]) if "annotation_list" in mat else None
        if annotations is not None and len(annotations) != len(files):
            annotations = None
        records = []
        for index, rel in enumerate(files):
            rel_path = Path(rel)
            ann_rel = annotations[index] if annotations is not None else str(rel_path.with_suffix(""))
            parsed = read_voc_boxes(self.root / "Annotation" / ann_rel)
            boxes, frame = (tuple(parsed[0]), parsed[1]) if parsed is not None else (None, None)
            records.append(
                ImageRecord(id=safe_id(rel_path.stem), image=self.root / "Images" / rel_path, boxes=boxes, box_frame=frame)
            )
        return records


# ======================================================================================== Stanford Cars
def _mat_struct_rows(struct) -> list[dict]:
    """A MATLAB struct array (as loadmat returns it: structured ndarray) as a list of {field: scalar}."""
    array = np.asarray(struct).ravel()
    names = array.dtype.names or ()
    return [{name: _mat_scalar(row[name]) for name in names} for row in array]


def _cars_box(row: dict) -> Box:
    # MATLAB devkit: 1-based inclusive pixel corners
    return (float(row["bbox_x1"]) - 1.0, float(row["bbox_y1"]) - 1.0, float(row["bbox_x2"]), float(row["bbox_y2"]))


class StanfordCarsDataModule(FileDataModule):
    """Stanford Cars (truth = "box": the one car box per image).

    Layout A (the classic archives): cars_train/, cars_test/, devkit/cars_train_annos.mat, and test boxes from
    cars_test_annos_withlabels.mat (root or devkit/) or, failing that, devkit/cars_test_annos.mat (it holds
    the boxes too). Each .mat has an 'annotations' struct array with fields bbox_x1, bbox_y1, bbox_x2,
    bbox_y2, (class), fname; corners are 1-based inclusive. Mirrors that nest cars_train/cars_train/ are
    accepted. Layout B: car_ims/ and cars_annos.mat (fields relative_im_path, bbox_*, class, test).
    """

    name = "Stanford Cars"
    env_var = "STANFORD_CARS_ROOT"
    truth = "box"
    id_rule = (f"a sample id is the image's file name (no folder; prefixed train_ or test_ in the cars_train/ "
               f"cars_test/ layout) {_SAFE_RULE}")
    layout = (
        "cars_train/<fname>.jpg, cars_test/<fname>.jpg, devkit/cars_train_annos.mat and "
        "cars_test_annos_withlabels.mat (in root or devkit/; devkit/cars_test_annos.mat also works), each with "
        "an 'annotations' struct array (bbox_x1, bbox_y1, bbox_x2, bbox_y2, class, fname); or alternatively "
        "car_ims/ plus cars_annos.mat (relative_im_path, bbox_*, class, test)"
    )
    source = (
        "cars_train.tgz, cars_test.tgz, car_devkit.tgz and cars_test_annos_withlabels.mat from the Stanford "
        "Cars page https://ai.stanford.edu/~jkrause/cars/car_dataset.html (now served by mirrors, e.g. Kaggle)"
    )

    def _image_dir(self, split: str) -> Path | None:
        for candidate in (self.root / f"cars_{split}" / f"cars_{split}", self.root / f"cars_{split}"):
            if candidate.is_dir() and any(p.suffix.lower() in IMAGE_EXTENSIONS for p in candidate.iterdir()):
                return candidate
        return self.root / f"cars_{split}" if (self.root / f"cars_{split}").is_dir() else None

    def _annos(self, split: str) -> Path | None:
        if split == "train":
            return self._find_file(self.root / "devkit" / "cars_train_annos.mat", self.root / "cars_train_annos.mat")
        return self._find_file(
            self.root / "cars_test_annos_withlabels.mat",
            self.root / "devkit" / "cars_test_annos_withlabels.mat",
            self.root / "devkit" / "cars_test_annos.mat",
            self.root / "cars_test_annos.mat",
        )

    def _check_layout(self) -> None:
        self._combined = (self.root / "cars_annos.mat").is_file() and (self.root / "car_ims").is_dir()
        if self._combined:
            return
        missing = [f"cars_{s}/" for s in ("train", "test") if self._image_dir(s) is None]
        if self._annos("train") is None:
            missing.append("devkit/cars_train_annos.mat")
        if self._annos("test") is None:
            missing.append("cars_test_annos_withlabels.mat")
        if missing:
            raise self.layout_error("missing " + ", ".join(missing))

    def _rows(self, path: Path) -> list[dict]:
        mat = _load_mat(path)
        if "annotations" not in mat:
            raise self.layout_error(f"{path.name} has no 'annotations' struct array")
        rows = _mat_struct_rows(mat["annotations"])
        needed = {"bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2"}
        if rows and not needed <= set(rows[0]):
            raise self.layout_error(f"{path.name}: 'annotations' lacks fields {sorted(needed - set(rows[0]))}")
        return rows

    def _list(self, split: str) -> list[ImageRecord] | None:
        if split == "val":
            return None
        if self._combined:
            records = []
            for row in self._rows(self.root / "cars_annos.mat"):
                if bool(row.get("test", 0)) != (split == "test"):
                    continue
                rel = Path(str(row["relative_im_path"]))
                records.append(ImageRecord(id=safe_id(rel.stem), image=self.root / rel, boxes=(_cars_box(row),)))
            return records
        folder = self._image_dir(split)
        return [
            ImageRecord(id=safe_id(f"{split}_{Path(str(row['fname'])).stem}"), image=folder / str(row["fname"]), boxes=(_cars_box(row),))
            for row in self._rows(self._annos(split))
        ]


# ================================================================================== CSV box readers
_SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


def _float_or_none(text) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if np.isfinite(value) else None


class _BoxCSVDataModule(FileDataModule):
    """Shared logic of the CSV-described box data sets: rows -> images with the union of their boxes.

    Subclasses give the box columns and format (`box_columns`, `box_format` "xyxy" | "xywh"), the default
    csv name, the images folder, and how a row's image path is found.
    """

    box_columns: tuple[str, str, str, str] = ("x0", "y0", "x1", "y1")
    box_format: str = "xyxy"
    id_rule = f"a sample id is the image's path as the CSV lists it {_SAFE_RULE}"
    default_csv: str | None = None
    path_columns: tuple[str, ...] = ("image",)

    def __init__(self, root=None, *, csv: str | None = None, images_dir: str = "images", test_fraction: float = 0.2,
                 path_column: str | None = None, **kwargs) -> None:
        self._csv_arg = csv
        self.images_dir_name = images_dir
        self.test_fraction = float(test_fraction)
        self._path_column_arg = path_column
        super().__init__(root, **kwargs)

    # --- layout
    def _csv_path(self) -> Path:
        if self._csv_arg:
            path = Path(os.path.expanduser(str(self._csv_arg)))
            path = path if path.is_absolute() else self.root / path
            if not path.is_file():
                raise self.layout_error(f"missing {self._csv_arg}")
            return path
        if self.default_csv and (self.root / self.default_csv).is_file():
            return self.root / self.default_csv
        found = sorted(self.root.glob("*.csv"))
        if len(found) == 1 and not self.default_csv:
            return found[0]
        if not found or self.default_csv:
            raise self.layout_error(f"missing {self.default_csv or 'a .csv file of boxes'}")
        raise self.layout_error(f"several .csv files ({', '.join(p.name for p in found)}); choose one with data.csv=NAME")

    def _check_layout(self) -> None:
        self._require(self.images_dir_name, kind="dir")
        self.csv_path = self._csv_path()
        with open(self.csv_path, newline="", encoding="utf-8-sig") as handle:
            header = next(csv.reader(handle), [])
        self._columns = [h.strip() for h in header]
        missing = [c for c in self.box_columns if c not in self._columns]
        if self._path_column_arg:
            if self._path_column_arg not in self._columns:
                missing.insert(0, self._path_column_arg)
            self.path_column = self._path_column_arg
        else:
            self.path_column = next((c for c in self.path_columns if c in self._columns), None)
            if self.path_column is None:
                missing.insert(0, " or ".join(self.path_columns))
        if missing:
            raise self.layout_error(f"{self.csv_path.name} lacks column(s) {', '.join(missing)} (has {', '.join(self._columns)})")

    # --- hooks
    def _keep_row(self, row: dict) -> bool:
        return True

    def _row_frame(self, row: dict) -> tuple[float, float] | None:
        return None

    def _resolve_image(self, value: str) -> Path:
        return self.root / self.images_dir_name / value

    # --- listing
    def _all_records(self) -> dict[str, list[ImageRecord]]:
        if hasattr(self, "_by_split"):
            return self._by_split
        grouped: dict[str, dict] = {}
        c0, c1, c2, c3 = self.box_columns
        with open(self.csv_path, newline="", encoding="utf-8-sig") as handle:
            for row in csv.DictReader(handle):
                row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
                value = row.get(self.path_column, "")
                if not value or not self._keep_row(row):
                    continue
                entry = grouped.setdefault(value, {"boxes": [], "split": None, "frame": self._row_frame(row)})
                split = _SPLIT_NAMES.get(row.get("split", "").lower())
                entry["split"] = entry["split"] or split
                a, b, c, d = (_float_or_none(row.get(k)) for k in (c0, c1, c2, c3))
                if None in (a, b, c, d):
                    continue  # a row without a box: an image with no box of the concept
                entry["boxes"].append((a, b, a + c, b + d) if self.box_format == "xywh" else (a, b, c, d))
        by_split: dict[str, list[ImageRecord]] = {"train": [], "val": [], "test": []}
        unsplit: list[ImageRecord] = []
        for value, entry in grouped.items():
            rel = Path(value)
            record = ImageRecord(
                id=safe_id(str(rel.with_suffix(""))),
                image=self._resolve_image(value),
                boxes=tuple(entry["boxes"]),
                box_frame=entry["frame"],
            )
            (by_split[entry["split"]] if entry["split"] else unsplit).append(record)
        if unsplit:  # no split column (or blank cells): a deterministic hash split
            rest, test = hash_split(unsplit, self.test_fraction, seed=self.split_seed, salt="test")
            by_split["train"] += rest
            by_split["test"] += test
        self._by_split = by_split
        return by_split

    def _list(self, split: str) -> list[ImageRecord] | None:
        records = self._all_records()[split]
        if split == "val" and not records:
            return None
        return records


class Human36MDataModule(_BoxCSVDataModule):
    """Human3.6M frames with person boxes (truth = "box").

    The paper's 6000-frame subset is not published, so this reader takes a simple, documented layout that
    any extraction can be written into:

        root/
          frames/<any sub/path>/<name>.jpg|png     (the frames; option frames_dir)
          boxes.csv                                 (option csv)

    ``boxes.csv`` columns: ``image`` (path relative to frames/), ``x0,y0,x1,y1`` (pixel box on the stored
    frame, 0-based continuous edges: x1 = x0 + width), and optional ``split`` (train | val | test). Several
    rows for one image are unioned; a row with empty box cells lists an image with no person. Without a
    split column, ``test_fraction`` (default 0.2) of the images go to test by a deterministic hash. Only
    frames listed in the CSV belong to the data set. Boxes can be made from the official 2D pose
    (bounding box of the projected joints, padded) or the official body masks.
    """

    name = "Human3.6M"
    env_var = "HUMAN36M_ROOT"
    default_csv = "boxes.csv"
    layout = "frames/<name>.jpg|png and boxes.csv with columns image,x0,y0,x1,y1[,split] (image relative to frames/)"
    source = (
        "videos from http://vision.imar.ro/human3.6m/ (registration needed); extract frames and write boxes.csv "
        "yourself (the paper's 6000-frame subset is unpublished)"
    )
    truth = "box"

    def __init__(self, root=None, *, frames_dir: str = "frames", csv: str | None = None, **kwargs) -> None:
        super().__init__(root, csv=csv, images_dir=frames_dir, **kwargs)


class ChestXrayDataModule(_BoxCSVDataModule):
    """Chest X-rays with finding boxes in the MS-CXR style (truth = "box"; grayscale converted to RGB).

    Layout: root/images/... (the image files, e.g. MIMIC-CXR-JPG's files/pNN/.../<dicom_id>.jpg) and one CSV
    in root (option csv; MS-CXR's is MS_CXR_Local_Alignment_v*.csv). Needed columns: ``path`` (relative to
    images/; a .dcm path is looked up as .jpg/.png) — or ``dicom_id`` (found as images/**/<dicom_id>.<ext>) —
    and ``x, y, w, h`` (box in pixels). Optional: ``image_width, image_height`` (the frame the boxes were
    drawn on; boxes are rescaled when the stored image has another size), ``split`` (train | val | test;
    else ``test_fraction`` by hash), ``category_name`` (with option ``category``, a name or list of names,
    only those findings are kept, case-insensitive). All boxes of one image are unioned. DICOM is not read:
    convert to JPG/PNG (or use MIMIC-CXR-JPG).
    """

    name = "Chest X-ray (MS-CXR style)"
    env_var = "CHEST_XRAY_ROOT"
    truth = "box"
    box_columns = ("x", "y", "w", "h")
    box_format = "xywh"
    path_columns = ("path", "dicom_id")
    layout = (
        "images/<...>/<file>.jpg|png and one .csv with columns path (relative to images/) or dicom_id, x, y, w, h "
        "and optionally image_width, image_height, split, category_name"
    )
    source = (
        "MS-CXR (https://physionet.org/content/ms-cxr/, credentialed) for the CSV and MIMIC-CXR-JPG "
        "(https://physionet.org/content/mimic-cxr-jpg/) for the images"
    )

    def __init__(self, root=None, *, category: str | Sequence[str] | None = None, **kwargs) -> None:
        if isinstance(category, str):
            category = [category]
        self.categories = {c.strip().lower() for c in category} if category else None
        super().__init__(root, **kwargs)

    def _keep_row(self, row: dict) -> bool:
        if self.categories is None:
            return True
        value = row.get("category_name", row.get("category", row.get("label_text", "")))
        return value.strip().lower() in self.categories

    def _row_frame(self, row: dict) -> tuple[float, float] | None:
        w, h = _float_or_none(row.get("image_width")), _float_or_none(row.get("image_height"))
        return (w, h) if w and h and w > 0 and h > 0 else None

    def _stem_index(self) -> dict[str, Path]:
        if not hasattr(self, "_stems"):
            self._stems = {}
            for path in sorted((self.root / self.images_dir_name).rglob("*")):
                if path.suffix.lower() in IMAGE_EXTENSIONS:
                    self._stems.setdefault(path.stem, path)
        return self._stems

    def _resolve_image(self, value: str) -> Path:
        base = self.root / self.images_dir_name
        if self.path_column == "dicom_id":
            return self._stem_index().get(value, base / f"{value}.jpg")
        path = base / value
        if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
            return path
        for ext in (".jpg", ".png", ".jpeg"):
            alternative = path.with_suffix(ext)
            if alternative.is_file():
                return alternative
        return path


# ====================================================================================== image folder
class ImageFolderDataModule(FileDataModule):
    """Any folder of images (searched recursively), optionally with masks (truth = "mask", else None).

    Masks: ``masks_root`` (default $IMAGE_FOLDER_MASKS, else none) holds, for image root/<rel>/<name>.<ext>,
    the mask <masks_root>/<rel>/<name>.png (or <masks_root>/<name>.png), in any encoding `load_mask` reads
    (0/255, 0/1, 16-bit, palette, colour on black, soft; foreground above ``mask_threshold``), drawn on the
    image as displayed (EXIF orientation applied); a mask at another size but the same aspect ratio is
    resized. Images without a usable mask are skipped and counted.
    Splits: if root has train/ and test/ subfolders they are the splits; otherwise ``test_fraction`` of the
    images go to test by a deterministic hash of their path — and with ``test_fraction: 0`` (the default)
    "test" is the whole folder, the same images as "train": the label-free method is trained on, and scored
    on, the same unlabelled images. The masks folder is never read as images.

    Every entry under root is accounted for: each file, link, special file, hidden entry and folder named
    like an image (``x.jpg/``) is a record of its split, and the scan keeps it or skips it with a kind —
    "not an image file" (extension not in ``IMAGE_EXTENSIONS``), "hidden file or folder" (name starting with
    ``.``; a hidden folder is one entry and is not searched), "broken link", "not a regular file", "folder
    named like an image" (its contents are searched), "folder link already read" (a link back into the tree,
    or a second link to one folder), "unreadable folder", "outside train/ and test/" (in a pre-split folder;
    listed with train), or any reason of `scan_records`. So per split kept + skipped = entries.
    Links to folders are followed; links to files are read as those files.
    """

    name = "image folder"
    env_var = "IMAGE_FOLDER_ROOT"
    layout = (
        "<any sub/folders>/<name>.jpg|jpeg|png|bmp|tif|webp (recursively; optional train/ and test/ subfolders), "
        "and optionally a masks folder (masks_root) with <same relative path>.png"
    )
    source = "any images of the concept; masks, if any, are binary or gray PNGs of the same size"

    def __init__(self, root=None, *, masks_root: str | None = None, test_fraction: float = 0.0, **kwargs) -> None:
        masks_root = masks_root or os.environ.get("IMAGE_FOLDER_MASKS") or None
        self.masks_root = Path(os.path.expanduser(str(masks_root))) if masks_root else None
        self.truth = "mask" if self.masks_root is not None else None
        self.test_fraction = float(test_fraction)
        super().__init__(root, **kwargs)

    def _entries(self) -> list[tuple[Path, str | None]]:
        """Every entry under root, depth first in name order: (path, skip kind, or None for a candidate image)."""
        if hasattr(self, "_walked"):
            return self._walked
        masks = self.masks_root.resolve() if self.masks_root is not None else None
        seen: set[Path] = set()
        found: list[tuple[Path, str | None]] = []

        def walk(folder: Path) -> None:
            seen.add(folder.resolve())
            try:
                children = sorted(folder.iterdir(), key=lambda p: p.name)
            except OSError:
                found.append((folder, "unreadable folder"))
                return
            for path in children:
                if path.name.startswith("."):
                    found.append((path, "hidden file or folder"))
                elif path.is_dir():
                    real = path.resolve()
                    if real == masks:
                        continue  # the masks are not images of the data set
                    if real in seen:
                        found.append((path, "folder link already read"))
                        continue
                    if path.suffix.lower() in IMAGE_EXTENSIONS:
                        found.append((path, "folder named like an image"))
                    walk(path)
                elif path.suffix.lower() not in IMAGE_EXTENSIONS:
                    found.append((path, "not an image file"))
                else:
                    found.append((path, None))  # the scan tells a broken link, a pipe or a corrupt file

        walk(self.root)
        found.sort(key=lambda entry: entry[0])  # the order a sorted rglob gave, so record order is unchanged
        self._walked = found
        return found

    def _check_layout(self) -> None:
        if self.masks_root is not None and not self.masks_root.is_dir():
            raise self.layout_error(f"the masks folder {self.masks_root} does not exist")
        self._presplit = (self.root / "train").is_dir() and (self.root / "test").is_dir()
        if not any(kind is None for _, kind in self._entries()):
            raise self.layout_error("no image files found")

    def _record(self, path: Path, base: Path, skip: str | None) -> ImageRecord:
        rel = path.relative_to(self.root)
        mask = None
        if self.masks_root is not None and skip is None:
            candidates = [
                self.masks_root / rel.with_suffix(".png"),
                self.masks_root / path.relative_to(base).with_suffix(".png"),
                self.masks_root / f"{path.stem}.png",
            ]
            mask = next((c for c in candidates if c.is_file()), candidates[0])
        return ImageRecord(id=safe_id(str(rel.with_suffix(""))), image=path, mask=mask, skip=skip)

    def _list(self, split: str) -> list[ImageRecord] | None:
        if split == "val":
            return None
        if self._presplit:
            records = []
            for path, skip in self._entries():
                top = path.relative_to(self.root).parts
                if len(top) > 1 and top[0] == split:
                    records.append(self._record(path, self.root / split, skip))
                elif split == "train" and not (len(top) > 1 and top[0] == "test"):
                    records.append(self._record(path, self.root, skip or "outside train/ and test/"))
            return records
        records = [self._record(path, self.root, skip) for path, skip in self._entries()]
        if self.test_fraction <= 0:
            return records
        rest, test = hash_split(records, self.test_fraction, seed=self.split_seed, salt="test")
        return test if split == "test" else rest


__all__ = [
    "DatasetLayoutError",
    "FileDataModule",
    "CUBDataModule",
    "StanfordDogsDataModule",
    "StanfordCarsDataModule",
    "Human36MDataModule",
    "ChestXrayDataModule",
    "ImageFolderDataModule",
    "hash_split",
    "safe_id",
    "read_voc_boxes",
]
