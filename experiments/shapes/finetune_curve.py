"""What does fine-tuning buy? Object-removal rate and refined-mask IoU against the fine-tuning recipe.

On a finished shapes run (its masks stage is reused: the same M_pre for every row), reruns the finetune and
inpaint stages in a copy of the run folder for each variant and records, on the test split, the fraction of
backgrounds B that hold no object (`object_removal_rate`, the world's judge) and the refined masks' IoU:
- the base model, not fine-tuned (a LoRA trained for 0 steps exports the model unchanged);
- LoRA (the experiment's adapter and learning rate) after several step counts: the curve;
- full fine-tuning (`finetune=full`, the paper's learning rate 1e-4) for the experiment's step count;
- the simple-inpainting baseline M_crop (`inpaint=crop`: the image's own background mirrored into M_pre).
The run's own finetune and inpaint stages are the row of the experiment's own recipe (not recomputed).

    python experiments/shapes/finetune_curve.py --run runs/reproduce/shapes      # finetune_curve.{json,md,png}
    python experiments/shapes/finetune_curve.py --run runs/reproduce/shapes --lora-steps 0 100 1000

Extra arguments after `--` are Hydra overrides of every rerun.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from rerun import concept_of, rerun, summary_of  # noqa: E402


def scores(summary: dict) -> dict:
    removal = summary["scalars"]["object_removal_rate"]
    return {"object_removal_rate": removal["value"], "removed": removal["removed"], "judged": removal["judged"],
            "refined_iou": summary["rows"]["refined_masks"]["iou"]}


def write_outputs(record: dict, out: Path) -> None:
    lines = [f"# What fine-tuning buys on the shapes world ({record['concept']})", "",
             f"Made on {record['date']} by `{record['command']}`", f"on {record['machine']}.", "",
             f"The same M_pre for every row (IoU {100 * record['preliminary_iou']:.1f}); test split, "
             f"{record['rows'][0]['judged']} images.", "",
             "| variant | fine-tuning steps | object removal rate | refined masks M IoU | seconds |",
             "|---|---|---|---|---|"]
    for row in record["rows"]:
        seconds = f"{row['seconds']:.0f}" if row.get("seconds") is not None else "(the run's)"
        lines.append(f"| {row['variant']} | {row['steps']} | {row['object_removal_rate']:.3f} "
                     f"({row['removed']}/{row['judged']}) | {100 * row['refined_iou']:.1f} | {seconds} |")
    lines += ["", "Seconds: the finetune + inpaint command on this machine (compare within this table only)."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lora = sorted((r for r in record["rows"] if r["family"] == "lora"), key=lambda r: r["steps"])
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, key, label in ((axes[0], "object_removal_rate", "object removal rate"),
                           (axes[1], "refined_iou", "refined masks M IoU")):
        ax.plot([max(r["steps"], 1) for r in lora], [r[key] for r in lora], "o-", label="LoRA (0 steps: base model)")
        for r in record["rows"]:
            if r["family"] != "lora":
                ax.axhline(r[key], ls="--", lw=1, color="C1" if r["family"] == "full" else "C2", label=r["variant"])
        ax.set_xscale("log")
        ax.set_xlabel("fine-tuning steps (0 drawn at 1)")
        ax.set_ylabel(label)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="a finished shapes run (masks, finetune, inpaint)")
    parser.add_argument("--lora-steps", nargs="+", type=int, default=[0, 100, 1000])
    parser.add_argument("--full-steps", type=int, default=None, help="default: the run's finetune.max_steps")
    parser.add_argument("--work", type=Path, default=HERE.parent.parent / "runs" / "finetune-curve")
    parser.add_argument("--out", type=Path, default=HERE / "finetune_curve")
    parser.add_argument("extra", nargs="*", help="Hydra overrides of every rerun (after --)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    own = summary_of(args.run, "finetune")
    steps = int(own["steps"])
    record = {"date": datetime.date.today().isoformat(),
              "command": shlex.join(["python", "experiments/shapes/finetune_curve.py", *sys.argv[1:]]),
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
              "concept": concept_of(args.run),
              "preliminary_iou": summary_of(args.run, "masks")["rows"]["preliminary_masks"]["iou"],
              "rows": [{"variant": f"LoRA ({own['adapter']}), the experiment's recipe", "family": "lora",
                        "steps": steps, "seconds": None, **scores(summary_of(args.run, "inpaint"))}]}
    variants = [(f"LoRA, {n} steps" if n else "base model, no fine-tuning", "lora", n, [f"finetune.max_steps={n}"])
                for n in args.lora_steps if n != steps]
    full = args.full_steps or steps
    variants += [("full fine-tuning, lr 1e-4", "full", full,
                  ["finetune=full", "finetune.module.learning_rate=1e-4", f"finetune.max_steps={full}"]),
                 ("M_crop (mirrored background, no inpainting model)", "crop", steps, ["inpaint=crop"])]
    for variant, family, n, overrides in variants:
        # M_crop needs no fine-tuned model: it keeps the run's finetune stage; the others retrain it
        keep = ("masks", "finetune") if family == "crop" else ("masks",)
        stages = "[inpaint]" if family == "crop" else "[finetune,inpaint]"
        folder = args.work / f"{family}-{n}"
        # the variant's settings after the extra overrides: the later value of a setting wins
        seconds, command = rerun(args.run, folder, keep, [*args.extra, f"stages={stages}", *overrides])
        row = {"variant": variant, "family": family, "steps": n, "seconds": round(seconds, 1), "command": command,
               **scores(summary_of(folder, "inpaint"))}
        record["rows"].append(row)
        print(variant, {k: row[k] for k in ("object_removal_rate", "refined_iou")}, f"{seconds:.0f} s", flush=True)
        write_outputs(record, args.out)


if __name__ == "__main__":
    main()
