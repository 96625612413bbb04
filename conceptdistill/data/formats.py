"""File formats of the data sets' annotations: MATLAB .mat files (via scipy) and PASCAL VOC XML boxes.

Boxes come out in the package's one convention (see `conceptdistill.data.geometry`): float (x0, y0, x1, y1)
in continuous pixel edges, so a 1-based inclusive corner pair (x0, y0, x1, y1) becomes (x0 - 1, y0 - 1, x1, y1).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

Box = tuple[float, float, float, float]


def mat_scalar(value):
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


def mat_strings(value) -> list[str]:
    """A MATLAB cell array of strings (as loadmat returns it, any nesting) as a list of str."""
    array = np.asarray(value, dtype=object) if not isinstance(value, np.ndarray) else value
    if array.dtype.kind == "U":
        return [str(s) for s in array.ravel()]
    return [str(mat_scalar(item)) for item in array.ravel()]


def load_mat(path: Path) -> dict:
    from scipy.io import loadmat

    return loadmat(str(path))


def mat_struct_rows(struct) -> list[dict]:
    """A MATLAB struct array (as loadmat returns it: structured ndarray) as a list of {field: scalar}."""
    array = np.asarray(struct).ravel()
    names = array.dtype.names or ()
    return [{name: mat_scalar(row[name]) for name in names} for row in array]


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
