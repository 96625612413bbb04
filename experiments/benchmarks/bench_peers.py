"""The masks stage's attention capture against its peers, side by side: time per image and peak memory.

Four ways to get the concept's attention map from the same UNet, images and timesteps (an SD 1.x-shaped UNet,
the real architecture with random weights, at --resolution px, batch 1, one conditional pass per step):
  (a) plain      UNet passes and nothing else: the floor;
  (b) capture    this project's `capture_cross_attention` + `AttentionStore` (reduced on the fly);
  (c) daam       DAAM's tracer (castorini/daam 0.2.0, its pinned diffusers 0.21.2), in its own virtual
                 environment (experiments/benchmarks/setup_daam.sh), on the same saved weights and inputs;
  (d) reference  the paper's reference code's way: every map of all 77 tokens x every layer x every step kept,
                 reduced at the end (reference_store.ReferenceStore).
for T0 in --steps (the last T0 steps of the masks stage's 50-step DDIM grid) and two layer sets: every
cross-attention layer, and only those of down_blocks.2 and up_blocks.1 (SD's 16x16 layers at 512 px).

Every configuration runs in a fresh process (peer_worker.py), so its peak resident set size is its own; the
configurations are interleaved (each T0 block runs every method before the next block) so that this shared
machine's load drifts over all of them alike, and ratios are taken within a block. Results:
bench_peers_<device>.json and .md beside this file.

    python experiments/benchmarks/bench_peers.py                    # as `make bench` runs it
    python experiments/benchmarks/bench_peers.py --no-daam --steps 10
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path[:0] = [str(REPO), str(HERE)]  # this checkout's conceptdistill, and the scripts beside this one

import numpy as np  # noqa: E402
import torch  # noqa: E402

WORKER = HERE / "peer_worker.py"
DEFAULT_DAAM_PYTHON = REPO / ".venv-daam" / "bin" / "python"

PROMPT, WORD, TOKEN_INDEX = "a photo of a bird", "bird", 5  # <bos> a photo of a bird: "bird" is token 5
LAYER_SETS: dict[str, list[str] | None] = {"all": None, "16px": ["down_blocks.2", "up_blocks.1"]}
METHODS = ("plain", "capture", "daam", "reference")
LABELS = {"plain": "(a) plain UNet passes", "capture": "(b) this project's capture",
          "daam": "(c) DAAM tracer", "reference": "(d) reference code (keep all)"}


def sd_scheduler():
    """SD 1.x's DDIM noise schedule (the masks stage's grid on it: t = 781, 761, ..., 1 for T0 = 40)."""
    from diffusers import DDIMScheduler

    from conceptdistill.diffusion.tiny import SD_BETA_END, SD_BETA_START

    return DDIMScheduler(num_train_timesteps=1000, beta_start=SD_BETA_START, beta_end=SD_BETA_END,
                         beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def prepare(folder: Path, *, resolution: int, max_steps: int, tiny: bool, seed: int = 0) -> dict:
    """Save the UNet weights and one image's inputs (noised latents at the masks stage's timesteps) once."""
    from masks_grid import masks_timesteps

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if tiny:
            from conceptdistill.diffusion.tiny import build_tiny_parts

            unet = build_tiny_parts(model_max_length=16).denoiser
            text_len, latent_side = 16, resolution // 2
        else:
            from bench_stages import sd_shaped_unet

            unet = sd_shaped_unet()
            text_len, latent_side = 77, resolution // 8
        unet.save_pretrained(str(folder / "unet"))
        scheduler = sd_scheduler()
        timesteps = masks_timesteps(scheduler.config, 50, max_steps)
        latents = torch.randn(1, unet.config.in_channels, latent_side, latent_side)  # one image's z_0
        noise = torch.randn(len(timesteps), *latents.shape)  # a fresh draw per step, as the masks stage does
        noisy = torch.stack([scheduler.add_noise(latents, n, t.reshape(1)) for n, t in zip(noise, timesteps, strict=True)])
        text = torch.randn(1, text_len, unet.config.cross_attention_dim)
    torch.save({"noisy": noisy, "timesteps": timesteps, "text": text}, folder / "inputs.pt")
    return {"parameters_m": round(sum(p.numel() for p in unet.parameters()) / 1e6, 2), "latent": list(latents.shape),
            "timesteps": timesteps.tolist()}


def run_worker(python: str, spec: dict, folder: Path) -> dict:
    path = folder / "spec.json"
    path.write_text(json.dumps(spec))
    # A fixed mmap threshold: every allocation of 64 KiB or more is its own mapping, returned to the system when
    # freed, so the resident set follows live memory (glibc's default threshold grows after frees, and the heap
    # then keeps freed activations resident: peaks drifted by ~100 MB between identical runs).
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONWARNINGS": "ignore",
           "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run([python, str(WORKER), str(path)], capture_output=True, text=True, env=env, cwd=REPO)
    if done.returncode != 0:
        raise RuntimeError(f"worker {spec['method']} (T0={spec['steps']}, {spec.get('layers_name')}) failed:\n"
                           f"{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(args, folder: Path, daam_python: str | None) -> list[dict]:
    """Every configuration once per repeat, interleaved: per repeat and T0, each method and layer set."""
    results = []
    methods = [m for m in METHODS if m != "daam" or daam_python]
    for repeat in range(args.repeats):
        for steps in args.steps:
            for method in methods:
                layer_sets = ["all"] if method == "plain" or steps not in args.subset_steps else list(LAYER_SETS)
                for layers_name in layer_sets:
                    spec = {"folder": str(folder), "steps": steps, "method": method, "layers_name": layers_name,
                            "layers": LAYER_SETS[layers_name], "token_index": TOKEN_INDEX, "prompt": PROMPT,
                            "word": WORD, "device": args.device, "threads": args.threads}
                    python = daam_python if method == "daam" else sys.executable
                    result = run_worker(python, spec, folder)
                    result["repeat"] = repeat
                    results.append(result)
                    print(f"  T0={steps:>2} {method:<9} {layers_name:<4} {result['cpu_seconds_per_image']:8.2f} CPU s/image "
                          f"({result['seconds_per_image']:.1f} wall)  "
                          f"peak RSS {result['peak_rss_mb']:8.0f} MB (+{result['peak_rss_mb'] - result['baseline_rss_mb']:.0f})",
                          flush=True)
            if daam_python and steps == args.steps[0]:  # the DAAM environment's own floor (its diffusers' UNet)
                spec = {"folder": str(folder), "steps": steps, "method": "plain", "layers_name": "all", "layers": None,
                        "token_index": TOKEN_INDEX, "device": args.device, "threads": args.threads}
                result = run_worker(daam_python, spec, folder)
                result.update(repeat=repeat, env="daam")
                results.append(result)
    return results


def summarise(results: list[dict]) -> dict:
    """Medians over repeats per configuration; ratios within each (T0, layer set); map agreement."""
    def key(r):
        return (r["method"] + ("@daam-env" if r.get("env") == "daam" else ""), r["steps"], r["layers_name"])

    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault(key(r), []).append(r)
    rows = {}
    for (method, steps, layers_name), runs in groups.items():
        rows[(method, steps, layers_name)] = {
            "method": method, "steps": steps, "layers": layers_name, "runs": len(runs),
            "seconds_per_image": float(np.median([r["seconds_per_image"] for r in runs])),
            "cpu_seconds_per_image": float(np.median([r["cpu_seconds_per_image"] for r in runs])),
            "median_pass_cpu_seconds": float(np.median([r["median_pass_cpu_seconds"] for r in runs])),
            "median_pass_seconds": float(np.median([r["median_pass_seconds"] for r in runs])),
            "reduce_seconds": float(np.median([r["reduce_seconds"] for r in runs])),
            "peak_rss_mb": float(np.median([r["peak_rss_mb"] for r in runs])),
            "peak_over_baseline_mb": float(np.median([r["peak_rss_mb"] - r["baseline_rss_mb"] for r in runs])),
            "retained_mb": float(np.median([r["retained_mb"] for r in runs])),
            **({"peak_gpu_mb": float(np.median([r["peak_gpu_mb"] for r in runs]))} if "peak_gpu_mb" in runs[0] else {}),
        }
    ratios, agreement = [], []
    for (method, steps, layers_name), row in rows.items():
        if method != "capture":
            continue
        plain = rows.get(("plain", steps, "all"))
        entry = {"steps": steps, "layers": layers_name}
        for clock, suffix in (("cpu_seconds_per_image", ""), ("seconds_per_image", "_wall")):
            if plain:
                entry["capture_over_plain" + suffix] = row[clock] / plain[clock]
            for peer, name in (("reference", "reference_over_capture"), ("daam", "daam_over_capture")):
                if (peer, steps, layers_name) in rows:
                    entry[name + suffix] = rows[(peer, steps, layers_name)][clock] / row[clock]
            daam_floor = next((v for k, v in rows.items() if k[0] == "plain@daam-env"), None)
            if daam_floor and ("daam", steps, layers_name) in rows:  # per pass: the floor ran at the first T0
                daam = rows[("daam", steps, layers_name)]
                entry["daam_over_its_plain" + suffix] = (daam[clock] / steps) / (daam_floor[clock] / daam_floor["steps"])
        ratios.append(entry)
        # the maps: (d) must equal (b); DAAM's differs by construction (bicubic, half the heads), so correlation
        capture_maps = [np.array(r["map"]) for r in groups[key({"method": "capture", "steps": steps, "layers_name": layers_name})]]
        for peer in ("reference", "daam"):
            runs = groups.get((peer, steps, layers_name))
            if runs:
                other = np.array(runs[0]["map"])
                agreement.append({"steps": steps, "layers": layers_name, "peer": peer,
                                  "max_abs_difference": float(np.abs(other - capture_maps[0]).max()),
                                  "pearson_r": float(np.corrcoef(other, capture_maps[0])[0, 1])})
    checksums = {r.get("env", "project"): r["checksum"] for r in results}
    return {"rows": list(rows.values()), "ratios": ratios, "map_agreement": agreement, "unet_output_checksums": checksums}


def markdown(record: dict) -> str:
    summary = record["summary"]
    steps_list = sorted({r["steps"] for r in summary["rows"]})
    lines = [f"# Masks-stage attention capture and its peers, {record['device']}", "",
             f"{record['date']}, `{record['command']}` ({record['wall_seconds']:.0f} s)", "",
             f"SD 1.x-shaped UNet ({record['setup']['parameters_m']}M parameters, random weights), "
             f"{record['resolution']} px (latent {record['setup']['latent'][-2]}x{record['setup']['latent'][-1]}), "
             f"batch 1, one conditional pass per step at the masks stage's timesteps (the last T0 of the 50-step "
             f"DDIM grid); each configuration in a fresh process, {record['repeats']} run(s) each, medians. "
             "Layers: all = every cross-attention layer (DAAM: its 15, no mid block); 16px = down_blocks.2 and "
             "up_blocks.1 (5 layers; 16x16 at 512 px). Peak = the process's resident-set-size high-water mark; "
             "+base = peak minus the mark after loading and one warm-up pass; kept = attention data held after the "
             "last step.", "",
             "| method | layers | " + " | ".join(f"T0={s} CPU s/image (wall) | T0={s} peak MB (+base) | T0={s} kept MB" for s in steps_list) + " |",
             "|---|---|" + "---|---|---|" * len(steps_list)]
    by_key = {(r["method"], r["steps"], r["layers"]): r for r in summary["rows"]}
    order = [(m, ln) for m in ("plain", "plain@daam-env", "capture", "daam", "reference") for ln in LAYER_SETS]
    for method, layers_name in order:
        cells = []
        for s in steps_list:
            r = by_key.get((method, s, layers_name))
            cells.append("" if r is None else
                         f"{r['cpu_seconds_per_image']:.2f} ({r['seconds_per_image']:.1f}) | {r['peak_rss_mb']:.0f} "
                         f"(+{r['peak_over_baseline_mb']:.0f}) | {r['retained_mb']:.2f}")
        if any(cells):
            label = LABELS.get(method, "(a) plain, in DAAM's environment" if method == "plain@daam-env" else method)
            lines.append(f"| {label} | {layers_name} | " + " | ".join(c or " | | " for c in cells) + " |")
    lines += ["", "Time ratios per image, same T0 and layer set, from CPU time (wall-clock in brackets; on a loaded "
              "shared machine only the CPU-time ratios mean much). DAAM / its env's (a): per pass, against plain "
              "passes run by DAAM's environment (its diffusers) at the first T0.", "",
              "| T0 | layers | (b)/(a) | (d)/(b) | DAAM/(b) | DAAM / its env's (a) |", "|---|---|---|---|---|---|"]
    for e in sorted(summary["ratios"], key=lambda e: (e["steps"], e["layers"])):
        cells = [f"{e[k]:.3f} ({e[k + '_wall']:.2f})" if k in e else "" for k in (
            "capture_over_plain", "reference_over_capture", "daam_over_capture", "daam_over_its_plain")]
        lines.append(f"| {e['steps']} | {e['layers']} | " + " | ".join(cells) + " |")
    if summary["map_agreement"]:
        lines += ["", "Maps against (b)'s: (d) must be the same map; DAAM's is bicubic, from 4 of 8 heads and "
                  "summed over steps, so only its shape is compared.", "",
                  "| T0 | layers | peer | max abs difference | Pearson r |", "|---|---|---|---|---|"]
        lines += [f"| {a['steps']} | {a['layers']} | {a['peer']} | {a['max_abs_difference']:.2e} | {a['pearson_r']:.4f} |"
                  for a in sorted(summary["map_agreement"], key=lambda a: (a["steps"], a["layers"], a["peer"]))]
    checks = summary["unet_output_checksums"]
    lines += ["", "Same UNet and inputs in both environments: the warm-up pass's output checksums "
              + ", ".join(f"{k} {v:.6g}" for k, v in checks.items()) + "."]
    if record.get("daam_skipped"):
        lines += ["", f"DAAM not measured: {record['daam_skipped']}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--steps", default="10,20,40", help="T0 values, comma-separated")
    parser.add_argument("--subset-steps", default="10",
                        help="T0 values at which the 16px layer subset is measured too (every layer at all T0)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per worker (0: every core). 1 by default: on a shared 2-core machine two "
                             "OpenMP threads competing with other processes ran the UNet 3-5x slower, and erratically")
    parser.add_argument("--daam-python", default=str(DEFAULT_DAAM_PYTHON),
                        help="python of DAAM's environment (experiments/benchmarks/setup_daam.sh makes it)")
    parser.add_argument("--no-daam", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="the tests' tiny UNet (checks the script, measures nothing)")
    parser.add_argument("--out", default=str(HERE), help="folder for bench_peers_<device>.json and .md")
    args = parser.parse_args(argv)
    args.steps = [int(s) for s in args.steps.split(",")]
    args.subset_steps = [int(s) for s in args.subset_steps.split(",") if s]
    start = datetime.datetime.now()
    daam_python, daam_skipped = None, None
    if not args.no_daam:
        if Path(args.daam_python).exists():
            daam_python = args.daam_python
        else:
            daam_skipped = f"{args.daam_python} missing (run experiments/benchmarks/setup_daam.sh)"
            print(f"DAAM skipped: {daam_skipped}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-peers-") as tmp:
        folder = Path(tmp)
        setup = prepare(folder, resolution=args.resolution, max_steps=max(args.steps), tiny=args.tiny)
        results = measure(args, folder, daam_python)
    device = torch.device(args.device)
    label = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU, {args.threads or len(os.sched_getaffinity(0))} threads"
    record = {"date": start.date().isoformat(), "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *(argv or sys.argv[1:])]),
              "device": label, "torch": torch.__version__, "python": platform.python_version(),
              "resolution": args.resolution, "repeats": args.repeats, "setup": setup,
              "wall_seconds": (datetime.datetime.now() - start).total_seconds(),
              "summary": summarise(results), "daam_skipped": daam_skipped,
              "runs": [{k: v for k, v in r.items() if k != "map"} for r in results]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"bench_peers_{device.type}_{args.resolution}px"
    stem.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    text = markdown(record)
    stem.with_suffix(".md").write_text(text)
    print(text)
    return record


if __name__ == "__main__":
    main()
