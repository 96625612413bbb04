"""Stanford Dogs: dog boxes from PASCAL VOC annotations, splits from the official MATLAB lists."""

from __future__ import annotations

from pathlib import Path

from conceptdistill.data.formats import load_mat, mat_strings, read_voc_boxes
from conceptdistill.data.readers import SAFE_RULE, FileDataModule, first_file, safe_id
from conceptdistill.data.scanning import ImageRecord


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
    id_rule = f"a sample id is the image's file name (no folder) {SAFE_RULE}"
    layout = (
        "Images/<synset-dir>/<file>.jpg, Annotation/<synset-dir>/<file> (PASCAL VOC XML, no extension), "
        "train_list.mat and test_list.mat (MATLAB, cell array 'file_list'; also accepted under lists/)"
    )
    source = (
        "images.tar, annotation.tar and lists.tar from http://vision.stanford.edu/aditya86/ImageNetDogs/ "
        "unpacked into one folder"
    )

    def check_layout(self, root: Path) -> dict[str, Path]:
        """The split list files, {"train": ..., "test": ...}, found in root or root/lists/."""
        self.require(root, "Images", "Annotation", kind="dir")
        lists = {s: first_file(root / f"{s}_list.mat", root / "lists" / f"{s}_list.mat") for s in ("train", "test")}
        missing = [f"{s}_list.mat" for s, path in lists.items() if path is None]
        if missing:
            raise self.layout_error("missing " + ", ".join(missing), root)
        return lists

    def _list(self, split: str) -> list[ImageRecord] | None:
        if split == "val":
            return None
        path = self.found[split]
        mat = load_mat(path)
        if "file_list" not in mat:
            raise self.layout_error(f"{path.name} has no 'file_list' variable", self.root)
        files = mat_strings(mat["file_list"])
        annotations = mat_strings(mat["annotation_list"]) if "annotation_list" in mat else None
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
