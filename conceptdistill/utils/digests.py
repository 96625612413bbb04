"""Content digests (sha256) of files, remembered across processes.

A model folder is fingerprinted by the whole content of every file (diffusion/fingerprint.py), so that weights
edited in place are a different model. Reading 5 GB (Stable Diffusion) to 35 GB (FLUX with T5) costs each
command 4-30 s from the page cache, minutes from a network disk, and every job of a sweep pays it. This module
keeps each file's digest in a small JSON file beside the user's other caches, with the file's identity when it
was read: device, inode, size, modification time and status-change time (ctime, in nanoseconds). Any write to a
file, or a restore of its modification time after one, changes its ctime, which no user call can set back; a
file whose identity differs in any way is read again. The cache can only save reading: a digest it returns is
one computed from the same, unchanged file.

The cache lives in $CONCEPTDISTILL_CACHE, else $XDG_CACHE_HOME/conceptdistill, else ~/.cache/conceptdistill.
A missing, unreadable or corrupt cache file is treated as empty; one that cannot be written is left as it is.
Entries of files that no longer exist are dropped whenever the cache is written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from pathlib import Path

from conceptdistill.utils.io import atomic_write

log = logging.getLogger(__name__)

CACHE_FILE = "file_digests.json"
_LOCK = threading.Lock()


def cache_dir() -> Path:
    """The folder of the digest cache (see the module docstring)."""
    explicit = os.environ.get("CONCEPTDISTILL_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "conceptdistill"


def _identity(stat: os.stat_result) -> list[int]:
    return [stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns]


def file_state(path: str | os.PathLike) -> str:
    """'real path:inode:size:mtime_ns:ctime_ns' of a file, for listings that stand for its content without
    reading it (a data set's images): any write changes it, also one that restores the size and modification
    time (the ctime then moves), and so does a link pointed at another file or a file renamed over it, even one
    with the same times; so do metadata changes (chmod), which only cost a rerun. Raises OSError for a missing
    file."""
    stat = os.stat(path)
    return f"{os.path.realpath(path)}:{stat.st_ino}:{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ctime_ns}"


def _read_cache(path: Path) -> dict[str, dict]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def file_digests(paths: list[Path]) -> list[str]:
    """The sha256 hex digest of each file's content, in order, read only for files the cache does not hold
    with the same identity. Raises OSError when a file cannot be read."""
    store = cache_dir() / CACHE_FILE
    with _LOCK:
        cache = _read_cache(store)
        digests, changed = [], False
        for path in paths:
            key = str(Path(path).resolve())
            identity = _identity(os.stat(key))
            entry = cache.get(key)
            if not (isinstance(entry, dict) and entry.get("identity") == identity and isinstance(entry.get("sha256"), str)):
                with open(key, "rb") as handle:
                    digest = hashlib.file_digest(handle, "sha256").hexdigest()
                if _identity(os.stat(key)) != identity:  # written while being read: no entry to trust
                    raise OSError(f"{key} changed while its digest was computed; run again once it is complete")
                entry = cache[key] = {"identity": identity, "sha256": digest}
                changed = True
            digests.append(entry["sha256"])
        if changed:
            _write_cache(store, cache)
    return digests


def _write_cache(store: Path, cache: dict[str, dict]) -> None:
    """Write the cache, merged with entries another process wrote meanwhile (ours win for the same file), less
    the entries of files that no longer exist (moved or deleted models)."""
    try:
        merged = {key: entry for key, entry in {**_read_cache(store), **cache}.items() if os.path.isfile(key)}
        with atomic_write(store, "w") as handle:
            json.dump(merged, handle)
    except OSError as err:  # a read-only home or cache folder: digests are then computed every time
        log.debug("digest cache not written (%s): %s", store, err)
