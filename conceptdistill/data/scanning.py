"""Listing and checking files at setup: `ImageRecord` (what a reader lists), `scan_records` (decode each once,
keep the usable ones, count and log the rest) and `check_unique_ids`.

Nothing listed vanishes: every record ends either kept or skipped with a kind (`SKIP_LABELS`) and a reason
naming the file, and a DataLoader worker never meets an unreadable file. Sizes are compared as displayed
(EXIF orientation applied; see `conceptdistill.data.decoding`).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from conceptdistill.data.decoding import (
    SWAPS_AXES,
    UnreadableImageError,
    displayed_wh,
    exif_orientation,
    needs_conversion,
    same_aspect,
)

log = logging.getLogger("conceptdistill.data")


@dataclass(frozen=True)
class ImageRecord:
    """One image of a data set, as a reader lists it.

    `boxes` are (x0, y0, x1, y1) in continuous pixel coordinates of the image as displayed — or of
    `box_frame` = (width, height) when the annotation was made on an image of another size (they are then
    rescaled to the image; a frame of another aspect ratio is a counted skip). `boxes=()` means "box-scored,
    no box in this image"; None means "no boxes". `skip` is set by a reader that lists an entry it already
    knows is no sample (e.g. "not an image file"): the scan counts it under that kind without opening it.
    """

    id: str
    image: Path
    mask: Path | None = None
    boxes: tuple[tuple[float, float, float, float], ...] | None = None
    box_frame: tuple[float, float] | None = None
    skip: str | None = None


# Why a listed entry is no sample: kind -> how the warning line counts them. Readers may use other kinds.
SKIP_LABELS = {
    "unreadable image": "unreadable image(s)",
    "missing file": "listed image(s) missing on disk",
    "broken link": "broken link(s)",
    "not a regular file": "special file(s) (not regular files)",
    "folder named like an image": "folder(s) named like an image",
    "not an image file": "non-image file(s)",
    "hidden file or folder": "hidden file(s) or folder(s)",
    "folder link already read": "link(s) to a folder already read",
    "unreadable folder": "unreadable folder(s)",
    "outside train/ and test/": "image(s) outside the train/ and test/ folders",
    "missing mask": "image(s) without a mask file",
    "unreadable mask": "image(s) whose mask cannot be decoded",
    "mask size mismatch": "image(s) whose mask has another aspect ratio",
    "no box annotation": "image(s) without a readable box annotation",
    "box frame mismatch": "image(s) whose box annotation frame has another aspect ratio",
}


@dataclass
class ScanReport:
    """What `scan_records` found: the readable records, the skipped ones (with why) and the converted ones.

    Every record given to the scan ends in exactly one of `kept` and `skipped_items`; `converted` counts the
    kept images stored in another mode than 8-bit RGB.
    """

    kept: list[ImageRecord] = field(default_factory=list)
    skipped_items: list[tuple[str, str, str]] = field(default_factory=list)  # (path, kind, reason)
    converted_modes: Counter = field(default_factory=Counter)  # stored mode -> number of images converted

    @property
    def skipped(self) -> int:
        return len(self.skipped_items)

    @property
    def converted(self) -> int:
        return sum(self.converted_modes.values())

    @property
    def skipped_kinds(self) -> dict[str, int]:
        return dict(Counter(kind for _, kind, _ in self.skipped_items))

    def summary(self) -> dict:
        """Counts for a stage to report; "skipped_kinds" (kind -> count) is present when something was skipped."""
        out = {
            "kept": len(self.kept),
            "skipped": self.skipped,
            "converted": self.converted,
            "converted_modes": dict(self.converted_modes),
            "skipped_paths": [path for path, _, _ in self.skipped_items],
        }
        if self.skipped:
            out["skipped_kinds"] = self.skipped_kinds
        return out


@dataclass(frozen=True)
class _Probe:
    mode: str  # Pillow mode as stored
    size: tuple[int, int]  # (width, height) as displayed
    stored: tuple[int, int]  # (width, height) of the pixel grid on disk
    orientation: int  # EXIF orientation, 1..8


def _probe(path: Path) -> _Probe:
    """Decode `path` once (cheaply); raise UnreadableImageError if it fails.

    `Image.verify()` alone does not decode JPEG data, so it misses truncated JPEGs; instead the file is
    decoded for real, JPEGs at 1/8 scale through `draft` (the entropy-coded stream is still read to its end,
    so truncation is caught, at a fraction of the cost).
    """
    try:
        with Image.open(path) as image:
            mode, stored = image.mode, image.size
            if image.width == 0 or image.height == 0:
                raise UnreadableImageError(f"image {path} has zero size")
            if image.format == "JPEG":
                image.draft(None, (max(1, image.width // 8), max(1, image.height // 8)))
            image.load()
            orientation = exif_orientation(image)
    except (UnreadableImageError, MemoryError):
        raise
    except Exception as exc:
        raise UnreadableImageError(f"{type(exc).__name__}: {exc}") from exc
    return _Probe(mode, displayed_wh(stored, orientation), stored, orientation)


def _entry_problem(path: Path) -> tuple[str, str] | None:
    """(kind, reason) when `path` is not a regular file that could be opened, else None. Checked before any
    open: a FIFO named like an image would block a decoder forever."""
    try:
        return _entry_problem_unguarded(path)
    except OSError as exc:  # e.g. no permission to look: it cannot be read either
        return "unreadable image", f"cannot inspect {path}: {exc}"


def _entry_problem_unguarded(path: Path) -> tuple[str, str] | None:
    if not path.exists():
        if path.is_symlink():
            return "broken link", f"link to {os.readlink(path)}, which does not exist"
        return "missing file", "no such file"
    if path.is_dir():
        return "not a regular file", "a folder"
    if not path.is_file():
        return "not a regular file", "a special file (device, pipe or socket)"
    return None


def _wh(size: tuple[float, float]) -> str:
    return f"{size[0]:g}x{size[1]:g}"


def _mask_mismatch(record: ImageRecord, image: _Probe, mask: _Probe) -> str | None:
    """Why the mask cannot be laid on its image (sizes are width x height as displayed), or None."""
    if same_aspect(mask.size, image.size):
        return None
    reason = (f"mask {record.mask} is {_wh(mask.size)} but image {record.image} is {_wh(image.size)} "
              f"(width x height): another aspect ratio, so the mask does not cover the same picture")
    if image.orientation in SWAPS_AXES and same_aspect(mask.size, image.stored):
        reason += (f"; the mask fits the image's stored pixels ({_wh(image.stored)}), but the image carries EXIF "
                   f"orientation {image.orientation} and masks are read on the picture as displayed")
    return reason


def _scan_one(
    record: ImageRecord, check_masks: bool, require_masks: bool, require_boxes: bool
) -> tuple[str | None, str, str, str]:
    """(stored mode of a kept record or None, failing path, kind, reason)."""
    image_path = str(record.image)
    if record.skip is not None:
        return None, image_path, record.skip, record.skip
    if require_boxes and record.boxes is None:
        return None, image_path, "no box annotation", "no readable box annotation"
    problem = _entry_problem(Path(record.image))
    if problem is not None:
        return None, image_path, *problem
    try:
        image = _probe(record.image)
    except UnreadableImageError as exc:
        return None, image_path, "unreadable image", str(exc)
    if require_boxes and record.box_frame is not None and not same_aspect(record.box_frame, image.size):
        reason = (f"boxes of {image_path} were drawn on a {_wh(record.box_frame)} picture but the image is "
                  f"{_wh(image.size)} (width x height, as displayed): another aspect ratio")
        if image.orientation in SWAPS_AXES and same_aspect(record.box_frame, image.stored):
            reason += f"; the frame fits the stored pixels, but the image carries EXIF orientation {image.orientation}"
        return None, image_path, "box frame mismatch", reason
    if require_masks and record.mask is None:
        return None, image_path, "missing mask", "no mask file listed"
    if check_masks and record.mask is not None:
        mask_path = str(record.mask)
        problem = _entry_problem(Path(record.mask))
        if problem is not None:
            return None, mask_path, "missing mask", f"mask: {problem[1]}"
        try:
            mask = _probe(record.mask)
        except UnreadableImageError as exc:
            return None, mask_path, "unreadable mask", f"mask: {exc}"
        mismatch = _mask_mismatch(record, image, mask)
        if mismatch is not None:
            return None, mask_path, "mask size mismatch", mismatch
    return image.mode, "", "", ""


def scan_records(
    records: Sequence[ImageRecord],
    *,
    check_masks: bool = True,
    require_masks: bool = False,
    require_boxes: bool = False,
    workers: int | None = None,
    name: str = "",
) -> ScanReport:
    """Decode every image (and mask) once; keep the usable records, count and log the rest.

    A record is skipped, with a kind (`SKIP_LABELS`) and a reason naming the files, when the reader marked it
    (`ImageRecord.skip`), its image is a broken link, missing, not a regular file or cannot be decoded, or —
    with `check_masks` — its mask is missing, cannot be decoded or has another aspect ratio than the image,
    or — with `require_masks` — it lists no mask, or — with `require_boxes` — its `boxes` is None
    (annotation missing or unparseable) or its `box_frame` has another aspect ratio. Sizes are compared as displayed (EXIF orientation applied). Logs ONE warning
    line per kind of skip ("skipped N <what> [<kind>]: first paths ...") and one info line for the converted
    images. Threads are used (Pillow releases the GIL while decoding); the result does not depend on them.
    """
    workers = workers or min(8, os.cpu_count() or 1)
    checks = (check_masks, require_masks, require_boxes)
    report = ScanReport()
    if workers > 1 and len(records) > 16:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(lambda r: _scan_one(r, *checks), records, chunksize=32))
    else:
        results = [_scan_one(r, *checks) for r in records]
    for record, (mode, bad_path, kind, reason) in zip(records, results, strict=True):
        if mode is None:
            report.skipped_items.append((bad_path or str(record.image), kind, reason))
            continue
        report.kept.append(record)
        if needs_conversion(mode):
            report.converted_modes[mode] += 1
    prefix = f"{name}: " if name else ""
    by_kind: dict[str, list[tuple[str, str]]] = {}
    for path, kind, reason in report.skipped_items:
        by_kind.setdefault(kind, []).append((path, reason))
    for kind, items in by_kind.items():
        first = "; ".join(p if why == kind else f"{p} ({why})" for p, why in items[:5])
        more = f"; ... and {len(items) - 5} more" if len(items) > 5 else ""
        label = SKIP_LABELS.get(kind, "file(s)")
        log.warning("%sskipped %d %s [%s]: %s%s", prefix, len(items), label, kind, first, more)
    if report.converted:
        modes = ", ".join(f"{mode}={count}" for mode, count in sorted(report.converted_modes.items()))
        log.info("%sconverted %d image(s) to 8-bit-equivalent RGB (%s)", prefix, report.converted, modes)
    return report


DEFAULT_ID_RULE = "each reader makes sample ids from file names (see the reader's documentation)"


def check_unique_ids(records: Sequence[ImageRecord], id_rule: str = DEFAULT_ID_RULE) -> None:
    """Raise ValueError when two records (other than reader-skipped ones) share a sample id.

    The message lists every id shared and all of its files, states `id_rule` (how the reader forms ids) and
    asks for a rename: outputs are stored per id, so one file's results would silently replace another's.
    """
    files: dict[str, list[str]] = {}
    for record in records:
        if record.skip is None:
            files.setdefault(record.id, []).append(str(record.image))
    shared = {sample_id: paths for sample_id, paths in files.items() if len(paths) > 1}
    if not shared:
        return
    listed = "; ".join(f"{sample_id!r} <- {', '.join(paths)}" for sample_id, paths in sorted(shared.items())[:10])
    more = f"; ... and {len(shared) - 10} more" if len(shared) > 10 else ""
    raise ValueError(
        f"{len(shared)} sample id(s) shared by several files: {listed}{more}. Results are stored per sample id, "
        f"so these files would overwrite each other's. How ids are formed: {id_rule}. "
        f"Please rename the files so that their ids differ."
    )
