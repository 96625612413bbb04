"""`make reproduce` records a run's report with experiments/record_report.py: the previous record goes whole."""

from __future__ import annotations

import json
import sys

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "experiments"))


def test_a_new_record_replaces_the_old_one_whole(tmp_path):
    from record_report import record_report

    report, destination = tmp_path / "run" / "report", tmp_path / "experiments" / "shapes"
    destination.mkdir(parents=True)
    (destination / "results.json").write_text(json.dumps({"figures": ["masks_grid.png", "finetune_samples.png"]}))
    for name in ("masks_grid.png", "finetune_samples.png", "results.md", "world_grid.png"):
        (destination / name).write_text("old")
    with pytest.raises(FileNotFoundError, match="report/results.json"):
        record_report(tmp_path / "run", destination)
    report.mkdir(parents=True)
    (report / "results.json").write_text(json.dumps({"figures": ["masks_grid.png"]}))
    for name in ("masks_grid.png", "index.html", "unlisted.png"):
        (report / name).write_text("new")
    (report / "results.md").write_text(f"new, run in {REPO}/runs/x")
    assert sorted(record_report(tmp_path / "run", destination)) == ["index.html", "masks_grid.png", "results.json",
                                                                   "results.md"]
    assert not (destination / "finetune_samples.png").exists()  # the old run's figure the new one lacks
    assert (destination / "masks_grid.png").read_text() == "new"
    assert (destination / "results.md").read_text() == "new, run in runs/x"  # relative to the checkout
    assert (destination / "world_grid.png").read_text() == "old"  # not part of the record
