"""A content fingerprint of a model folder, so that finished work is reused only for the same weights."""

from __future__ import annotations

import os

from conceptdistill.diffusion.loading import _resolve_source

_FINGERPRINTS: dict[tuple, str] = {}


def model_fingerprint(source: str | os.PathLike, *, revision: str | None = None) -> str:
    """A content fingerprint of a model folder (16 hex digits), so that finished work is reused only for the
    same weights, wherever the folder lies.

    Covers every file's relative path and its whole content (sha256): any changed weight changes it, moving the
    folder does not. (Hashing only part of each weight file missed weights edited in place at the same size.)
    `training.json` (a record about the model, rewritten when its fidelity is re-measured) is left out. Cached
    per file listing (paths, sizes, modification times) within the process; hashing reads the whole folder
    once per process (a few seconds for Stable Diffusion's 4-5 GB).

    Raises:
        ModelNotFoundError: as `load_diffusion_parts`, when the folder or cached hub snapshot is missing.
    """
    import hashlib

    folder = _resolve_source(str(source), revision, local_files_only=True)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "training.json")
    listing = tuple((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    key = (str(folder.resolve()), listing)
    if key not in _FINGERPRINTS:
        digest = hashlib.sha256()
        for path, (relative, size, _) in zip(files, listing, strict=True):
            with open(path, "rb") as handle:
                content = hashlib.file_digest(handle, "sha256").hexdigest()
            digest.update(f"{relative}\0{size}\0{content}\0".encode())
        _FINGERPRINTS[key] = digest.hexdigest()[:16]
    return _FINGERPRINTS[key]
