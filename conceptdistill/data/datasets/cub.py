"""CUB-200-2011 birds with their segmentation masks."""

from __future__ import annotations

import os
from pathlib import Path

from conceptdistill.data.readers import SAFE_RULE, FileDataModule, safe_id
from conceptdistill.data.scanning import ImageRecord


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
    id_rule = f"a sample id is the image's file name (no folder) {SAFE_RULE}"
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

    def check_layout(self, root: Path) -> Path:
        """The segmentations folder (after checking images.txt, train_test_split.txt and images/ exist)."""
        self.require(root, "images.txt", "train_test_split.txt", kind="file")
        self.require(root, "images", kind="dir")
        seg = self._segmentations_arg or os.environ.get("CUB_SEGMENTATIONS_ROOT")
        if seg:
            candidates = [Path(os.path.expanduser(str(seg)))]
        else:
            candidates = [root / "segmentations", root.parent / "segmentations"]
        found = next((c for c in candidates if c.is_dir()), None)
        if found is None:
            raise self.layout_error("no segmentations folder at " + " or ".join(str(c) for c in candidates), root)
        return found

    @property
    def segmentations_root(self) -> Path:
        """The folder of the segmentation masks, as `check_layout` found it."""
        return self.found

    def _read_pairs(self, name: str) -> dict[str, str]:
        pairs: dict[str, str] = {}
        with open(self.root / name, encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                parts = line.split(maxsplit=1)
                if len(parts) != 2:
                    raise self.layout_error(f"{name} line {number} is not '<id> <value>': {line.strip()!r}", self.root)
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
                raise self.layout_error(f"image id {image_id} of images.txt is missing from train_test_split.txt", self.root)
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
