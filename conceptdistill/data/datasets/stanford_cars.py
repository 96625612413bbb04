"""Stanford Cars: one car box per image from the devkit's MATLAB annotations."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from conceptdistill.data.decoding import IMAGE_EXTENSIONS
from conceptdistill.data.formats import Box, load_mat, mat_struct_rows
from conceptdistill.data.readers import SAFE_RULE, FileDataModule, first_file, safe_id
from conceptdistill.data.scanning import ImageRecord


@dataclass(frozen=True)
class CarsLayout:
    """What `StanfordCarsDataModule.check_layout` found: layout B's cars_annos.mat (`combined`), or layout
    A's image folder and annotation file per split ("train", "test")."""

    combined: Path | None = None
    images: dict[str, Path] = field(default_factory=dict)
    annotations: dict[str, Path] = field(default_factory=dict)


def _image_dir(root: Path, split: str) -> Path | None:
    """cars_<split>/, or the cars_<split>/cars_<split>/ some mirrors nest, whichever holds images."""
    for candidate in (root / f"cars_{split}" / f"cars_{split}", root / f"cars_{split}"):
        if candidate.is_dir() and any(p.suffix.lower() in IMAGE_EXTENSIONS for p in candidate.iterdir()):
            return candidate
    return root / f"cars_{split}" if (root / f"cars_{split}").is_dir() else None


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
               f"cars_test/ layout) {SAFE_RULE}")
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

    def check_layout(self, root: Path) -> CarsLayout:
        """Which layout root holds (B when both car_ims/ and cars_annos.mat are there) and its files."""
        if (root / "cars_annos.mat").is_file() and (root / "car_ims").is_dir():
            return CarsLayout(combined=root / "cars_annos.mat")
        images = {s: _image_dir(root, s) for s in ("train", "test")}
        annotations = {
            "train": first_file(root / "devkit" / "cars_train_annos.mat", root / "cars_train_annos.mat"),
            "test": first_file(
                root / "cars_test_annos_withlabels.mat",
                root / "devkit" / "cars_test_annos_withlabels.mat",
                root / "devkit" / "cars_test_annos.mat",
                root / "cars_test_annos.mat",
            ),
        }
        missing = [f"cars_{s}/" for s, folder in images.items() if folder is None]
        if annotations["train"] is None:
            missing.append("devkit/cars_train_annos.mat")
        if annotations["test"] is None:
            missing.append("cars_test_annos_withlabels.mat")
        if missing:
            raise self.layout_error("missing " + ", ".join(missing), root)
        return CarsLayout(images=images, annotations=annotations)

    def _rows(self, path: Path) -> list[dict]:
        mat = load_mat(path)
        if "annotations" not in mat:
            raise self.layout_error(f"{path.name} has no 'annotations' struct array", self.root)
        rows = mat_struct_rows(mat["annotations"])
        needed = {"bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2"}
        if rows and not needed <= set(rows[0]):
            problem = f"{path.name}: 'annotations' lacks fields {sorted(needed - set(rows[0]))}"
            raise self.layout_error(problem, self.root)
        return rows

    def _list(self, split: str) -> list[ImageRecord] | None:
        if split == "val":
            return None
        if self.found.combined is not None:
            records = []
            for row in self._rows(self.found.combined):
                if bool(row.get("test", 0)) != (split == "test"):
                    continue
                rel = Path(str(row["relative_im_path"]))
                records.append(ImageRecord(id=safe_id(rel.stem), image=self.root / rel, boxes=(_cars_box(row),)))
            return records
        folder = self.found.images[split]
        return [
            ImageRecord(id=safe_id(f"{split}_{Path(str(row['fname'])).stem}"), image=folder / str(row["fname"]), boxes=(_cars_box(row),))
            for row in self._rows(self.found.annotations[split])
        ]
