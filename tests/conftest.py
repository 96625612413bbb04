"""Shared test set-up: offline hub access, small thread counts, and config composition helpers."""

from __future__ import annotations

import os
from pathlib import Path

# Read by huggingface_hub at import time: nothing in the tests may reach a hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CONF_DIR = REPO / "conf"


def compose(overrides: list[str] | None = None, run_dir: Path | None = None):
    """The app's config as `python -m conceptdistill <overrides>` would compose it (hydra interpolations
    that only exist inside a running app are replaced by `run_dir`)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=list(overrides or []), return_hydra_config=False)
    if run_dir is not None:
        from omegaconf import open_dict

        with open_dict(cfg):
            cfg.run_dir = str(run_dir)
    return cfg


@pytest.fixture
def compose_config():
    return compose


@pytest.fixture
def single_thread(monkeypatch):
    """One torch thread for tiny models, also inside `run()` (which would take every core). On a shared
    2-core machine two OpenMP threads fighting another process run a tiny UNet 10-100x slower."""
    import torch

    from conceptdistill import runner

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setattr(runner, "_configure_torch", lambda: torch.set_num_threads(1))
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """The seed-0 tiny SD-shaped pipeline (KL VAE, 2x down: 32 px images -> 16x16 latents) saved in
    diffusers layout, as a user's Stable Diffusion folder would be."""
    from conceptdistill.diffusion.loading import save_diffusion_parts
    from conceptdistill.diffusion.tiny import build_tiny_parts

    return save_diffusion_parts(build_tiny_parts(), tmp_path_factory.mktemp("tiny-model") / "pipeline")
