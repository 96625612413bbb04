"""The shapes-world experiment scripts of experiments/shapes/ (segmenter budget, fine-tuning curve, every concept)
run end to end on the tests' tiny model, so they cannot rot: each reruns stages through the command line in
copies of a finished run and writes its table, and the settings it varies reach the runs it makes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO
from test_end_to_end import TINY_STEPS

SHAPES = REPO / "experiments" / "shapes"
sys.path.insert(0, str(SHAPES))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}


@pytest.fixture(scope="module")
def tiny_overrides(tiny_model) -> list[str]:
    return [f"diffusion.path={tiny_model}", "data.num_train=8", "data.num_test=4", *TINY_STEPS]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_overrides):
    """A tiny shapes run through synthesize, made by the command line (so it has its .hydra record)."""
    run_dir = tmp_path_factory.mktemp("shape-experiments") / "run"
    subprocess.run([sys.executable, "-m", "conceptdistill", "stages=[masks,finetune,inpaint,synthesize]",
                    "logger=none", "quiet=true", *tiny_overrides, f"hydra.run.dir={run_dir}"],
                   check=True, cwd=REPO, env=ENV)
    return run_dir


def main_with(module, monkeypatch, *argv: str) -> None:
    for key in ("OMP_NUM_THREADS", "HF_HUB_OFFLINE", "WANDB_MODE"):
        monkeypatch.setenv(key, ENV[key])
    monkeypatch.setattr(sys, "argv", [module.__file__, *argv])
    module.main()


def test_segmenter_budget_trains_each_budget_and_tabulates_it(finished, tiny_overrides, tmp_path, monkeypatch):
    import segmenter_budget

    out = tmp_path / "segmenter_budget"
    main_with(segmenter_budget, monkeypatch, "--run", str(finished), "--budgets", "2:3:32", "3:2:32",
              "--work", str(tmp_path / "work"), "--out", str(out), "--", *tiny_overrides)
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["concept"] == "circle" and [r["budget"]["steps"] for r in record["budgets"]] == [2, 3]
    for row in record["budgets"]:
        assert set(row["iou"]) == {"truth", "refined"} and all(0 <= v <= 1 for v in row["iou"].values())
        budget = row["budget"]
        folder = tmp_path / "work" / f"{budget['steps']}-{budget['depth']}-{budget['size']}"
        checkpoint = torch.load(folder / "segment" / "truth" / "final.ckpt", map_location="cpu", weights_only=False)
        assert checkpoint["global_step"] == budget["steps"]
        assert checkpoint["hyper_parameters"]["encoder_depth"] == budget["depth"]
    table = out.with_suffix(".md").read_text()
    assert "| 3 | 2 | 32 |" in table and record["command"] in table
    assert out.with_suffix(".png").stat().st_size > 0


def test_finetune_curve_reruns_finetuning_and_the_crop_baseline(finished, tmp_path, monkeypatch):
    import finetune_curve

    out = tmp_path / "out" / "finetune_curve"  # a folder that does not exist yet
    # no extra overrides: the run's own (its .hydra record: the tiny model and budgets) are replayed
    main_with(finetune_curve, monkeypatch, "--run", str(finished), "--lora-steps", "0", "1", "--full-steps", "1",
              "--work", str(tmp_path / "work"), "--out", str(out))
    record = json.loads(out.with_suffix(".json").read_text())
    families = [(r["family"], r["steps"]) for r in record["rows"]]
    # the run's own recipe (2 LoRA steps, its recorded result), the base model, 1 LoRA step, full, the crop baseline
    assert families == [("lora", 2), ("lora", 0), ("lora", 1), ("full", 1), ("crop", None)]
    own = json.loads((finished / "inpaint" / "DONE.json").read_text())["summary"]
    assert record["rows"][0]["refined_iou"] == own["rows"]["refined_masks"]["iou"]
    for row in record["rows"]:
        assert 0 <= row["object_removal_rate"] <= 1 and row["judged"] == 4 and 0 <= row["refined_iou"] <= 1
    work = tmp_path / "work"
    assert json.loads((work / "lora-0" / "finetune" / "DONE.json").read_text())["summary"]["steps"] == 0
    assert json.loads((work / "full-1" / "finetune" / "DONE.json").read_text())["summary"]["adapter"] == "full"
    assert not (work / "crop" / "finetune").exists()  # M_crop reads no fine-tuned model
    assert json.loads((work / "crop" / "inpaint" / "DONE.json").read_text())["inputs"].keys() == {"masks"}
    assert "M_crop" in out.with_suffix(".md").read_text() and out.with_suffix(".png").stat().st_size > 0


def test_the_scripts_refuse_bad_input_before_any_work(finished, tmp_path, monkeypatch, capsys):
    import concepts
    import finetune_curve
    import segmenter_budget

    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / ".hydra").mkdir()
    (unfinished / ".hydra" / "overrides.yaml").write_text("[]\n")
    with pytest.raises(SystemExit, match="has not finished stage"):
        main_with(finetune_curve, monkeypatch, "--run", str(unfinished), "--out", str(tmp_path / "x"))
    with pytest.raises(SystemExit, match="not a run folder"):
        main_with(segmenter_budget, monkeypatch, "--run", str(tmp_path), "--out", str(tmp_path / "x"))
    for budget in ("abc", "10:3", "0:3:32", "10:9:32", "10:3:30"):
        with pytest.raises(SystemExit) as exit_info:
            main_with(segmenter_budget, monkeypatch, "--run", str(finished), "--budgets", "10:3:32", budget,
                      "--out", str(tmp_path / "x"))
        assert exit_info.value.code == 2 and repr(budget) in capsys.readouterr().err
    with pytest.raises(SystemExit):
        # the words are checked also when the world's settings are overridden (they were skipped then)
        main_with(concepts, monkeypatch, "--concepts", "circle", "dragon", "--out", str(tmp_path / "x"), "--",
                  "data.num_train=8")
    assert "['dragon'] are not shapes or colours" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="no finished world stage"):
        main_with(concepts, monkeypatch, "--fidelity", str(unfinished), "--out", str(tmp_path / "x"))
    assert not (tmp_path / "work").exists() and not list(tmp_path.glob("x.*"))


def test_concepts_runs_the_whole_method_per_concept(tiny_overrides, tmp_path, monkeypatch):
    import concepts

    out = tmp_path / "concepts"
    # a world stage's record of each word's prompt fidelity (tests/stages/test_world_stage.py measures a real one)
    measured = tmp_path / "fidelity" / "world"
    measured.mkdir(parents=True)
    (measured / "DONE.json").write_text(json.dumps({
        "command": "python -m conceptdistill stages=[world] world.init_from=packaged world.max_steps=0",
        "summary": {"word_fidelity": {"circle": 1.0, "square": 0.75}, "fidelity_settings": {"samples": 200}}}))
    main_with(concepts, monkeypatch, "--concepts", "square", "--work", str(tmp_path / "work"), "--out", str(out),
              "--experiment", "shapes_demo", "--fidelity", str(measured.parent), "--", "logger=none", *tiny_overrides)
    record = json.loads(out.with_suffix(".json").read_text())
    (row,) = record["rows"]
    results = json.loads((tmp_path / "work" / "square" / "report" / "results.json").read_text())
    assert results["concept"] == ["square"]
    assert row["concept"] == "square" and set(row["iou"]) == {key for key, _ in concepts.LADDER}
    best = max(row["iou"][k] for k in concepts.LABEL_FREE)
    assert row["fraction_of_supervised"] == pytest.approx(best / row["iou"]["unet_truth"])
    table = out.with_suffix(".md").read_text()
    assert "| square |" in table and "experiment=shapes_demo" in table
    assert "prompt fidelity of the word |" in table and table.rstrip().endswith("| 0.750 |")
