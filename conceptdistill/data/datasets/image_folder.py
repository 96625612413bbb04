"""Any folder of images, optionally with masks: every entry under the root is accounted for."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from conceptdistill.data.decoding import IMAGE_EXTENSIONS
from conceptdistill.data.readers import FileDataModule, hash_split, safe_id
from conceptdistill.data.scanning import ImageRecord


@dataclass(frozen=True)
class FolderLayout:
    """What `ImageFolderDataModule.check_layout` found: whether root has train/ and test/, and every entry."""

    presplit: bool
    entries: tuple[tuple[Path, str | None], ...]


def walk_entries(root: Path, masks_root: Path | None) -> list[tuple[Path, str | None]]:
    """Every entry under root, depth first in name order: (path, skip kind, or None for a candidate image).
    The masks folder, when it lies under root, is not listed."""
    masks = masks_root.resolve() if masks_root is not None else None
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

    walk(root)
    found.sort(key=lambda entry: entry[0])  # the order a sorted rglob gave, so record order is unchanged
    return found


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
    source = ("any images of the concept; masks, if any, are PNGs of the same aspect ratio in any common "
              "encoding (README: how files are read)")

    def __init__(self, root=None, *, masks_root: str | None = None, test_fraction: float = 0.0, **kwargs) -> None:
        masks_root = masks_root or os.environ.get("IMAGE_FOLDER_MASKS") or None
        self.masks_root = Path(os.path.expanduser(str(masks_root))) if masks_root else None
        self.truth = "mask" if self.masks_root is not None else None
        self.test_fraction = float(test_fraction)
        super().__init__(root, **kwargs)

    def check_layout(self, root: Path) -> FolderLayout:
        """Every entry under root (see `walk_entries`) and whether root is split into train/ and test/; raises
        when the masks folder is missing or no entry could be an image."""
        if self.masks_root is not None and not self.masks_root.is_dir():
            raise self.layout_error(f"the masks folder {self.masks_root} does not exist", root)
        presplit = (root / "train").is_dir() and (root / "test").is_dir()
        entries = tuple(walk_entries(root, self.masks_root))
        if not any(kind is None for _, kind in entries):
            raise self.layout_error("no image files found", root)
        return FolderLayout(presplit, entries)

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
        if self.found.presplit:
            records = []
            for path, skip in self.found.entries:
                top = path.relative_to(self.root).parts
                if len(top) > 1 and top[0] == split:
                    records.append(self._record(path, self.root / split, skip))
                elif split == "train" and not (len(top) > 1 and top[0] == "test"):
                    records.append(self._record(path, self.root, skip or "outside train/ and test/"))
            return records
        records = [self._record(path, self.root, skip) for path, skip in self.found.entries]
        if self.test_fraction <= 0:
            return records
        rest, test = hash_split(records, self.test_fraction, seed=self.split_seed, salt="test")
        return test if split == "test" else rest
