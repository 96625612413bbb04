"""Fewer UNet passes for the same masks? Attention AUC and M_pre IoU against the masks stage's passes per image.

On the shapes world (the committed model, the shapes experiment's test split with exact masks, the experiment's
masker settings), the map A and M_pre are computed for several timestep schedules, each scored as the masks
stage scores them (`evaluation.sampled_pixels` + `metrics.attention_auc` for A against the truth, M_pre from
the masker's `binarize`, pooled IoU by `evaluation.mask_scores`):
- the paper's grid: the last T0 = 40 steps of the T = 50 DDIM grid (the default; the reference row);
- shorter suffixes of the T = 50 grid: T0 = 20, 10, 5, 1 (only the least noisy steps);
- strided grids over about the same span (t <= 781): T = 25 / T0 = 20 (every 2nd step), T = 12 / T0 = 10 (about
  every 4th), T = 6 / T0 = 5 (about every 8th), T = 4, 3, 2 (all of their grid);
- several noise draws per step at fewer steps (the maps of the draws averaged).
Every one-draw schedule, the reference included, is run twice, with two independent noise draws, because noise
alone moves M_pre's IoU by about a point. The knee is the fewest passes whose AUC and IoU are within 0.5 points of
the reference's with both draws, among the schedules a configuration can ask for (`masks.module.num_steps`,
`masks.module.start_step`; one draw per step). The spread: a paired bootstrap over images (95% interval of each
difference from the reference) and the second draw.

    python experiments/benchmarks/bench_passes.py       # as `make bench` runs it: passes_curve.{json,md,png}
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path[:0] = [str(REPO), str(HERE)]  # this checkout's conceptdistill; masks_grid beside this file

import numpy as np  # noqa: E402
import torch  # noqa: E402

#: (name, family, T, T0, noise draws per step); the first is the reference (the paper's grid). Every one-draw
#: schedule is also run with a second, independent noise draw (a replicate, compared with the reference's own).
SETTINGS: list[tuple[str, str, int, int, int]] = [
    ("T=50, last 40 (default)", "reference", 50, 40, 1),
    ("T=50, last 20", "suffix", 50, 20, 1),
    ("T=50, last 10", "suffix", 50, 10, 1),
    ("T=50, last 5", "suffix", 50, 5, 1),
    ("T=50, last 1", "suffix", 50, 1, 1),
    ("T=25, last 20 (every 2nd)", "strided", 25, 20, 1),
    ("T=12, last 10 (~every 4th)", "strided", 12, 10, 1),
    ("T=6, last 5 (~every 8th)", "strided", 6, 5, 1),
    ("T=4, last 4", "strided", 4, 4, 1),
    ("T=3, last 3", "strided", 3, 3, 1),
    ("T=2, last 2", "strided", 2, 2, 1),
    ("T=12, last 10, 2 draws", "draws", 12, 10, 2),
    ("T=6, last 5, 2 draws", "draws", 6, 5, 2),
    ("T=3, last 3, 2 draws", "draws", 3, 3, 2),
    ("T=50, last 5, 2 draws", "draws", 50, 5, 2),
]
TOLERANCE = 0.5  # points (percent) of AUC and IoU


def compose(overrides: list[str]):
    """The app's config, as `python -m conceptdistill <overrides>` composes it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from conceptdistill.__main__ import normalise_overrides

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=normalise_overrides(overrides))


def draw_ids(ids: list[str], draw: int) -> list[str]:
    """Sample ids whose noise generators give an independent draw (draw 0: the masks stage's own ids)."""
    return ids if draw == 0 else [f"{sid}#draw{draw}" for sid in ids]


def compute_maps(masker, images: torch.Tensor, ids: list[str], draws: int, offset: int, batch_size: int) -> np.ndarray:
    """A per image (N, h, w): the masker's maps, averaged over `draws` independent noise draws."""
    total = None
    for draw in range(offset, offset + draws):
        batches = []
        for start in range(0, len(ids), batch_size):
            maps, _ = masker.attention_maps(images[start:start + batch_size], draw_ids(ids[start:start + batch_size], draw))
            batches.append(maps.cpu().numpy())
        maps = np.concatenate(batches)
        total = maps if total is None else total + maps
    return total / draws


def auc_from_ranks(scores: np.ndarray, labels: np.ndarray) -> float:
    """Pixel AUC-ROC by the rank-sum formula (ties averaged, as sklearn's), for the bootstrap."""
    from scipy.stats import rankdata

    ranks = rankdata(scores)
    positives = int(labels.sum())
    negatives = labels.size - positives
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def per_image_terms(maps: np.ndarray, masks: list[np.ndarray], truths: list[np.ndarray]):
    """Per image: upsampled map values, truth labels (for pooled AUC) and tp/fp/fn of M_pre (for pooled IoU)."""
    from conceptdistill.maskmath import resize_nearest, upsample_mask

    values, labels, counts = [], [], []
    for attention, mask, truth in zip(maps, masks, truths, strict=True):
        values.append(resize_nearest(attention, truth.shape).ravel())
        labels.append(truth.ravel())
        up = upsample_mask(mask, truth.shape)
        counts.append((np.count_nonzero(up & truth), np.count_nonzero(up & ~truth), np.count_nonzero(~up & truth)))
    return values, labels, np.array(counts, dtype=np.int64)


def bootstrap(reference, other, samples: int, seed: int = 0) -> dict:
    """Paired bootstrap over images of (other - reference) in AUC and IoU points: 2.5/50/97.5 percentiles."""
    rng = np.random.default_rng(seed)
    n = len(reference[0])
    deltas = {"auc": [], "iou": []}
    for _ in range(samples):
        pick = rng.integers(0, n, n)
        labels = np.concatenate([reference[1][i] for i in pick])
        if labels.all() or not labels.any():
            continue
        for name, (values, _, counts) in (("ref", reference), ("other", other)):
            auc = auc_from_ranks(np.concatenate([values[i] for i in pick]), labels)
            tp, fp, fn = counts[pick].sum(axis=0)
            iou = tp / max(tp + fp + fn, 1)
            if name == "ref":
                ref_auc, ref_iou = auc, iou
        deltas["auc"].append(100 * (auc - ref_auc))
        deltas["iou"].append(100 * (iou - ref_iou))
    return {f"delta_{k}_interval": [float(np.percentile(v, q)) for q in (2.5, 50, 97.5)] for k, v in deltas.items()}


def knee(rows: list[dict]) -> dict | None:
    """The fewest passes among one-draw schedules whose AUC and IoU are both within TOLERANCE points of the
    reference's, with the first noise draw and with the second (each against the reference's own draw); ties
    broken by the smaller largest difference."""
    def worst(r):
        return max(abs(r[k]) for k in ("delta_auc", "delta_iou", "delta_auc_2", "delta_iou_2"))

    ok = [r for r in rows[1:] if r["draws"] == 1 and "delta_auc_2" in r and worst(r) <= TOLERANCE]
    return min(ok, key=lambda r: (r["passes"], worst(r))) if ok else None


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = record["rows"]
    markers = {"suffix": ("tab:blue", "o"), "strided": ("tab:green", "s"),
               "draws": ("tab:orange", "^")}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, metric, title in ((axes[0], "auc", "attention AUC"), (axes[1], "iou", "M_pre IoU")):
        ax.axhspan(-TOLERANCE, TOLERANCE, color="0.9", label=f"within {TOLERANCE} points")
        ax.axhline(0, color="0.5", lw=0.8)
        noise = rows[0][f"{metric}_2"] - rows[0][metric]  # the reference's second draw against its first
        ax.plot([40], [noise], "*", color="k", ms=10, label="T=50/T0=40, second noise draw")
        for family, (colour, marker) in markers.items():
            sel = [r for r in rows[1:] if r["family"] == family]
            if not sel:
                continue
            shift = {"suffix": 0.93, "strided": 1.0, "draws": 1.07}[family]  # side by side at equal passes
            x = [r["passes"] * shift for r in sel]
            y = [r[f"delta_{metric}"] for r in sel]
            lo = [r[f"delta_{metric}"] - r[f"delta_{metric}_interval"][0] for r in sel]
            hi = [r[f"delta_{metric}_interval"][2] - r[f"delta_{metric}"] for r in sel]
            label = {"suffix": "last T0 of T=50", "strided": "strided (same span)",
                     "draws": "several draws per step"}[family]
            ax.errorbar(x, y, yerr=[lo, hi], fmt=marker, color=colour, capsize=3, label=label)
            second = [(r["passes"] * shift, r[f"delta_{metric}_2"]) for r in sel if f"delta_{metric}_2" in r]
            if second:
                ax.plot(*zip(*second, strict=True), marker, mfc="none", color=colour, alpha=0.7)
        chosen = record.get("knee")
        if chosen:
            ax.plot([chosen["passes"]], [chosen[f"delta_{metric}"]], "o", ms=14, mfc="none", mec="red",
                    label=f"knee: {chosen['name']}")
        ax.set_xscale("log", base=2)
        ax.set_xticks([1, 2, 3, 5, 10, 20, 40])
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("UNet passes per image")
        ax.set_ylabel(f"{title}: difference from T=50/T0=40 (points)")
        ax.set_title(f"{title} (T0=40: {rows[0][metric]:.1f}%)")
        ax.grid(alpha=0.3)
    handles, labels = axes[1].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=6, frameon=False)
    fig.suptitle(f"Masks stage on the shapes world, {record['images']} test images. Filled: first noise draw, bars "
                 "95% paired bootstrap over images; hollow: second noise draw", fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(record: dict) -> str:
    ref = record["rows"][0]
    lines = [f"# Fewer UNet passes for the masks stage: the curve ({record['device']})", "",
             f"{record['date']}, `{record['command']}` ({record['wall_seconds']:.0f} s)", "",
             f"Shapes world, committed model, concept \"{record['concept']}\", {record['images']} test images, the "
             "shapes experiment's masker (hole filling on). AUC of A and pooled IoU / mIoU of M_pre against the exact "
             "masks, in %, scored as the masks stage scores them. delta = this row minus the reference (T=50, last "
             "40), with its 95% paired-bootstrap interval over images "
             f"({record['bootstrap_samples']} resamples). 2nd draw: the same schedule with another, independent noise "
             "draw at every step, against the reference's own second draw (its row: the reference's second draw "
             "against its first, i.e. what noise alone does). Passes: UNet passes per image.", "",
             "| schedule | passes | timesteps | AUC | IoU | mIoU | delta AUC [95%] | delta IoU [95%] | "
             "2nd draw: delta AUC, IoU | s/image |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in record["rows"]:
        ts = r["timesteps"]
        shown = ", ".join(str(t) for t in ts) if len(ts) <= 5 else f"{ts[0]}, {ts[1]}, ..., {ts[-1]}"
        if r is ref:
            deltas = "(reference) | (reference)"
            second = f"{r['auc_2'] - r['auc']:+.2f}, {r['iou_2'] - r['iou']:+.2f}"
        else:
            a, i = r["delta_auc_interval"], r["delta_iou_interval"]
            deltas = (f"{r['delta_auc']:+.2f} [{a[0]:+.2f}, {a[2]:+.2f}] | "
                      f"{r['delta_iou']:+.2f} [{i[0]:+.2f}, {i[2]:+.2f}]")
            second = f"{r['delta_auc_2']:+.2f}, {r['delta_iou_2']:+.2f}" if "delta_auc_2" in r else ""
        lines.append(f"| {r['name']} | {r['passes']} | {shown} | {r['auc']:.2f} | {r['iou']:.2f} | {r['miou']:.2f} | "
                     f"{deltas} | {second} | {r['seconds_per_image']:.3f} |")
    chosen = record.get("knee")
    lines += [""]
    if chosen:
        lines += [f"Knee (fewest passes, one draw per step, whose AUC and IoU are within {TOLERANCE} points of the "
                  f"reference's with both noise draws): **{chosen['name']}**, {chosen['passes']} passes instead of "
                  f"{ref['passes']} (AUC {chosen['delta_auc']:+.2f} / {chosen['delta_auc_2']:+.2f}, IoU "
                  f"{chosen['delta_iou']:+.2f} / {chosen['delta_iou_2']:+.2f} points): "
                  f"`masks.module.num_steps={chosen['num_steps']} masks.module.start_step={chosen['start_step']}`."]
    else:
        lines += [f"No one-draw schedule with fewer passes is within {TOLERANCE} points of the reference on both "
                  "scores with both noise draws."]
    lines += ["", f"Figure: [{record['figure']}]({record['figure']})."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=128, help="test images of the shapes world")
    parser.add_argument("--bootstrap", type=int, default=200, help="paired bootstrap resamples")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (0: every core); 1 by default, as on a shared 2-core machine two OpenMP "
                             "threads competing with other processes ran slower than one")
    parser.add_argument("--tiny", action="store_true", help="the tests' tiny random model and three schedules")
    parser.add_argument("--out", default=str(HERE), help="folder for passes_curve.{json,md,png}")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    torch.set_num_threads(args.threads or max(1, len(os.sched_getaffinity(0))))
    from hydra.utils import instantiate
    from masks_grid import masks_timesteps

    from conceptdistill.evaluation import mask_scores, sampled_pixels
    from conceptdistill.metrics import attention_auc

    cfg = compose([f"data.num_test={args.images}"])
    if args.tiny:
        from conceptdistill.diffusion.tiny import build_tiny_parts

        parts = build_tiny_parts()
        settings = [("T=50, last 2", "reference", 50, 2, 1), ("T=50, last 1", "suffix", 50, 1, 1),
                    ("T=12, last 1, 2 draws", "draws", 12, 1, 2)]
    else:
        from conceptdistill.diffusion.loading import load_diffusion_parts
        from conceptdistill.diffusion.registry import PACKAGED_WORLD_MODEL

        parts = load_diffusion_parts(str(PACKAGED_WORLD_MODEL))
        settings = SETTINGS
    dataset = instantiate(cfg.data).dataset("test")
    samples = [dataset[i] for i in range(len(dataset))]
    ids = [s["id"] for s in samples]
    images = torch.stack([s["image"] for s in samples])
    truths = [s["mask"].numpy().astype(bool) for s in samples]
    batch_size = int(cfg.masks.batch_size)

    def score(masker, maps: np.ndarray) -> tuple[dict, list[np.ndarray]]:
        masks = [masker.binarize(m) for m in maps]
        scores = mask_scores(masks, truths)
        return {"auc": 100 * attention_auc(*sampled_pixels(list(maps), truths, seed=int(cfg.seed))),
                "iou": 100 * scores["iou"], "miou": 100 * scores["miou"], "acc": 100 * scores["acc"],
                "iou_per_image": 100 * scores["iou_per_image"]}, masks

    rows, reference_terms = [], None
    for name, family, num_steps, start_step, draws in settings:
        masker = instantiate(cfg.masks.module, num_steps=num_steps, start_step=start_step, _convert_="all")(parts)
        began = time.perf_counter()
        maps = compute_maps(masker, images, ids, draws, 0, batch_size)
        seconds = time.perf_counter() - began
        scores, masks = score(masker, maps)
        row = {"name": name, "family": family, "num_steps": num_steps, "start_step": start_step, "draws": draws,
               "passes": start_step * draws,
               "timesteps": [int(t) for t in masks_timesteps(parts.scheduler.config, num_steps, start_step)], **scores,
               "seconds_per_image": seconds / len(ids)}
        terms = per_image_terms(maps, masks, truths)
        if draws == 1:  # the replicate: the same schedule with the next independent draw
            second, _ = score(masker, compute_maps(masker, images, ids, 1, 1, batch_size))
            row.update({f"{k}_2": v for k, v in second.items()})
        if rows:
            ref = rows[0]
            row.update(delta_auc=row["auc"] - ref["auc"], delta_iou=row["iou"] - ref["iou"])
            if draws == 1:
                row.update(delta_auc_2=row["auc_2"] - ref["auc_2"], delta_iou_2=row["iou_2"] - ref["iou_2"])
            row.update(bootstrap(reference_terms, terms, args.bootstrap))
        else:
            reference_terms = terms
        rows.append(row)
        print(f"  {name:<30} {row['passes']:>3} passes  AUC {row['auc']:6.2f}  IoU {row['iou']:6.2f}  "
              + (f"(2nd draw {row['auc_2']:6.2f} {row['iou_2']:6.2f})  " if draws == 1 else "")
              + f"({seconds:.1f} s)", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    record = {"date": datetime.date.today().isoformat(),
              "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])]),
              "device": f"CPU, {threads} thread{'s' if threads != 1 else ''}", "torch": torch.__version__, "python": platform.python_version(),
              "concept": " ".join(cfg.concept), "prompt": str(cfg.prompts.foreground), "images": len(ids),
              "bootstrap_samples": args.bootstrap, "tolerance_points": TOLERANCE, "figure": "passes_curve.png",
              "wall_seconds": time.perf_counter() - start, "rows": rows}
    record["knee"] = knee(rows)
    plot(record, out / "passes_curve.png")
    (out / "passes_curve.json").write_text(json.dumps(record, indent=2) + "\n")
    text = markdown(record)
    (out / "passes_curve.md").write_text(text)
    print(text)
    return record


if __name__ == "__main__":
    main()
