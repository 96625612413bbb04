"""The shared reader of CSV-described box data sets (Human3.6M and chest X-rays): rows -> images with the
union of their boxes."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from conceptdistill.data.readers import SAFE_RULE, FileDataModule, hash_split, safe_id
from conceptdistill.data.scanning import ImageRecord

_SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


def float_or_none(text) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if np.isfinite(value) else None


@dataclass(frozen=True)
class CSVLayout:
    """What `BoxCSVDataModule.check_layout` found: the CSV of boxes and its image-path column."""

    csv_path: Path
    path_column: str


class BoxCSVDataModule(FileDataModule):
    """Shared logic of the CSV-described box data sets: rows -> images with the union of their boxes.

    Subclasses give the box columns and format (`box_columns`, `box_format` "xyxy" | "xywh"), the default
    csv name, the images folder, and how a row's image path is found.
    """

    box_columns: tuple[str, str, str, str] = ("x0", "y0", "x1", "y1")
    box_format: str = "xyxy"
    id_rule = f"a sample id is the image's path as the CSV lists it {SAFE_RULE}"
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
    def _find_csv(self, root: Path) -> Path:
        if self._csv_arg:
            path = Path(os.path.expanduser(str(self._csv_arg)))
            path = path if path.is_absolute() else root / path
            if not path.is_file():
                raise self.layout_error(f"missing {self._csv_arg}", root)
            return path
        if self.default_csv and (root / self.default_csv).is_file():
            return root / self.default_csv
        found = sorted(root.glob("*.csv"))
        if len(found) == 1 and not self.default_csv:
            return found[0]
        if not found or self.default_csv:
            raise self.layout_error(f"missing {self.default_csv or 'a .csv file of boxes'}", root)
        problem = f"several .csv files ({', '.join(p.name for p in found)}); choose one with data.csv=NAME"
        raise self.layout_error(problem, root)

    def check_layout(self, root: Path) -> CSVLayout:
        """The CSV of boxes and the column that names each row's image (after checking the images folder and
        that the CSV has the box columns)."""
        self.require(root, self.images_dir_name, kind="dir")
        csv_path = self._find_csv(root)
        with open(csv_path, newline="", encoding="utf-8-sig") as handle:
            header = next(csv.reader(handle), [])
        columns = [h.strip() for h in header]
        missing = [c for c in self.box_columns if c not in columns]
        if self._path_column_arg:
            if self._path_column_arg not in columns:
                missing.insert(0, self._path_column_arg)
            path_column = self._path_column_arg
        else:
            path_column = next((c for c in self.path_columns if c in columns), None)
            if path_column is None:
                missing.insert(0, " or ".join(self.path_columns))
        if missing:
            problem = f"{csv_path.name} lacks column(s) {', '.join(missing)} (has {', '.join(columns)})"
            raise self.layout_error(problem, root)
        return CSVLayout(csv_path, path_column)

    # --- hooks
    def _keep_row(self, row: dict) -> bool:
        return True

    def _row_frame(self, row: dict) -> tuple[float, float] | None:
        return None

    def _resolve_image(self, value: str) -> Path:
        return self.root / self.images_dir_name / value

    # --- listing
    @cached_property
    def _by_split(self) -> dict[str, list[ImageRecord]]:
        """Every image of the CSV as a record with the union of its boxes, per split (read once)."""
        grouped: dict[str, dict] = {}
        c0, c1, c2, c3 = self.box_columns
        with open(self.found.csv_path, newline="", encoding="utf-8-sig") as handle:
            for row in csv.DictReader(handle):
                row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
                value = row.get(self.found.path_column, "")
                if not value or not self._keep_row(row):
                    continue
                entry = grouped.setdefault(value, {"boxes": [], "split": None, "frame": self._row_frame(row)})
                split = _SPLIT_NAMES.get(row.get("split", "").lower())
                entry["split"] = entry["split"] or split
                a, b, c, d = (float_or_none(row.get(k)) for k in (c0, c1, c2, c3))
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
        return by_split

    def _list(self, split: str) -> list[ImageRecord] | None:
        records = self._by_split[split]
        if split == "val" and not records:
            return None
        return records
