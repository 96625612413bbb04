"""A content fingerprint of a model folder, so that finished work is reused only for the same weights."""

from __future__ import annotations

import os

from conceptdistill.diffusion.loading import _resolve_source


def model_fingerprint(source: str | os.PathLike, *, revision: str | None = None) -> str:
    """A content fingerprint of a model folder (16 hex digits), so that finished work is reused only for the
    same weights, wherever the folder lies.

    Covers every file's relative path and its whole content (sha256), also in linked subfolders (a fine-tuned
    unet/ linked into a base model): any changed weight changes it, moving the folder does not. (Hashing only
    part of each weight file missed weights edited in place at the same size.) Left out: hidden entries (.git/,
    a download's .cache/, which change without the weights) and `training.json` (a record about the model,
    rewritten when its fidelity is re-measured); the loaders read neither. Each file's digest is read once and
    then remembered across processes while the file stays unchanged (utils/digests.py: keyed by device, inode,
    size, modification and status-change times): reading the whole folder costs seconds for Stable Diffusion's
    4-5 GB and about half a minute for FLUX's 35 GB.

    Raises:
        ModelNotFoundError: as `load_diffusion_parts`, when the folder or cached hub snapshot is missing.
    """
    import hashlib

    from conceptdistill.utils.digests import file_digests
    from conceptdistill.utils.io import files_under

    folder = _resolve_source(str(source), revision, local_files_only=True)
    files = [p for p in files_under(folder, skip_hidden=True) if p.name != "training.json"]
    digest = hashlib.sha256()
    for path, content in zip(files, file_digests(files), strict=True):
        digest.update(f"{path.relative_to(folder)}\0{path.stat().st_size}\0{content}\0".encode())
    return digest.hexdigest()[:16]
