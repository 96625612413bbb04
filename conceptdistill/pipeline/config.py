"""Config views: what a stage may read of the composed config, and which of it can change results.

A stage runs with `config_view(cfg, keys)` of its declared settings (pipeline/registry.py), so it cannot read
a setting its fingerprint does not cover; `result_settings` is what its fingerprint hashes.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from conceptdistill.pipeline.registry import PRESENTATION_KEYS

__all__ = ["config_view", "inpainter_class", "refined_mask_name", "result_settings"]


def _select(cfg: DictConfig, keys, transform=lambda value, key: value) -> dict:
    """The resolved values of the dotted `keys` of `cfg` that exist, nested as in `cfg`."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    selected: dict = {}
    for key in keys:
        value, found = _lookup(plain, key)
        if found:
            _assign(selected, key, transform(value, key))
    return selected


def config_view(cfg: DictConfig, keys) -> DictConfig:
    """A struct config holding only `keys` (dotted) of `cfg`, resolved; reading any other key raises."""
    result = OmegaConf.create(_select(cfg, keys))
    OmegaConf.set_struct(result, True)
    return result


def result_settings(cfg: DictConfig, keys) -> dict:
    """The values of `keys` that can change results (`keys` less PRESENTATION_KEYS, at any depth)."""
    return _select(cfg, keys, _without_presentation)


def _without_presentation(value: Any, prefix: str) -> Any:
    if prefix in PRESENTATION_KEYS:
        return None
    if isinstance(value, dict):
        return {k: _without_presentation(v, f"{prefix}.{k}") for k, v in value.items() if f"{prefix}.{k}" not in PRESENTATION_KEYS}
    return value


def _lookup(plain: dict, key: str) -> tuple[Any, bool]:
    node: Any = plain
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None, False
        node = node[part]
    return node, True


def _assign(target: dict, key: str, value: Any) -> None:
    *parents, last = key.split(".")
    for part in parents:
        target = target.setdefault(part, {})
    target[last] = value


def inpainter_class(cfg: DictConfig) -> type:
    """The class `inpaint.module` names (a modules.inpainter.MaskRefiner; not instantiated, which needs the
    model)."""
    from hydra.utils import get_class

    return get_class(cfg.inpaint.module._target_)


def refined_mask_name(cfg: DictConfig) -> str:
    """What the refined masks of `cfg` are called in results tables: "M" (the diffusion model's inpainting, the
    method) or "M_crop" (the simple-inpainting baseline, `inpaint=crop`), so that no row passes the baseline off
    as the method."""
    return "M" if inpainter_class(cfg).repaints_with_model else "M_crop"
