"""Every concept of the shapes world: the whole method, the same settings, one run per concept word.

For each concept (by default each shape word of the committed world model and one colour word), runs
`python -m conceptdistill experiment=EXPERIMENT concept=[WORD] 'prompts.foreground=a photo of a WORD'` into
runs/concepts/WORD (a finished run is reused: stages are skipped when complete for the current settings) and
collects from each run's results.json the ladder (M_pre, M, the U-Net rows), the object-removal rate and the
attention AUC, with the best label-free U-Net's IoU as a fraction of the supervised U-Net's (the issue's bar:
at least 0.85, goal 0.92). No setting changes between concepts: the experiment's defaults for all
(`--experiment`: shapes, the recorded budget, about 50 CPU minutes a concept; shapes_demo, the demo's, about 10).

    python experiments/shapes/concepts.py                        # concepts.{json,md}
    python experiments/shapes/concepts.py --concepts square red --experiment shapes_demo

Extra arguments after `--` are Hydra overrides of every run (they are recorded with the table).
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE))
from rerun import record_header, sweep_parser  # noqa: E402

CONCEPTS = ["circle", "square", "triangle", "red"]
LADDER = [("preliminary_masks", "M_pre"), ("refined_masks", "M"), ("unet_preliminary", "U-Net (D, M_pre)"),
          ("unet_refined", "U-Net (D, M)"), ("unet_refined_synthetic", "U-Net (D, M) u D'_s"),
          ("unet_truth", "supervised U-Net")]
LABEL_FREE = ("unet_preliminary", "unet_refined", "unet_refined_synthetic")


def run_concept(word: str, work: Path, extra: list[str], experiment: str = "shapes") -> tuple[dict, float, str]:
    # each stage's metrics as CSV, as make reproduce writes them, unless the extra overrides name a logger
    logger = [] if any(a.startswith("logger=") for a in extra) else ["logger=csv"]
    args = [f"experiment={experiment}", f"concept=[{word}]", f"prompts.foreground=a photo of a {word}",
            f"hydra.run.dir={work / word}", "quiet=true", *logger, *extra]
    started = time.perf_counter()
    # the command as typed in the checkout (a record names no machine's path)
    command = shlex.join(["python", "-m", "conceptdistill", *args]).replace(f"{REPO}/", "")
    finished = subprocess.run([sys.executable, "-m", "conceptdistill", *args], cwd=REPO)
    if finished.returncode:
        sys.exit(f"the run of concept {word!r} failed (exit code {finished.returncode}; its message is above); "
                 f"the table holds the concepts before it:\n  {command}")
    results = json.loads((work / word / "report" / "results.json").read_text())
    return results, time.perf_counter() - started, command


def row_of(word: str, results: dict) -> dict:
    rows = results["rows"]
    iou = {key: rows[key]["iou"] for key, _ in LADDER if key in rows}
    best = max(LABEL_FREE, key=lambda k: iou.get(k, -1.0))
    removal = results.get("object_removal_rate") or {}
    return {"concept": word, "iou": iou, "best_label_free": best,
            "fraction_of_supervised": iou[best] / iou["unet_truth"] if "unet_truth" in iou else None,
            "object_removal_rate": removal.get("value"),
            # the world model's fidelity over all its prompts (not this concept's alone: not measured per concept)
            "world_model_prompt_fidelity": results.get("prompt_fidelity"),
            "attention_auc": results.get("attention_auc"), "git_commit": results.get("git_commit"),
            "date": results.get("date"), "seconds": results.get("seconds")}


def word_fidelity(run: Path) -> dict:
    """Each word's prompt fidelity from the world stage's record in `run` (world/fidelity.py fidelity_scores),
    with the command that measured it and the number of object prompts; exits with a message when missing."""
    done = run / "world" / "DONE.json"
    if not done.is_file():
        sys.exit(f"--fidelity {run}: no finished world stage there (run python -m conceptdistill stages=[world] "
                 f"world.init_from=packaged world.max_steps=0 hydra.run.dir={run})")
    record = json.loads(done.read_text())
    summary = record["summary"]
    if "word_fidelity" not in summary:
        sys.exit(f"--fidelity {run}: its world stage recorded no word_fidelity (made by an older version): rerun it")
    return {"words": summary["word_fidelity"], "command": record["command"],
            "samples": summary["fidelity_settings"]["samples"]}


def write_table(record: dict, out: Path) -> None:
    head = " | ".join(label for _, label in LADDER)
    fidelity = record.get("word_fidelity")
    lines = ["# The method on every concept of the shapes world", "",
             f"Made on {record['date']} by `{record['command']}`", f"on {record['machine']}; each concept's run:",
             "", *[f"    {row['command']}" for row in record["rows"]], "",
             "Test IoU in %, pooled over the test split; the same settings for every concept."]
    if fidelity:
        lines += ["", f"Prompt fidelity of the word: of the world model's samples whose prompt asked for it (\"a photo "
                  f"of a <colour> <shape>\", {fidelity['samples']} object prompts cycling through every pair), the "
                  "fraction the world's classifier sees it in (the shape for a shape word, the colour for a colour "
                  f"word); measured by `{fidelity['command']}`."]
    lines += ["", f"| concept | {head} | best label-free / supervised | object removal | attention AUC |"
              + (" prompt fidelity of the word |" if fidelity else ""),
              "|---|" + "---|" * (len(LADDER) + 3 + bool(fidelity))]
    for row in record["rows"]:
        cells = " | ".join(f"{100 * row['iou'][k]:.1f}" if k in row["iou"] else "-" for k, _ in LADDER)
        fraction = f"{row['fraction_of_supervised']:.2f}" if row["fraction_of_supervised"] is not None else "-"

        def num(value):
            return f"{value:.3f}" if value is not None else "-"

        word = f" {num(fidelity['words'].get(row['concept']))} |" if fidelity else ""
        lines.append(f"| {row['concept']} | {cells} | {fraction} | {num(row['object_removal_rate'])} | "
                     f"{num(row['attention_auc'])} |{word}")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")


def main() -> None:
    parser = sweep_parser(__doc__, "concepts", run_help=None)
    parser.add_argument("--concepts", nargs="+", default=CONCEPTS)
    parser.add_argument("--experiment", default="shapes", choices=["shapes", "shapes_demo"],
                        help="the shapes world's budget: as recorded (shapes) or the demo's (shapes_demo)")
    parser.add_argument("--fidelity", type=Path, default=None,
                        help="a run folder whose world stage measured the model (python -m conceptdistill "
                             "stages=[world] world.init_from=packaged world.max_steps=0 ...): adds each word's "
                             "prompt fidelity")
    args = parser.parse_args()
    fidelity = word_fidelity(args.fidelity) if args.fidelity else None
    # the world's own words, checked up front (unless another data set is chosen: data=...)
    if not any(a.lstrip("+~").startswith("data=") for a in args.extra):
        sys.path.insert(0, str(REPO))
        from conceptdistill.world.render import WorldConfig

        unknown = [w for w in args.concepts if w not in WorldConfig().words]
        if unknown:
            parser.error(f"{unknown} are not shapes or colours of the shapes world: {', '.join(WorldConfig().words)}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {**record_header("concepts.py"), "rows": [], **({"word_fidelity": fidelity} if fidelity else {})}
    for word in args.concepts:
        results, seconds, command = run_concept(word, args.work, args.extra, args.experiment)
        row = {**row_of(word, results), "command": command, "wall_seconds": round(seconds, 1)}
        record["rows"].append(row)
        print(word, {k: round(100 * v, 1) for k, v in row["iou"].items()}, f"{seconds:.0f} s", flush=True)
        write_table(record, args.out)


if __name__ == "__main__":
    main()
