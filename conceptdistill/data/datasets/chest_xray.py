"""Chest X-rays with MS-CXR-style finding boxes."""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

from conceptdistill.data.datasets.box_csv import BoxCSVDataModule, float_or_none
from conceptdistill.data.decoding import IMAGE_EXTENSIONS
from conceptdistill.utils.io import files_under


class ChestXrayDataModule(BoxCSVDataModule):
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
        w, h = float_or_none(row.get("image_width")), float_or_none(row.get("image_height"))
        return (w, h) if w and h and w > 0 and h > 0 else None

    @cached_property
    def _stems(self) -> dict[str, Path]:
        """File stem -> the first image (in path order) with that stem under images/ (for dicom_id rows)."""
        stems: dict[str, Path] = {}
        for path in files_under(self.root / self.images_dir_name):  # linked folders too
            if path.suffix.lower() in IMAGE_EXTENSIONS:
                stems.setdefault(path.stem, path)
        return stems

    def _resolve_image(self, value: str) -> Path:
        base = self.root / self.images_dir_name
        if self.found.path_column == "dicom_id":
            return self._stems.get(value, base / f"{value}.jpg")
        path = base / value
        if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
            return path
        for ext in (".jpg", ".png", ".jpeg"):
            alternative = path.with_suffix(ext)
            if alternative.is_file():
                return alternative
        return path
