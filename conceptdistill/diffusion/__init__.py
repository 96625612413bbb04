"""The diffusion layer: loading/saving latent diffusion models offline, tiny stand-ins, attention capture.

Submodules (import them directly; this package does not import torch/diffusers until a name is used):

- `parts`: `DiffusionParts` (the SD 1.x/2.x family and the interface every stage uses); `families/`: SDXL,
  SD 3 / 3.5 and FLUX (flow matching in `families/flow.py`).
- `loading`: `load_diffusion_parts`, `save_diffusion_parts`, `ModelNotFoundError`; `fingerprint`: `model_fingerprint`.
- `latent`: `SpaceToDepthAutoencoder`, the lossless latent map of the shapes world.
- `tokenizer`: `write_word_tokenizer`, `concept_token_indices`; `t5_tokenizer`: `write_t5_tokenizer`.
- `tiny`: `build_tiny_parts`, random SD-shaped parts for tests; `tiny_families`: `save_tiny_model` for the other
  families; `real_size`: `build_from_configs`, the published architectures with random weights.
- `attention`: `AttentionStore`, `capture_attention`, `capture_cross_attention`; `processors`: the capturing
  attention processors; `concept_attention`: `ConceptAttentionStore`, ConceptAttention's output-space maps for
  the MMDiT families.
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> submodule; resolved on first attribute access (PEP 562) so `import conceptdistill.diffusion` is cheap.
_EXPORTS = {
    "DiffusionParts": "parts",
    "ModelNotFoundError": "loading",
    "load_diffusion_parts": "loading",
    "save_diffusion_parts": "loading",
    "SpaceToDepthAutoencoder": "latent",
    "write_word_tokenizer": "tokenizer",
    "concept_token_indices": "tokenizer",
    "build_tiny_parts": "tiny",
    "AttentionStore": "attention",
    "CapturingAttnProcessor": "processors",
    "capture_attention": "attention",
    "capture_cross_attention": "attention",
    "ConceptAttentionStore": "concept_attention",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
