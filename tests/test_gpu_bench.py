"""The GPU benchmark script runs end to end in its dry mode (tiny models on the CPU), so it cannot rot between
the sessions that have a GPU; its real-size configs build the published architectures."""

from __future__ import annotations

import importlib.util
import json

import pytest
from conftest import REPO, one_torch_thread

SCRIPT = REPO / "experiments" / "benchmarks" / "gpu_bench.py"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dry_mode_measures_every_family_and_writes_the_tables(tmp_path):
    with one_torch_thread():
        record = _module().main(["--dry", "--out", str(tmp_path / "gpu.json")])
    families = [row["family"] for row in record["rows"]]
    assert families == ["sd15", "sdxl", "sd3", "sd35", "flux"]
    for row in record["rows"]:
        assert row["plain_passes_per_s"] > 0 and row["capture_passes_per_s"] > 0, row
    for row in (r for r in record["rows"] if r["family"] in ("sd15", "sdxl")):
        assert row["lora_steps_per_s"] > 0 and row["lora_gc_steps_per_s"] > 0 and row["full_steps_per_s"] > 0, row
    assert json.loads((tmp_path / "gpu.json").read_text())["rows"] == record["rows"]
    table = (tmp_path / "gpu.md").read_text()
    assert "--dry" in table and all(f"| {family} |" in table for family in families)


@pytest.mark.parametrize("family", ["sd15", "sdxl", "sd3", "sd35", "flux"])
def test_real_size_configs_build_the_published_architectures(family):
    import torch

    bench = _module()
    parts = bench.build_parts(family, "meta", torch.bfloat16, dry=False)  # no memory: shapes only
    billions = sum(p.numel() for p in parts.denoiser.parameters()) / 1e9
    expected = {"sd15": 0.86, "sdxl": 2.57, "sd3": 2.03, "sd35": 8.06, "flux": 11.9}[family]
    assert abs(billions - expected) / expected < 0.03, billions
    assert parts.latent_shape_for(bench.SHAPES[family][2])[1] == (64 if family == "sd15" else 128)


def test_meta_mode_finds_no_point_per_pass_where_a_gpu_would_wait(tmp_path):
    """`--device meta` counts, per denoiser pass, the blocking copies and read-backs of the masks loop (tiny
    models here; the record runs the published architectures); the capture adds none."""
    with one_torch_thread():
        record = _module().main(["--dry", "--device", "meta", "--families", "sd15", "sdxl", "flux",
                                 "--out", str(tmp_path / "sync_points.json")])
    for row in record["rows"]:
        assert row["plain_syncs_per_pass"] == 0 and row["capture_syncs_per_pass"] == 0, row
    table = (tmp_path / "sync_points.md").read_text()
    assert "| sd15 |" in table and "capture_syncs_per_pass" in table
