"""Where a configured diffusion model's weights are: a local folder, a hub id in the local cache, or the
shapes-world model committed with the package."""

from __future__ import annotations

from pathlib import Path

#: the shapes world's committed model (written by `make world-model`)
PACKAGED_WORLD_MODEL = Path(__file__).resolve().parent.parent / "assets" / "shapes_world"


def resolve_model_path(model_cfg) -> str:
    """`diffusion.path` when set (a folder or a cached hub id), else the packaged shapes-world model."""
    path = model_cfg.get("path")
    if path:
        return str(Path(path).expanduser()) if Path(path).expanduser().exists() else str(path)
    return str(PACKAGED_WORLD_MODEL)
