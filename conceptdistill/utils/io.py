"""File I/O shared by the stages.

Everything a stage writes goes through `atomic_write`, so an interrupted run never leaves a half-written file
that a resumed run would mistake for finished work. Written files get the permissions any new file gets
(0o666 minus the process umask), so results can be shared like the rest of a run folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask as an int (e.g. 0o022), read without changing it where the system tells it.

    Linux reports it in /proc/self/status. Elsewhere it can only be read by setting it, which is racy: the
    lock keeps this module's writers apart, and the umask is set to 0o077 meanwhile, so a file another thread
    creates in that instant is too private rather than too open.
    """
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        old = os.umask(0o077)
        os.umask(old)
    return old


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[Any]:
    """Open a temporary file beside `path`; on success rename it onto `path` (atomic on POSIX).

    The file ends with mode 0o666 & ~umask, as `open` would create it (the temporary file is 0o600 until
    it is complete).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())  # only now: a half-written file stays private
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def files_under(folder: str | os.PathLike, *, skip_hidden: bool = False) -> list[Path]:
    """Every regular file under `folder`, in path order, also inside linked folders (`Path.rglob` does not
    enter those before Python 3.13). A file reached by two paths (a linked folder and its target both under
    `folder`) is listed under each: which path the loader reads is not for this walk to guess. A link back to a
    folder the walk is inside is not followed, so a link cycle ends. `skip_hidden` leaves out entries whose name
    starts with "." and everything under them (.git/, .cache/, .gitattributes)."""
    found: list[Path] = []

    def walk(current: Path, inside: frozenset[Path]) -> None:
        real = current.resolve()
        if real in inside:
            return
        for path in current.iterdir():  # put in path order once, at the end
            if skip_hidden and path.name.startswith("."):
                continue
            if path.is_dir():
                walk(path, inside | {real})
            elif path.is_file():
                found.append(path)

    walk(Path(folder), frozenset())
    return sorted(found)


def write_json(path: str | os.PathLike, data: Any) -> None:
    with atomic_write(path, "w") as handle:
        json.dump(data, handle, indent=2, sort_keys=False, default=_json_default)
        handle.write("\n")


def read_json(path: str | os.PathLike) -> Any:
    with open(path) as handle:
        return json.load(handle)


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def to_uint8(picture: np.ndarray) -> np.ndarray:
    """The one 8-bit quantisation of pictures: float in [0, 1] (clipped first) or bool -> uint8 0..255, rounded to
    nearest (x * 255 + 0.5, truncated); uint8 is returned as it is. Same shape; any shape."""
    array = np.asarray(picture)
    if array.dtype == np.uint8:
        return array
    if array.dtype == bool:
        array = array.astype(np.float32)
    return (np.clip(array, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def save_mask_png(path: str | os.PathLike, mask: np.ndarray) -> None:
    """Save a boolean (H, W) mask as a black/white 8-bit PNG that any image viewer opens."""
    image = Image.fromarray(to_uint8(np.asarray(mask, dtype=bool)), mode="L")
    with atomic_write(path) as handle:
        image.save(handle, format="PNG")


def load_mask_png(path: str | os.PathLike) -> np.ndarray:
    return np.asarray(Image.open(path).convert("L")) > 127


def save_image_png(path: str | os.PathLike, image: np.ndarray) -> None:
    """Save an RGB image given as float (H, W, 3) in [0, 1] or uint8."""
    with atomic_write(path) as handle:
        Image.fromarray(to_uint8(image), mode="RGB").save(handle, format="PNG")


def load_image_png(path: str | os.PathLike) -> np.ndarray:
    """Load an image as float32 (H, W, 3) in [0, 1]."""
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0


def save_array(path: str | os.PathLike, array: np.ndarray) -> None:
    """Save a float map compactly (float16 .npy; attention maps need no more precision)."""
    with atomic_write(path) as handle:
        np.save(handle, np.asarray(array, dtype=np.float16))


def load_array(path: str | os.PathLike) -> np.ndarray:
    return np.load(path).astype(np.float32)
