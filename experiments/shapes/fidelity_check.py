"""Check the prompt-fidelity judge against blind hand labels of the committed world model's samples.

The judge (conceptdistill.world.fidelity) is a classifier trained on renders; the samples it labels are
not renders. This script measures how far to trust it:

    python experiments/shapes/fidelity_check.py sheets --guidance 2.0 --out runs/fidelity_check
        draws the same 240 samples the world stage scores (200 object prompts, 40 background prompts,
        seed 0), shuffles them and writes numbered sheets with no prompt on them, for labelling by eye;
        sheet position -> sample index is in key.json.
    python experiments/shapes/fidelity_check.py score [--judge-seeds 0 1 2] [--judge-only 1.5 4]
        draws the samples again for every guidance scale in fidelity_hand_labels.json, trains the judge
        exactly as the world stage does (once per seed), and writes fidelity_check.md / .json next to this
        file: fidelity by hand and by each judge, and how often they agree.

Hand labels are "<shape> <colour>", "none" (no object) or "unclear <colour>" (an object no shape name fits:
a blob, two fragments); "unclear" counts as unfaithful, so the hand figure is a strict one.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from conceptdistill.world.fidelity import NONE  # noqa: E402

HERE = Path(__file__).resolve().parent
LABELS = HERE / "fidelity_hand_labels.json"
SHEET_ROWS, SHEET_COLUMNS = 5, 8


def world_setup():
    """The app's composed config and the shapes world's data module."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    import conceptdistill

    with initialize_config_dir(str(Path(conceptdistill.__file__).parent / "conf"), version_base="1.3"):
        cfg = compose(config_name="config")
    return cfg, instantiate(cfg.data)


def packaged_model():
    from conceptdistill.diffusion.loading import load_diffusion_parts
    from conceptdistill.diffusion.registry import PACKAGED_WORLD_MODEL

    parts = load_diffusion_parts(str(PACKAGED_WORLD_MODEL))
    parts.denoiser.eval(), parts.text_encoder.eval()
    return parts


def draw_samples(cfg, datamodule, parts, classifier, guidance_scale: float) -> dict:
    """The world stage's fidelity samples (samples, prompts, asked and judged labels)."""
    from conceptdistill.world.fidelity import draw_fidelity_samples

    fid = cfg.world.fidelity
    return draw_fidelity_samples(
        parts, classifier, shapes=list(datamodule.world.shapes), colours=list(datamodule.world.colours),
        num_samples=fid.num_samples, num_background_samples=fid.num_background_samples, steps=fid.steps,
        guidance_scale=guidance_scale, seed=cfg.seed, image_size=datamodule.image_size, batch_size=cfg.diffusion.batch_size,
    )


def write_sheets(args) -> None:
    from conceptdistill.figures import save_grid
    from conceptdistill.world.fidelity import ShapeColourClassifier

    cfg, datamodule = world_setup()
    untrained = ShapeColourClassifier(list(datamodule.world.shapes), list(datamodule.world.colours))
    drawn = draw_samples(cfg, datamodule, packaged_model(), untrained, args.guidance)
    samples = drawn["samples"].numpy()
    order = np.random.default_rng(args.shuffle_seed).permutation(len(samples))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    per_sheet = SHEET_ROWS * SHEET_COLUMNS
    for sheet, first in enumerate(range(0, len(order), per_sheet)):
        columns = {}
        for column_start in range(first, min(first + per_sheet, len(order)), SHEET_ROWS):
            positions = range(column_start, min(column_start + SHEET_ROWS, len(order)))
            columns[str(column_start)] = [samples[order[p]] for p in positions]
        save_grid(out / f"sheet{sheet}.png", columns, cell=80)
    key = {"guidance_scale": args.guidance, "sample_index_at_position": order.tolist(), "prompts": drawn["prompts"]}
    (out / "key.json").write_text(json.dumps(key, indent=1))
    print(f"{len(order)} samples on {sheet + 1} sheets in {out}; the label at sheet position p is sample key[p]")


def hand_label(text: str) -> tuple[str, str]:
    """A hand label as the judge's (shape, colour): 'circle red' -> ('circle', 'red'), 'none' -> no object,
    'unclear red' -> ('unclear', 'red'), a shape the judge never answers."""
    return (NONE, NONE) if text == "none" else tuple(text.split())


def judge_label(label: tuple[str, str]) -> str:
    """A (shape, colour) label written the way hand labels are, for the record."""
    shape, colour = label
    return "none" if not shape and not colour else f"{shape or 'none'} {colour or 'none'}"


def agreement_row(asked: list[tuple[str, str]], hand: list[tuple[str, str]], judge: list[tuple[str, str]]) -> dict:
    """Fidelity by hand (strict) and by judge, and their agreement, for one set of samples."""
    from conceptdistill.world.fidelity import fidelity_scores

    objects = [i for i, want in enumerate(asked) if want[0] != NONE]
    clear = [i for i, label in enumerate(hand) if label[0] != "unclear"]
    by_hand, by_judge = fidelity_scores(asked, hand), fidelity_scores(asked, judge)
    return {
        "hand_prompt_fidelity": by_hand["prompt_fidelity"],
        "judge_prompt_fidelity": by_judge["prompt_fidelity"],
        "hand_background_fidelity": by_hand["background_fidelity"],
        "judge_background_fidelity": by_judge["background_fidelity"],
        "unclear_samples": len(hand) - len(clear),
        "label_agreement_on_clear": sum(hand[i] == judge[i] for i in clear) / len(clear),
        "verdict_agreement": sum((hand[i] == asked[i]) == (judge[i] == asked[i]) for i in objects) / len(objects),
    }


def score(args) -> None:
    from pytorch_lightning import Trainer

    from conceptdistill.world.fidelity import fidelity_scores, train_classifier

    cfg, datamodule = world_setup()
    parts = packaged_model()
    hand_sets = {guidance: [hand_label(text) for text in labels]
                 for guidance, labels in json.loads(LABELS.read_text())["sets"].items()}
    fid = cfg.world.fidelity

    def trainer(**kwargs):
        return Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False, **kwargs)

    # Several judges (training seeds) label the same samples: their spread is the judge's own uncertainty.
    judges = {
        seed: train_classifier(datamodule, trainer, num_images=fid.classifier_images, epochs=fid.classifier_epochs,
                               seed=seed)
        for seed in args.judge_seeds
    }
    first = next(iter(judges.values()))[0]
    rows, judge_only = [], []
    for guidance in [*hand_sets, *map(str, args.judge_only)]:
        drawn = draw_samples(cfg, datamodule, parts, first, float(guidance))
        for seed, (classifier, accuracy) in judges.items():
            judged = classifier.labels(drawn["samples"])
            row = {"guidance": guidance, "judge_seed": seed, "judge_held_out_accuracy": accuracy}
            if guidance in hand_sets:
                rows.append({**row, **agreement_row(drawn["asked"], hand_sets[guidance], judged),
                             "judge_labels": [judge_label(label) for label in judged]})
            else:
                scores = fidelity_scores(drawn["asked"], judged)
                judge_only.append({**row, **{key: scores[key] for key in ("prompt_fidelity", "background_fidelity")}})
    command = "python experiments/shapes/fidelity_check.py " + " ".join(sys.argv[1:])
    record = {"command": command, "date": datetime.date.today().isoformat(), "steps": fid.steps, "seed": cfg.seed,
              "rows": rows, "judge_only": judge_only}
    (HERE / "fidelity_check.json").write_text(json.dumps(record, indent=1))
    accuracies = ", ".join(f"{accuracy:.3f}" for _, accuracy in judges.values())
    lines = [
        "# Prompt fidelity of the committed world model: judge vs blind hand labels",
        "",
        f"Made by `{command}` on {record['date']} ({fid.steps} DDIM steps, sample seed {cfg.seed}; 200 object",
        "prompts and 40 background prompts per guidance scale; hand labels in fidelity_hand_labels.json, given",
        "on shuffled sheets without prompts). Hand fidelity is strict: an object no shape name fits counts as",
        f"unfaithful. One judge per training seed, as the world stage trains it (seed {cfg.seed} is the one whose",
        f"figure is recorded); held-out accuracy on renders: {accuracies}.",
        "",
        "| guidance | judge seed | fidelity, hand | fidelity, judge | background, hand | background, judge "
        "| unclear | label agreement (clear samples) | faithful/unfaithful verdict agreement |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['guidance']} | {row['judge_seed']} | {row['hand_prompt_fidelity']:.3f} "
            f"| {row['judge_prompt_fidelity']:.3f} | {row['hand_background_fidelity']:.3f} "
            f"| {row['judge_background_fidelity']:.3f} | {row['unclear_samples']} "
            f"| {row['label_agreement_on_clear']:.3f} | {row['verdict_agreement']:.3f} |"
        )
    if judge_only:
        lines += ["", "Judge only (no hand labels):", "",
                  "| guidance | judge seed | fidelity, judge | background, judge |", "|---|---|---|---|"]
        lines += [f"| {row['guidance']} | {row['judge_seed']} | {row['prompt_fidelity']:.3f} "
                  f"| {row['background_fidelity']:.3f} |" for row in judge_only]
    (HERE / "fidelity_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    sheets = commands.add_parser("sheets", help="numbered, shuffled sample sheets for labelling by eye")
    sheets.add_argument("--guidance", type=float, default=2.0)
    sheets.add_argument("--shuffle-seed", type=int, default=7)
    sheets.add_argument("--out", default="runs/fidelity_check")
    scoring = commands.add_parser("score", help="judge vs hand labels, written to fidelity_check.md/.json")
    scoring.add_argument("--judge-only", type=float, nargs="*", default=[], metavar="GUIDANCE",
                         help="more guidance scales to score with the judges alone")
    scoring.add_argument("--judge-seeds", type=int, nargs="+", default=[0], metavar="SEED",
                         help="train one judge per seed and report each (default: 0, the world stage's)")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
    write_sheets(args) if args.command == "sheets" else score(args)


if __name__ == "__main__":
    main()
