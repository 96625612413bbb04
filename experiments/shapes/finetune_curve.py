"""What does fine-tuning buy? Object-removal rate and refined-mask IoU against the fine-tuning recipe.

On a finished shapes run (its masks stage is reused: the same M_pre for every row), reruns the finetune and
inpaint stages in a copy of the run folder for each variant and records, on the test split, the fraction of
backgrounds B that hold no object (`object_removal_rate`, the world's judge) and the refined masks' IoU:
- the run's own adapter (LoRA in the shapes experiment) after several step counts: the curve; 0 steps is the
  base model, not fine-tuned (the adapter exports the model unchanged);
- full fine-tuning (`finetune=full`, the paper's learning rate 1e-4) for the run's step count (`--full-steps`);
- the simple-inpainting baseline M_crop (`inpaint=crop`: the image's own background mirrored into M_pre).
The run's own recipe is the run's recorded result, or is recomputed when extra overrides are given.

    python experiments/shapes/finetune_curve.py --run runs/reproduce/shapes      # finetune_curve.{json,md,png}
    python experiments/shapes/finetune_curve.py --run runs/reproduce/shapes --lora-steps 0 100 1000

The run's own overrides (its .hydra record) are replayed in every rerun; extra arguments after `--` are Hydra
overrides of every rerun on top of them; each variant's settings come last.
"""

from __future__ import annotations

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
        steps = "-" if row["steps"] is None else row["steps"]
        lines.append(f"| {row['variant']} | {steps} | {row['object_removal_rate']:.3f} "
                     f"({row['removed']}/{row['judged']}) | {100 * row['refined_iou']:.1f} | {seconds} |")
    lines += ["", "Seconds: the finetune + inpaint command on this machine (compare within this table only)."]
    if record.get("note"):
        lines += ["", record["note"]]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = sorted((r for r in record["rows"] if r["family"] == record["adapter"]), key=lambda r: r["steps"])
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, key, label in ((axes[0], "object_removal_rate", "object removal rate"),
                           (axes[1], "refined_iou", "refined masks M IoU")):
        ax.plot([max(r["steps"], 1) for r in curve], [r[key] for r in curve], "o-",
                label=f"{record['adapter']} (0 steps: the base model)")
        for r in record["rows"]:
            if r["family"] != record["adapter"]:
                ax.axhline(r[key], ls="--", lw=1, color="C1" if r["family"] == "full" else "C2", label=r["variant"])
        ax.set_xscale("log")
        ax.set_xlabel("fine-tuning steps (0 drawn at 1)")
        ax.set_ylabel(label)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    plt.close(fig)


def main() -> None:
    parser = sweep_parser(__doc__, "finetune_curve", run_help="a finished shapes run (masks, finetune, inpaint)")
    parser.add_argument("--lora-steps", nargs="+", type=int, default=[0, 100, 1000])
    parser.add_argument("--full-steps", type=int, default=None, help="default: the run's finetune.max_steps")
    args = parser.parse_args()
    require_finished(args.run, ("masks", "finetune", "inpaint"))
    from hydra.utils import get_class
    from omegaconf import OmegaConf

    if not get_class(OmegaConf.load(args.run / ".hydra" / "config.yaml").inpaint.module._target_).repaints_with_model:
        sys.exit(f"{args.run} was made with an inpainter that uses no model (inpaint=crop): give a run made with the "
                 "model's inpainting, whose fine-tuning this script varies")
    prepare_output(args.out)
    own = summary_of(args.run, "finetune")
    adapter, steps = own["adapter"], int(own["steps"])
    record = {**record_header("finetune_curve.py"), "concept": concept_of(args.run),
              "adapter": adapter,
              "preliminary_iou": summary_of(args.run, "masks")["rows"]["preliminary_masks"]["iou"], "rows": []}
    # the run's own recipe: its recorded result, unless extra overrides change what every rerun computes
    if not args.extra:
        record["rows"].append({"variant": f"{adapter}, {steps} steps (the run's own recipe)", "family": adapter,
                               "steps": steps, "seconds": None, **scores(summary_of(args.run, "inpaint"))})
    curve = sorted({*args.lora_steps, *([steps] if args.extra else [])} - (set() if args.extra else {steps}))
    variants = [(f"{adapter}, {n} steps" if n else "base model, no fine-tuning", adapter, n, [f"finetune.max_steps={n}"])
                for n in curve]
    full = steps if args.full_steps is None else args.full_steps
    if adapter != "full":
        variants.append(("full fine-tuning, lr 1e-4", "full", full,
                         ["finetune=full", "finetune.module.learning_rate=1e-4", f"finetune.max_steps={full}"]))
    variants.append(("M_crop (mirrored background, no inpainting model)", "crop", None, ["inpaint=crop"]))
    for variant, family, n, overrides in variants:
        # M_crop needs no fine-tuned model (stage inpaint reads only M_pre then); the others retrain it
        stages = "[inpaint]" if family == "crop" else "[finetune,inpaint]"
        folder = args.work / (family if n is None else f"{family}-{n}")
        # the variant's settings after the extra overrides: the later value of a setting wins
        _, command = rerun(args.run, folder, ("masks",), [*args.extra, f"stages={stages}", *overrides],
                           reuse=args.reuse)
        seconds = stage_seconds(folder, ("inpaint",) if family == "crop" else ("finetune", "inpaint"))
        row = {"variant": variant, "family": family, "steps": n, "seconds": round(seconds, 1), "command": command,
               **scores(summary_of(folder, "inpaint"))}
        record["rows"].append(row)
        print(variant, {k: row[k] for k in ("object_removal_rate", "refined_iou")}, f"{seconds:.0f} s", flush=True)
        write_outputs(record, args.out)


if __name__ == "__main__":
    main()
