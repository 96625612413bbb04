"""The shared base of the real-data readers (`FileDataModule`), their layout error, sample ids and splits.

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

The readers themselves live one per data set in `conceptdistill.data.datasets`.

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

import hashlib
import os
import re
from collections.abc import Sequence
from pathlib import Path

from conceptdistill.data.base import ConceptDataModule, Split
from conceptdistill.data.geometry import RESIZE_MODES
from conceptdistill.data.image_list import ImageListDataset
from conceptdistill.data.scanning import ImageRecord

#: how every reader turns a path into a sample id (`safe_id`), quoted in the error for two files with one id
SAFE_RULE = "without its extension, with '/' replaced by '__' and every other character outside [A-Za-z0-9._+-] by '_'"



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


def first_file(*candidates: Path) -> Path | None:
    """The first of `candidates` that is a file, or None."""
    return next((path for path in candidates if path.is_file()), None)


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



class FileDataModule(ConceptDataModule):
    """Shared logic: root resolution, layout errors, train/val/test partition, scanning, datasets.

    Subclasses set `name`, `env_var`, `layout`, `source`, `truth`, implement `check_layout(root)` (return
    what was found, stored as `self.found`; raise via `self.layout_error`) and `_list(split)` for split
    "train" and "test" (and "val" when the data set has an official one; return None otherwise).
    """

    name: str = "data set"
    env_var: str = ""
    layout: str = ""
    source: str = ""
    #: how this reader forms sample ids, stated in the error for two files with one id
    id_rule: str = f"a sample id is the image's path under the data root {SAFE_RULE}"

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
        self.root = self.resolve_root(root)
        #: what `check_layout` found under root (the reader's own small dataclass; None when it needs nothing)
        self.found = self.check_layout(self.root)
        self._datasets: dict[str, ImageListDataset] = {}
        self._lists: dict[str, list[ImageRecord] | None] = {}

    # ---------------------------------------------------------------------------------- layout, errors
    def resolve_root(self, root: str | os.PathLike | None) -> Path:
        """The data set folder: `root`, else the reader's environment variable, with ``~`` and ``$VARS``
        expanded. Raises `DatasetLayoutError` when neither is set or the path is not a folder."""
        if root is None or str(root).strip() in ("", "None", "null"):
            root = os.environ.get(self.env_var) if self.env_var else None
        if root is None or str(root).strip() == "":
            raise self.layout_error("no root folder was given", None)
        path = Path(os.path.expandvars(os.path.expanduser(str(root))))
        if not path.is_dir():
            problem = "the root folder does not exist" if not path.exists() else "the root is not a folder"
            raise self.layout_error(problem, path)
        return path

    def check_layout(self, root: Path):
        """Look at `root` and return what the reader needs from it (paths, a small frozen dataclass), or raise
        `DatasetLayoutError` (via `layout_error`) naming what is missing. Sets nothing on the reader."""
        return None

    def layout_error(self, problem: str, root: Path | None) -> DatasetLayoutError:
        """The one-paragraph error for a wrong layout: the data set, `problem`, the root looked at (None: no
        root was set), how to set it, the expected layout and where the official files come from."""
        where = f"looked at root '{root}'" if root is not None else "no root was set"
        how = "set it with `data.root=/path`" + (f" or the {self.env_var} environment variable" if self.env_var else "")
        return DatasetLayoutError(
            f"{self.name}: {problem} ({where}; {how}). Expected layout under root: {self.layout}. "
            f"Official files: {self.source}"
        )

    def require(self, root: Path, *relative: str | Path, kind: str = "any") -> list[Path]:
        """root / each relative path; raises `DatasetLayoutError` listing every one that is not a folder
        (kind "dir"), a file ("file") or anything ("any")."""
        paths = [root / rel for rel in relative]
        exists = {"dir": Path.is_dir, "file": Path.is_file, "any": Path.exists}[kind]
        missing = [str(rel) for rel, path in zip(relative, paths, strict=True) if not exists(path)]
        if missing:
            raise self.layout_error("missing " + ", ".join(missing), root)
        return paths

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
