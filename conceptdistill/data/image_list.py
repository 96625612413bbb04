"""`ImageListDataset`: the map-style data set every real-data reader builds from its scanned records."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from conceptdistill.data.decoding import UnreadableImageError, load_mask, load_rgb, same_aspect
from conceptdistill.data.geometry import (
    RESIZE_MODES,
    ResizeMode,
    as_boxes,
    boxes_to_mask,
    resize_image_and_mask,
)
from conceptdistill.data.scanning import DEFAULT_ID_RULE, ImageRecord, ScanReport, check_unique_ids, scan_records


class ImageListDataset(Dataset):
    """A map-style data set over `ImageRecord`s that yields the sample dicts of `conceptdistill.data.base`.

    `truth`: "mask" reads `record.mask` (see `load_mask`; thresholded at `mask_threshold`), "box" rasterises
    `record.boxes` at the output resolution and also yields them as "boxes", None yields no "mask". Build it with
    `ImageListDataset.scan(records, ...)` so that unusable files are dropped at setup; the constructor checks
    only that ids are unique and file-name safe (ValueError otherwise; `id_rule` says in the message how the
    reader forms ids) and trusts its records. If a file becomes unreadable after the scan, or a mask takes
    another aspect ratio, `__getitem__` raises `UnreadableImageError` naming it.
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        *,
        image_size: int,
        resize_mode: ResizeMode = "resize",
        truth: str | None = None,
        mask_threshold: float = 0.5,
        report: ScanReport | None = None,
        id_rule: str = DEFAULT_ID_RULE,
    ) -> None:
        if resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {resize_mode!r}")
        if truth not in ("mask", "box", None):
            raise ValueError(f"truth must be 'mask', 'box' or None, got {truth!r}")
        check_unique_ids(records, id_rule)
        ids = [r.id for r in records]
        unsafe = [sid for sid in ids if not sid or "/" in sid or "\\" in sid or sid in (".", "..")]
        if unsafe:
            raise ValueError(f"sample ids are not file-name safe: {unsafe[:5]}")
        self.records = list(records)
        self.image_size = int(image_size)
        self.resize_mode = resize_mode
        self.truth = truth
        self.mask_threshold = mask_threshold
        self.report = report or ScanReport(kept=list(records))

    @classmethod
    def scan(
        cls, records: Sequence[ImageRecord], *, workers: int | None = None, name: str = "", **kwargs
    ) -> ImageListDataset:
        """Check that sample ids are unique (before decoding anything), scan (`scan_records`) and build the data set
        from the usable records. Raises ValueError for shared ids (see `check_unique_ids`)."""
        check_unique_ids(records, kwargs.get("id_rule", DEFAULT_ID_RULE))
        truth = kwargs.get("truth")
        report = scan_records(
            records, check_masks=truth == "mask", require_masks=truth == "mask", require_boxes=truth == "box",
            workers=workers, name=name,
        )
        return cls(report.kept, report=report, **kwargs)

    @property
    def skipped(self) -> int:
        return self.report.skipped

    @property
    def converted(self) -> int:
        return self.report.converted

    def __len__(self) -> int:
        return len(self.records)

    def sample_ids(self) -> list[str]:
        """Ids without decoding any image (stages use them to find what is already done)."""
        return [record.id for record in self.records]

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        image = load_rgb(record.image)
        h, w = image.shape[:2]
        mask = None
        if self.truth == "mask":
            if record.mask is None:
                raise UnreadableImageError(f"sample {record.id} has no mask file")
            mask = load_mask(record.mask, self.mask_threshold)
            if not same_aspect(mask.shape[::-1], (w, h)):  # changed on disk since the scan: never stretch it
                raise UnreadableImageError(
                    f"mask {record.mask} ({mask.shape[1]}x{mask.shape[0]}) does not fit image {record.image} ({w}x{h})"
                )
        boxes = None
        if self.truth == "box":
            boxes = as_boxes(record.boxes)
            if record.box_frame is not None:  # drawn on a picture of another size: bring them to this one
                fw, fh = record.box_frame
                boxes = boxes * np.array([w / fw, h / fh, w / fw, h / fh])
        out_image, out_mask, out_boxes = resize_image_and_mask(
            image, mask, self.image_size, self.resize_mode, boxes=boxes
        )
        sample = {"id": record.id, "image": out_image}
        if self.truth == "mask":
            sample["mask"] = out_mask
        elif self.truth == "box":
            sample["mask"] = torch.from_numpy(boxes_to_mask(self.image_size, self.image_size, out_boxes))
            sample["boxes"] = out_boxes  # for scoring the box around a prediction (metrics.mean_box_iou)
        return sample
