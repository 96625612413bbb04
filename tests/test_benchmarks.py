"""The benchmark scripts of experiments/benchmarks/ run their core on the tests' tiny model, so they cannot rot.

`make bench` runs them for real (minutes, an SD 1.x-shaped UNet and the shapes world's model); here each one's
measuring and reporting code runs in seconds: the peer benchmark's worker in-process for the project's methods
(plain, capture, the reference code's keep-everything store), its summary and table; the passes curve end to
end on four images with three schedules.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "experiments" / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))


@pytest.fixture(scope="module")
def peer_folder(tmp_path_factory):
    import bench_peers

    folder = tmp_path_factory.mktemp("bench-peers")
    setup = bench_peers.prepare(folder, resolution=32, max_steps=3, tiny=True)
    assert setup["latent"][-2:] == [16, 16] and len(setup["timesteps"]) == 3
    assert setup["timesteps"][-1] == 1  # the masks stage's grid ends at t = 1
    return folder


def worker_spec(folder: Path, method: str, steps: int, layers_name: str) -> dict:
    import bench_peers

    return {"folder": str(folder), "steps": steps, "method": method, "layers_name": layers_name,
            "layers": bench_peers.LAYER_SETS[layers_name], "token_index": bench_peers.TOKEN_INDEX,
            "prompt": bench_peers.PROMPT, "word": bench_peers.WORD, "device": "cpu", "threads": 1}


def test_peer_benchmark_core(peer_folder, single_thread):
    import bench_peers
    import peer_worker

    results = []
    for steps in (2, 3):
        for method in ("plain", "capture", "reference"):
            for layers_name in (["all"] if method == "plain" else ["all", "16px"]):
                result = peer_worker.run(worker_spec(peer_folder, method, steps, layers_name))
                result["repeat"] = 0
                results.append(result)
    by = {(r["method"], r["steps"], r["layers_name"]): r for r in results}
    for key, r in by.items():
        assert r["seconds_per_image"] > 0 and r["peak_rss_mb"] >= r["baseline_rss_mb"] > 0, key
    # the same UNet output in every process; the reference store gives exactly the project's map
    assert len({r["checksum"] for r in results}) == 1
    for steps in (2, 3):
        for layers_name in ("all", "16px"):
            capture = np.array(by[("capture", steps, layers_name)]["map"])
            reference = np.array(by[("reference", steps, layers_name)]["map"])
            np.testing.assert_allclose(reference, capture, rtol=1e-5, atol=1e-7)
    # what each keeps: the running sum is flat in steps, the reference grows with steps and layers
    assert by[("capture", 2, "all")]["retained_mb"] == by[("capture", 3, "all")]["retained_mb"]
    assert by[("reference", 3, "all")]["retained_mb"] == pytest.approx(1.5 * by[("reference", 2, "all")]["retained_mb"])
    assert by[("reference", 3, "all")]["retained_mb"] > by[("reference", 3, "16px")]["retained_mb"] > 0

    summary = bench_peers.summarise(results)
    ratios = {(e["steps"], e["layers"]): e for e in summary["ratios"]}
    assert set(ratios) == {(2, "all"), (2, "16px"), (3, "all"), (3, "16px")}
    assert all(e["capture_over_plain"] > 0 and e["reference_over_capture"] > 0 for e in ratios.values())
    assert all(a["max_abs_difference"] < 1e-6 for a in summary["map_agreement"])
    record = {"date": "2026-01-01", "command": "python bench_peers.py --tiny", "device": "CPU, 1 threads",
              "wall_seconds": 1.0, "resolution": 32, "repeats": 1,
              "setup": {"parameters_m": 1.0, "latent": [1, 4, 16, 16]}, "summary": summary, "daam_skipped": "test"}
    table = bench_peers.markdown(record)
    assert "| (b) this project's capture | all |" in table and "| (d) reference code (keep all) | 16px |" in table
    assert "| 3 | all |" in table and "DAAM not measured: test" in table


def test_reference_store_keeps_every_token_map():
    from reference_store import ReferenceStore

    store = ReferenceStore([1, 2], (4, 4))
    probs = torch.softmax(torch.randn(2 * 3, 4, 5), dim=-1)  # batch 2, 3 heads, a 2x2 layer, 5 tokens
    store("up_blocks.1.attentions.0.transformer_blocks.0.attn2", probs, heads=3)
    store("up_blocks.1.attentions.0.transformer_blocks.0.attn2", probs, heads=3)
    assert store.stored_bytes() == 2 * (2 * 5 * 2 * 2 * 4)  # two calls of (batch, tokens, 2, 2) float32
    expected = probs.reshape(2, 3, 4, 5)[..., [1, 2]].sum(-1).mean(1).reshape(2, 1, 2, 2)
    expected = torch.nn.functional.interpolate(expected, size=(4, 4), mode="nearest")[:, 0]
    torch.testing.assert_close(store.mean(), expected)
    store.reset()
    assert store.stored_bytes() == 0 and store.count == 0


def test_passes_curve_core(tmp_path, single_thread):
    pytest.importorskip("matplotlib")
    import bench_passes

    record = bench_passes.main(["--tiny", "--images", "4", "--bootstrap", "5", "--threads", "1",
                                "--out", str(tmp_path)])
    for name in ("passes_curve.json", "passes_curve.md", "passes_curve.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    rows = record["rows"]
    assert [r["passes"] for r in rows] == [2, 1, 2]
    assert rows[0]["timesteps"] == [21, 1] and rows[2]["draws"] == 2
    assert "iou_2" in rows[0] and "delta_iou_2" in rows[1] and "delta_iou_2" not in rows[2]
    for row in rows:
        assert 0 <= row["auc"] <= 100 and 0 <= row["iou"] <= 100
    for row in rows[1:]:
        low, mid, high = row["delta_auc_interval"]
        assert low <= mid <= high
    assert json.loads((tmp_path / "passes_curve.json").read_text())["images"] == 4
    assert "| T=50, last 2 | 2 |" in (tmp_path / "passes_curve.md").read_text()


def test_knee_rule():
    import bench_passes

    def row(name, passes, d_auc, d_iou, d_auc_2=0.0, d_iou_2=0.0, draws=1, family="strided"):
        return {"name": name, "passes": passes, "delta_auc": d_auc, "delta_iou": d_iou, "delta_auc_2": d_auc_2,
                "delta_iou_2": d_iou_2, "draws": draws, "family": family}

    rows = [row("ref", 40, 0, 0, family="reference"), row("a", 20, -0.2, -0.4), row("b", 10, -0.1, 0.3, 0.2, -0.6),
            row("c", 10, 0.0, 0.0, draws=2), row("d", 5, 2.0, 3.0), row("e", 20, 0.1, 0.1)]
    assert bench_passes.knee(rows)["name"] == "e"  # as few passes as "a", and closer
    assert bench_passes.knee(rows[:1] + rows[2:5]) is None  # b fails on its second draw; c has two draws per step
