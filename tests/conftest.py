"""Shared test set-up: offline hub access, small thread counts, and config composition helpers."""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import tempfile
from pathlib import Path

# Read by huggingface_hub at import time: nothing in the tests may reach a hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# File digests (utils/digests.py) are remembered in a cache of the session's own, never the user's.
os.environ["CONCEPTDISTILL_CACHE"] = tempfile.mkdtemp(prefix="conceptdistill-test-cache-")
atexit.register(shutil.rmtree, os.environ["CONCEPTDISTILL_CACHE"], True)

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CONF_DIR = REPO / "conf"


def compose(overrides: list[str] | None = None, run_dir: Path | None = None):
    """The app's config as `python -m conceptdistill <overrides>` would compose it (hydra interpolations
    that only exist inside a running app are replaced by `run_dir`)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from conceptdistill.__main__ import normalise_overrides

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=normalise_overrides(list(overrides or [])),
                            return_hydra_config=False)
    if run_dir is not None:
        from omegaconf import open_dict

        with open_dict(cfg):
            cfg.run_dir = str(run_dir)
    return cfg


@pytest.fixture
def compose_config():
    return compose


@contextlib.contextmanager
def one_torch_thread():
    """One torch thread for tiny models, also inside `run()` (which would take every core), restored after. On a
    shared 2-core machine two OpenMP threads fighting another process run a tiny UNet 10-100x slower. A context
    manager, so that module-scoped fixtures (which cannot use monkeypatch) share it."""
    import torch

    from conceptdistill import runner

    threads, configure = torch.get_num_threads(), runner._configure_torch
    torch.set_num_threads(1)
    runner._configure_torch = lambda: torch.set_num_threads(1)
    try:
        yield
    finally:
        runner._configure_torch = configure
        torch.set_num_threads(threads)


@pytest.fixture
def single_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """The seed-0 tiny SD-shaped pipeline (KL VAE, 2x down: 32 px images -> 16x16 latents) saved in
    diffusers layout, as a user's Stable Diffusion folder would be."""
    from conceptdistill.diffusion.loading import save_diffusion_parts
    from conceptdistill.diffusion.tiny import build_tiny_parts

    return save_diffusion_parts(build_tiny_parts(), tmp_path_factory.mktemp("tiny-model") / "pipeline")


@pytest.fixture(scope="session")
def tiny_family_model(request, tmp_path_factory) -> Path:
    """The seed-0 tiny pipeline of one family ("sdxl", "sd3", "sd35" or "flux"; see diffusion/tiny_families.py),
    saved by the stock diffusers pipeline as a user's download would be; one folder per family and session.
    Parametrise indirectly with the family name, in a parametrize call of its own (one that also sets a direct
    argument gives the parameter function scope, and the folder is rebuilt for every test):
    ``@pytest.mark.parametrize("tiny_family_model", ["flux"], indirect=True)``."""
    from conceptdistill.diffusion.tiny_families import save_tiny_model

    family = getattr(request, "param", None)
    if family is None:
        raise pytest.UsageError(
            "tiny_family_model needs a family: @pytest.mark.parametrize('tiny_family_model', ['sdxl'], indirect=True)"
        )
    with one_torch_thread():
        return save_tiny_model(tmp_path_factory.mktemp(f"tiny-{family}") / "pipeline", family)


# CLIP's BPE table (open_clip's copy): a header line, then merges in rank order. CLIP keeps the first
# 49152 - 256 - 2 of them, so that 256 bytes + 256 bytes with "</w>" + merges + 2 special tokens = 49408 ids.
CLIP_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
CLIP_MERGES = 49152 - 256 - 2


@pytest.fixture(scope="session")
def clip_tokenizer(tmp_path_factory):
    """Stable Diffusion's CLIP tokenizer (49408 ids, model_max_length 77) rebuilt offline from the BPE table
    that ships in the open_clip_torch wheel (dev extra), as a `transformers.CLIPTokenizer`."""
    import gzip
    import importlib.util
    import json

    from transformers import CLIPTokenizer

    from conceptdistill.diffusion.tokenizer import BOS_TOKEN, END_OF_WORD, EOS_TOKEN, _byte_alphabet

    # find_spec locates the package without importing it (importing open_clip loads torch models: seconds).
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("open_clip_torch (dev extra) is not installed: no CLIP vocabulary to test against")
    bpe_file = Path(next(iter(spec.submodule_search_locations))) / CLIP_BPE_FILE
    with gzip.open(bpe_file, "rt", encoding="utf-8") as handle:
        merges = handle.read().split("\n")[1 : CLIP_MERGES + 1]
    alphabet = _byte_alphabet()
    symbols = alphabet + [c + END_OF_WORD for c in alphabet] + ["".join(m.split()) for m in merges]
    vocab = {symbol: i for i, symbol in enumerate(symbols + [BOS_TOKEN, EOS_TOKEN])}
    assert len(vocab) == 49408, "CLIP's vocabulary has 49408 distinct entries"

    folder = tmp_path_factory.mktemp("clip-tokenizer")
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
