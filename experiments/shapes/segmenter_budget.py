"""Is the supervised U-Net an upper bound? The segment stage's U-Net rows against the segmenter's budget.

On a finished shapes run (masks, finetune, inpaint, synthesize done), reruns only the segment stage in a copy of
the run folder for each budget (training steps, encoder depth, input size) and records each mask source's test
IoU beside the refined masks M the label-free U-Nets learn from. Every budget trains each source from the same
seed on the same masks, through the command a user runs (`python -m conceptdistill ... stages=[segment]`), so
the rows differ by the budget alone.

    python experiments/shapes/segmenter_budget.py --run runs/reproduce/shapes     # segmenter_budget.{json,md,png}
    python experiments/shapes/segmenter_budget.py --run runs/reproduce/shapes --budgets 400:3:32 2000:3:32

A budget is written STEPS:DEPTH:SIZE (decoder widths follow the depth: 16, 32, 64, ... from the last). The run's
own overrides (its .hydra record) are replayed; extra arguments after `--` are Hydra overrides of every rerun on
top of them (e.g. `segment.batch_size=64`); the budget's settings come last.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from rerun import (  # noqa: E402
    concept_of,
    prepare_output,
    record_header,
    require_finished,
    rerun,
    stage_seconds,
    summary_of,
    sweep_parser,
)

#: the default grid: the experiment's budget (400 steps, depth 3, 32 px) and longer, deeper, larger
BUDGETS = ["400:3:32", "1200:3:32", "3000:3:32", "1200:4:32", "1200:3:64"]
SOURCES = ["truth", "refined"]
ROW = {"preliminary": "unet_preliminary", "refined": "unet_refined", "refined+synthetic": "unet_refined_synthetic",
       "truth": "unet_truth"}
UPSTREAM = ("masks", "finetune", "inpaint", "synthesize")


def parse_budget(text: str) -> dict:
    """STEPS:DEPTH:SIZE -> the budget; argparse reports a ValueError / ArgumentTypeError as a usage error."""
    try:
        steps, depth, size = (int(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not STEPS:DEPTH:SIZE (three integers, e.g. 1200:3:32)") from None
    if steps < 1 or not 1 <= depth <= 5 or size < 1 or size % 2**depth:
        raise argparse.ArgumentTypeError(f"{text!r}: steps >= 1, encoder depth 1..5 and a size divisible by "
                                         f"2**depth ({2**depth}) are needed")
    return {"steps": steps, "depth": depth, "size": size,
            "decoder": [16 * 2 ** i for i in reversed(range(depth))]}


def segment_once(run: Path, work: Path, budget: dict, sources: list[str], extra: list[str], reuse: bool) -> dict:
    """Copy the finished upstream stages of `run` into `work`, train and score the segmenters of `sources`."""
    # the budget after the extra overrides: the later value of a setting wins
    _, command = rerun(run, work, UPSTREAM, [
        *extra, "stages=[segment]", f"segment.sources=[{','.join(sources)}]", f"segment.max_steps={budget['steps']}",
        f"segment.module.encoder_depth={budget['depth']}",
        f"segment.module.decoder_channels=[{','.join(map(str, budget['decoder']))}]",
        f"segment.image_size={budget['size']}", f"segment.checkpoint_every={budget['steps']}"], reuse=reuse)
    seconds = stage_seconds(work, ("segment",))
    rows = summary_of(work, "segment")["rows"]
    return {"seconds": round(seconds, 1), "iou": {s: rows[ROW[s]]["iou"] for s in sources},
            "iou_per_image": {s: rows[ROW[s]]["iou_per_image"] for s in sources}, "command": command}


def write_table(record: dict, out: Path) -> None:
    sources = record["sources"]
    lines = [f"# The segmenter's budget on the shapes world ({record['concept']})", "",
             f"Made on {record['date']} by `{record['command']}`", f"on {record['machine']}.", "",
             f"Refined masks M (what the label-free U-Net learns from), test IoU: {100 * record['refined_masks']:.1f}; "
             f"preliminary M_pre: {100 * record['preliminary_masks']:.1f}.", "",
             "| steps | encoder depth | size | " + " | ".join(f"U-Net {s} IoU" for s in sources) + " | seconds |",
             "|---|---|---|" + "---|" * len(sources) + "---|"]
    for row in record["budgets"]:
        b = row["budget"]
        ious = " | ".join(f"{100 * row['iou'][s]:.1f}" for s in sources)
        lines.append(f"| {b['steps']} | {b['depth']} | {b['size']} | {ious} | {row['seconds']:.0f} |")
    lines += ["", "IoU pooled over the test split, in %. Seconds: the segment stage (training and scoring every "
              "listed source, from its DONE.json) on this machine, which was not otherwise idle-checked: compare "
              "within one table only."]
    if record.get("note"):
        lines += ["", record["note"]]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def write_figure(record: dict, out: Path) -> None:
    """IoU against training steps, one line per source and (depth, size); the refined masks as a level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    shapes = sorted({(r["budget"]["depth"], r["budget"]["size"]) for r in record["budgets"]})
    for n, source in enumerate(record["sources"]):
        for m, (depth, size) in enumerate(shapes):
            rows = sorted((r for r in record["budgets"] if (r["budget"]["depth"], r["budget"]["size"]) == (depth, size)),
                          key=lambda r: r["budget"]["steps"])
            ax.plot([r["budget"]["steps"] for r in rows], [100 * r["iou"][source] for r in rows],
                    "os^v"[m % 4] + "-", color=f"C{n}", label=f"U-Net on {source} (depth {depth}, {size} px)")
    ax.axhline(100 * record["refined_masks"], color="k", ls="--", lw=1, label="refined masks M")
    ax.set_xscale("log")
    ax.set_xlabel("segmenter training steps")
    ax.set_ylabel("test IoU (%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    plt.close(fig)


def main() -> None:
    parser = sweep_parser(__doc__, "segmenter_budget", run_help="a shapes run finished through synthesize")
    parser.add_argument("--budgets", nargs="+", type=parse_budget, default=[parse_budget(b) for b in BUDGETS],
                        help="STEPS:DEPTH:SIZE each")
    parser.add_argument("--sources", nargs="+", default=SOURCES)
    args = parser.parse_args()
    require_finished(args.run, UPSTREAM)
    prepare_output(args.out)
    masks = summary_of(args.run, "masks")["rows"]
    refined = summary_of(args.run, "inpaint")["rows"]["refined_masks"]["iou"]
    record = {**record_header("segmenter_budget.py"), "concept": concept_of(args.run), "sources": args.sources,
              "refined_masks": refined, "preliminary_masks": masks["preliminary_masks"]["iou"], "budgets": []}
    for budget in args.budgets:
        name = f"{budget['steps']}-{budget['depth']}-{budget['size']}"
        result = segment_once(args.run, args.work / name, budget, args.sources, args.extra, args.reuse)
        record["budgets"].append({"budget": budget, **result})
        print(name, {s: round(100 * v, 1) for s, v in result["iou"].items()}, f"{result['seconds']:.0f} s", flush=True)
        # after every budget, so that partial results survive
        args.out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
        write_table(record, args.out)
        write_figure(record, args.out)


if __name__ == "__main__":
    main()
