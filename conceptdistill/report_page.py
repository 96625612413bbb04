"""The run's report as one self-contained HTML page (report/index.html), built with the standard library.

It shows what results.md shows (the ladder with the same rows and labels, the box protocols' columns and
definitions) and what a reader of a run folder also needs: every figure, the data counts, the seconds per
stage, links to the trained weights, and the composed settings (collapsed). It is readable offline and from a
copied run folder: figures are embedded as base64 data URIs, links are relative to the report folder, and
the page has no script and loads nothing from a network.
"""

from __future__ import annotations

import base64
import html
import mimetypes
from collections.abc import Sequence
from pathlib import Path

#: the box protocols' columns (results.json keys) with their labels and one-line definitions (docs/METHOD.md)
BOX_COLUMNS = (
    ("iou_mask_vs_box", "IoU mask vs box",
     "pooled IoU of the predicted masks with the rasterised truth boxes (the IoU column of mask data sets)"),
    ("iou_box", "IoU box",
     "mean over images of the IoU of the box around all predicted foreground with the union box of the "
     "image's truth boxes (an empty prediction scores 0)"),
)
#: scalar results shown under the table, when present
SCALARS = ("attention_auc", "attention_contrast", "prompt_fidelity", "shape_fidelity", "colour_fidelity",
           "background_fidelity")

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 70em; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #f3f3f3; }
figure { margin: 1em 0; } figure img { max-width: 100%; image-rendering: pixelated; border: 1px solid #ddd; }
pre { background: #f7f7f7; padding: 1em; overflow-x: auto; }
code { background: #f3f3f3; padding: 0 0.2em; }
"""


def table_columns(rows: dict) -> list[tuple[str, str]]:
    """(results.json key, header) of the results table's score columns: acc, IoU, mIoU, or for a box-scored
    data set (rows holding "iou_box") acc, IoU mask vs box, mIoU, IoU box."""
    if any("iou_box" in row for row in rows.values()):
        (mask_key, mask_label, _), (box_key, box_label, _) = BOX_COLUMNS
        return [("acc", "acc"), (mask_key, mask_label), ("miou", "mIoU"), (box_key, box_label)]
    return [("acc", "acc"), ("iou", "IoU"), ("miou", "mIoU")]


def percent(row: dict, key: str) -> str:
    """A score in [0, 1] as a percentage with one decimal ("12.3"); "-" where the row lacks it."""
    return f"{100 * row[key]:.1f}" if row.get(key) is not None else "-"


def scalar_text(value) -> str:
    """A declared scalar result as text: a number as "0.750"; a record {"value": ..., counts} as the value and
    the rest of the record, e.g. "0.750 (removed 96, judged 128, skipped 0, split test)"."""
    if not isinstance(value, dict):
        return f"{value:.3f}"
    rest = ", ".join(f"{key} {item}" for key, item in value.items() if key != "value")
    return f"{value['value']:.3f}" + (f" ({rest})" if rest else "")


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], numeric_from: int = 1, css_id: str = "") -> str:
    """An HTML table of already escaped cells (no header row when `headers` is empty); columns from
    `numeric_from` on are right-aligned numbers."""
    head = f"<thead><tr>{''.join(f'<th>{h}</th>' for h in headers)}</tr></thead>" if headers else ""
    body = "".join(
        "<tr>" + "".join(f'<td class="num">{c}</td>' if i >= numeric_from else f"<td>{c}</td>" for i, c in enumerate(row))
        + "</tr>" for row in rows)
    ident = f' id="{css_id}"' if css_id else ""
    return f"<table{ident}>{head}<tbody>{body}</tbody></table>"


def data_uri(path: Path) -> str:
    """The file as a base64 data URI (type from its extension, e.g. image/png), so the page needs no other file."""
    kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return f"data:{kind};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def results_section(results: dict, labels: dict[str, str], scalar_labels: dict[str, str] | None = None) -> str:
    """The ladder (rows and labels as results.md), the box protocols' definitions and the scalar results (the
    fixed `SCALARS`, then those the stages declare, `scalar_labels`: results.json key -> label)."""
    rows = results["rows"]
    if not rows:
        return "<h2>Results</h2><p>No stage has produced a scored row yet (or the data set has no ground truth).</p>"
    columns = table_columns(rows)
    parts = ["<h2>Results</h2>", "<p>Pixels pooled over the test images, in %.</p>", _table(
        ["method", *(_e(header) for _, header in columns)],
        [[_e(labels[key]), *(percent(row, column) for column, _ in columns)] for key, row in rows.items()],
        css_id="results")]
    if any(key == "iou_box" for key, _ in columns):
        parts.append("<ul>" + "".join(f"<li>{_e(label)} (<code>{key}</code>): {_e(definition)}.</li>"
                                      for key, label, definition in BOX_COLUMNS) + "</ul>")
    items = [f"<li>{_e(key.replace('_', ' '))}: {results[key]:.3f}</li>" for key in SCALARS
             if isinstance(results.get(key), (int, float))]
    items += [f'<li id="{_e(key)}">{_e(label)} (<code>{_e(key)}</code>): {_e(scalar_text(results[key]))}</li>'
              for key, label in (scalar_labels or {}).items() if key in results]
    if items:
        parts.append("<ul>" + "".join(items) + "</ul>")
    return "".join(parts)


def figures_section(folder: Path, names: Sequence[str]) -> str:
    """Every figure the report collected (files in `folder`), embedded."""
    if not names:
        return ""
    figures = "".join(f'<figure><img src="{data_uri(folder / name)}" alt="{_e(name)}">'
                      f"<figcaption>{_e(name)}</figcaption></figure>" for name in names)
    return f"<h2>Figures</h2>{figures}"


def data_section(data: dict | None) -> str:
    """Images kept and skipped per split by the setup scan (the masks stage's summary)."""
    if not data:
        return "<h2>Data</h2><p>No files were read (generated data), or the masks stage has not run.</p>"
    rows = [[_e(split), str(counts.get("kept", "-")), str(counts.get("skipped", "-")), str(counts.get("converted", "-"))]
            for split, counts in data.items()]
    return "<h2>Data</h2>" + _table(["split", "kept", "skipped", "converted"], rows, css_id="data")


def timings_section(seconds: dict) -> str:
    rows = [[_e(stage), f"{value:.1f}"] for stage, value in seconds.items()]
    return "<h2>Seconds per stage</h2>" + _table(["stage", "seconds"], rows, css_id="seconds")


def weights_section(links: dict[str, str]) -> str:
    """Links (paths relative to the report folder) to the trained weights, by name."""
    if not links:
        return "<h2>Weights</h2><p>No trained weights in this run folder.</p>"
    items = "".join(f'<li><a href="{_e(path)}">{_e(name)}</a> (<code>{_e(path)}</code>)</li>' for name, path in links.items())
    return f"<h2>Weights</h2><ul id=\"weights\">{items}</ul>"


def report_page(results: dict, labels: dict[str, str], *, folder: Path, settings: str, weights: dict[str, str],
                scalar_labels: dict[str, str] | None = None) -> str:
    """The whole page as a string.

    Args:
        results: results.json's content (rows, seconds, figures, data, command, date, git_commit, ...).
        labels: results.json row key -> its label in the table (the stages' declarations).
        folder: the report folder, which holds the figures named in `results["figures"]`.
        settings: the composed config as YAML text, shown collapsed.
        weights: name -> path of a weights file or folder, relative to `folder`.
        scalar_labels: results.json key -> label of the scalar results the stages declare (shown when present).
    Raises:
        FileNotFoundError: a figure named in `results["figures"]` is missing from `folder`.
    """
    title = f"{results['experiment']}: concept {', '.join(results['concept'])}"
    run = _table([], [["command", f"<code>{_e(results['command'])}</code>"], ["date", _e(results["date"])],
                            ["commit", _e(results.get("git_commit") or "unknown")]], numeric_from=2, css_id="run")
    body = "".join([
        f"<h1>{_e(title)}</h1>", run,
        results_section(results, labels, scalar_labels),
        figures_section(folder, results.get("figures", [])),
        data_section(results.get("data")),
        timings_section(results["seconds"]),
        weights_section(weights),
        f"<h2>Settings</h2><details><summary>The composed config</summary><pre>{_e(settings)}</pre></details>",
    ])
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
            f"<style>{STYLE}</style></head><body>{body}</body></html>\n")
