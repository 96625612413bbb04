"""Copy a finished run's report into experiments/<name>/ as the recorded result, replacing the previous record
whole: the files the previous record listed (results.json's "figures", results.md, index.html) are removed
first, so that no figure of an older run stays beside new numbers. Other files of the folder are kept. Paths
under this checkout in the text files are written relative to it.

    python experiments/record_report.py runs/reproduce/shapes experiments/shapes     # as `make reproduce` does
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

RECORD = ("results.json", "results.md", "index.html")
REPO = Path(__file__).resolve().parent.parent


def recorded_files(folder: Path) -> list[str]:
    """The files of the record in `folder` (its results.json names its figures); [] when there is none."""
    results = folder / "results.json"
    if not results.is_file():
        return []
    return [*RECORD, *json.loads(results.read_text()).get("figures", [])]


def record_report(run: Path, destination: Path) -> list[str]:
    """Replace the record in `destination` by `run`'s report; returns the names copied.

    Raises:
        FileNotFoundError: when the run has no finished report (report/results.json)."""
    report = run / "report"
    if not (report / "results.json").is_file():
        raise FileNotFoundError(f"{run} has no report/results.json: run its report stage first")
    destination.mkdir(parents=True, exist_ok=True)
    for name in recorded_files(destination):
        (destination / name).unlink(missing_ok=True)
    copied = [name for name in recorded_files(report) if (report / name).is_file()]
    for name in copied:
        if name in RECORD:  # paths under this checkout are written relative to it: a record names no machine's path
            text = (report / name).read_text().replace(f"{REPO}/", "")
            (destination / name).write_text(text)
        else:
            shutil.copy2(report / name, destination / name)
    return copied


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    print("recorded:", ", ".join(record_report(Path(sys.argv[1]), Path(sys.argv[2]))))
