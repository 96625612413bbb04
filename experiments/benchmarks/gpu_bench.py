"""GPU throughput of the method's inner loops on real-size architectures (random weights; nothing downloaded).

Measures, in bf16, for each model family's published architecture (configs in
conceptdistill/diffusion/model_configs/):
- the masks stage: denoiser passes per second with the concept's attention captured (its unit of work; one image
  costs T0 = 40 passes), beside plain passes (the floor), the capture overhead, and the achieved TFLOP/s of the
  useful work (FLOPs of one plain pass, counted by torch's FlopCounterMode) against the card's dense bf16 peak;
- a fine-tuning step (forward + backward + AdamW, bf16 autocast) per second, for SD 1.5 and SDXL: LoRA, LoRA with
  gradient checkpointing, and full fine-tuning (float32 master weights);
- peak GPU memory of each.
Text encoders and the VAE are left out: the method encodes its few prompts once and each image once.

- the points per denoiser pass where the host waits for the device (blocking copies, values read back): on a
  GPU counted by torch's sync debug mode; with ``--device meta`` (any machine, no memory: shapes only) found by
  `DeviceTraffic` (conceptdistill/utils/device_traffic.py), with the line that causes each.

    python experiments/benchmarks/gpu_bench.py --device cuda --out experiments/benchmarks/gpu.json
    python experiments/benchmarks/gpu_bench.py --device meta --out experiments/benchmarks/sync_points.json
    python experiments/benchmarks/gpu_bench.py --dry      # tiny models on the CPU, seconds (a test runs it)
Results: gpu.json and gpu.md beside this file (the command and date are recorded in both).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import platform
import sys
import time
import warnings
from pathlib import Path

import torch

from conceptdistill.diffusion.attention import AttentionStore, capture_attention
from conceptdistill.diffusion.parts import FAMILIES, concat_conditioning

HERE = Path(__file__).resolve().parent
CONFIGS = HERE.parent.parent / "conceptdistill" / "diffusion" / "model_configs"
#: dense bf16 tensor-core peak of the H100 SXM / H200 (NVIDIA's datasheets: 989 TFLOP/s without sparsity)
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
#: family -> (config folder, pipeline class, image side, masks batch, LoRA batch)
SHAPES = {
    "sd15": ("sd15", "StableDiffusionPipeline", 512, 8, 4),
    "sdxl": ("sdxl", "StableDiffusionXLPipeline", 1024, 4, 2),
    "sd3": ("sd3", "StableDiffusion3Pipeline", 1024, 2, None),
    "sd35": ("sd35", "StableDiffusion3Pipeline", 1024, 1, None),
    "flux": ("flux", "FluxPipeline", 1024, 1, None),
}


def _config(family: str, sub: str) -> dict:
    name = "scheduler_config.json" if sub == "scheduler" else "config.json"
    return json.loads((CONFIGS / family / sub / name).read_text())


def build_parts(family: str, device: str, dtype: torch.dtype, *, dry: bool):
    """The family's denoiser and VAE from the real configs (dry: a tiny model of the family), random weights,
    created directly on `device` in `dtype`."""
    import diffusers

    from conceptdistill.diffusion.families import load_all

    load_all()
    if dry:
        import tempfile

        from conceptdistill.diffusion.loading import load_diffusion_parts

        folder = Path(tempfile.mkdtemp(prefix=f"bench-{family}-")) / "pipeline"
        if family == "sd15":
            from conceptdistill.diffusion.loading import save_diffusion_parts
            from conceptdistill.diffusion.tiny import build_tiny_parts

            save_diffusion_parts(build_tiny_parts(), folder)
        else:
            from conceptdistill.diffusion.tiny_families import save_tiny_model

            save_tiny_model(folder, family)
        flow = family in ("sd3", "sd35", "flux")
        return load_diffusion_parts(folder, settings={"max_sequence_length": 32} if flow else {}).to(device)
    config_family, pipeline, *_ = SHAPES[family]
    cls = FAMILIES[pipeline]
    denoiser_config = _config(config_family, cls.denoiser_name)
    denoiser_cls = getattr(diffusers, denoiser_config["_class_name"])
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            denoiser = denoiser_cls.from_config(denoiser_config).eval()
            vae = diffusers.AutoencoderKL.from_config(_config(config_family, "vae")).eval()
    finally:
        torch.set_default_dtype(previous)
    scheduler_config = _config(config_family, "scheduler")
    scheduler = getattr(diffusers, scheduler_config["_class_name"]).from_config(scheduler_config)
    settings = {"max_sequence_length": 256 if family.startswith("sd3") else 512} if cls.noise_process == "flow" else {}
    return cls(denoiser=denoiser, vae=vae, text_encoder=None, tokenizer=None, scheduler=scheduler, settings=settings)


def conditioning(parts, batch: int) -> dict[str, torch.Tensor]:
    """Random text conditioning of the family's shapes (what encode_prompts returns for real encoders)."""
    config, device, dtype = parts.denoiser.config, parts.device, parts.dtype
    family = parts.family

    def randn(*shape):
        return torch.randn(*shape, device=device, dtype=dtype)

    if family == "sd":
        return {"encoder_hidden_states": randn(batch, 77, config.cross_attention_dim)}
    if family == "sdxl":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        return {"encoder_hidden_states": randn(batch, 77, config.cross_attention_dim), "text_embeds": randn(batch, pooled)}
    text = 77 + parts.max_sequence_length if family == "sd3" else parts.max_sequence_length
    return {"encoder_hidden_states": randn(batch, text, config.joint_attention_dim),
            "pooled_projections": randn(batch, config.pooled_projection_dim)}


def timed(fn, repeats: int, sync) -> float:
    """Median seconds of `repeats` calls after one warm-up call."""
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def bench_family(family: str, args, device: str, dtype: torch.dtype) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    _, _, side, batch, lora_batch = SHAPES[family]
    if args.dry:
        side, batch, lora_batch = 32, 2, (2 if lora_batch else None)
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    parts = build_parts(family, device, dtype, dry=args.dry)
    latent_shape = parts.latent_shape_for(side)
    latents = torch.randn(batch, *latent_shape, device=device, dtype=parts.dtype)
    cond = conditioning(parts, batch) if not args.dry else parts.encode_prompts(["a photo of a bird"] * batch)
    timesteps = parts.attention_timesteps(50, 40, latent_shape).to(device)
    row = {"family": family, "image_side": side, "batch": batch,
           "parameters_M": round(sum(p.numel() for p in parts.denoiser.parameters()) / 1e6, 1)}

    def passes(capture: bool, per_call: int = 1, steps: int | None = None):
        """`steps` (default args.steps) denoiser passes per image, `per_call` timesteps batched into each call."""
        steps = args.steps if steps is None else steps
        store = AttentionStore([5], tuple(latent_shape[-2:]))
        batched = concat_conditioning(*[cond] * per_call)
        with torch.no_grad(), (capture_attention(parts, store) if capture else contextlib.nullcontext()):
            for first in range(0, steps, per_call):
                chunk = timesteps[first : min(first + per_call, steps)]
                step = torch.cat([t.expand(batch) for t in chunk])
                repeated = latents.repeat(len(chunk), 1, 1, 1)
                noisy = parts.add_noise(repeated, torch.randn_like(repeated), step)
                store.steps_per_call = len(chunk)
                parts.predict(noisy, step, batched if len(chunk) == per_call else concat_conditioning(*[cond] * len(chunk)))
        return store

    if device == "meta":  # shapes only: where the host would wait, nothing timed
        return {**row, **sync_points(passes, device)}
    row.update(sync_points(passes, device))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        parts.predict(latents, timesteps[:1].expand(batch), cond)
    flops_per_pass = counter.get_total_flops()  # the whole batch
    plain = timed(lambda: passes(False), args.repeats, sync) / args.steps
    captured = timed(lambda: passes(True), args.repeats, sync) / args.steps
    row.update(
        plain_passes_per_s=round(batch / plain, 2), capture_passes_per_s=round(batch / captured, 2),
        capture_overhead=round(captured / plain, 3), masks_images_per_s=round(batch / captured / 40, 3),
        gflop_per_pass=round(flops_per_pass / batch / 1e9, 1),
        capture_tflops=round(flops_per_pass / captured / 1e12, 1),
    )
    if cuda:
        row["masks_peak_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in torch.cuda.get_device_name()), None)
        if peak:
            row["capture_fraction_of_peak"] = round(row["capture_tflops"] / peak, 3)
    if args.variants and family in ("sd15", "sdxl"):
        row.update(bench_variants(parts, passes, batch, flops_per_pass, args, sync, cuda, compile_too=family == "sd15" and args.compile and not args.dry))
    if lora_batch:
        row["finetune_batch"] = lora_batch
        for variant in ("lora", "lora_gc"):  # the same LoRA model, then with gradient checkpointing
            row.update(bench_finetune(parts, lora_batch, latent_shape, args, sync, cuda, variant))
        del parts  # a fresh model for full fine-tuning (no LoRA layers in it)
        row.update(bench_finetune(build_parts(family, device, dtype, dry=args.dry), lora_batch, latent_shape, args,
                                  sync, cuda, "full"))
    return row


def sync_points(passes, device: str) -> dict:
    """Points per denoiser pass where the host waits for the device, plain and capturing: the difference
    between 6 and 2 passes, over 4. On CUDA torch's sync debug mode counts them (each one warns); on the meta
    device `DeviceTraffic` finds them, and "*_sync_lines" names the lines. Elsewhere (a CPU run) nothing."""
    result = {}
    for name, capture in (("plain", False), ("capture", True)):
        if device.startswith("cuda"):
            counts = []
            for steps in (2, 6):
                torch.cuda.synchronize()
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    torch.cuda.set_sync_debug_mode("warn")
                    try:
                        passes(capture, steps=steps)
                    finally:
                        torch.cuda.set_sync_debug_mode("default")
                counts.append(sum("synchroniz" in str(w.message) for w in caught))
            result[f"{name}_syncs_per_pass"] = (counts[1] - counts[0]) / 4
        elif device == "meta":
            from conceptdistill.utils.device_traffic import DeviceTraffic

            runs = []
            for steps in (2, 2, 6):  # the first run makes what is made once
                with DeviceTraffic() as traffic:
                    passes(capture, steps=steps)
                runs.append(traffic)
            growth = runs[2].growth(runs[1])
            result[f"{name}_syncs_per_pass"] = sum(many - few for few, many in growth.values()) / 4
            result[f"{name}_sync_lines"] = "; ".join(f"{where} ({(many - few) / 4:g})" for (_, where), (few, many) in growth.items())
    return result


def bench_variants(parts, passes, batch: int, flops_per_pass: float, args, sync, cuda: bool, compile_too: bool) -> dict:
    """Masks-stage throughput (capture on) with the GPU options, each alone and together: 4 timesteps per
    denoiser call (masks.module.timesteps_per_call=4), channels_last memory format, torch.compile."""
    result = {}

    def measure(name: str, per_call: int = 1) -> None:
        seconds = timed(lambda: passes(True, per_call), args.repeats, sync) / args.steps
        result[f"{name}_images_per_s"] = round(batch / seconds / 40, 3)
        result[f"{name}_tflops"] = round(flops_per_pass / seconds / 1e12, 1)

    measure("steps4", per_call=4)
    parts.denoiser.to(memory_format=torch.channels_last)
    measure("channels_last")
    parts.denoiser.to(memory_format=torch.contiguous_format)
    if compile_too:
        eager = parts.denoiser
        parts.denoiser = torch.compile(eager)
        try:
            start = time.perf_counter()
            passes(True, 4)
            sync()
            result["compile_seconds"] = round(time.perf_counter() - start, 1)
            measure("compile")
            parts.denoiser = torch.compile(eager.to(memory_format=torch.channels_last))
            passes(True, 4)
            measure("all", per_call=4)
        except Exception as err:  # recorded in the table, not hidden: which option failed and why
            result["compile_error"] = f"{type(err).__name__}: {err}"[:160]
        finally:
            parts.denoiser = eager.to(memory_format=torch.contiguous_format)
    return result


def bench_finetune(parts, batch: int, latent_shape, args, sync, cuda: bool, variant: str) -> dict:
    """Fine-tuning steps per second and peak memory: forward + backward + AdamW, bf16 autocast.

    variant: "lora" (rank 4 on the attention projections, the stage's default targets), "lora_gc" (the same with
    gradient checkpointing), "full" (every weight, float32 master weights as the stage keeps them).
    """
    from conceptdistill.diffusion.adapters import add_adapter

    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    if variant in ("lora", "full"):
        adapter = "full" if variant == "full" else "lora"
        add_adapter(parts.denoiser, adapter, rank=4, alpha=4.0, targets=("to_q", "to_k", "to_v", "to_out.0"), seed=0)
    if variant == "lora_gc":
        parts.denoiser.enable_gradient_checkpointing()
    parts.denoiser.train()
    optimizer = torch.optim.AdamW([p for p in parts.denoiser.parameters() if p.requires_grad], lr=1e-4)
    latents = torch.randn(batch, *latent_shape, device=parts.device, dtype=torch.bfloat16 if cuda else torch.float32)
    cond = conditioning(parts, batch) if not args.dry else parts.encode_prompts(["a photo of a bird"] * batch)
    generators = [torch.Generator().manual_seed(i) for i in range(batch)]

    def step():
        optimizer.zero_grad(set_to_none=True)
        timesteps = parts.training_timesteps(generators)
        noise = torch.randn_like(latents)
        with torch.autocast(parts.device.type, dtype=torch.bfloat16, enabled=cuda):
            noisy = parts.add_noise(latents, noise, timesteps)
            prediction = parts.predict(noisy, timesteps, {k: v.to(latents.dtype) for k, v in cond.items()})
        target = parts.training_target(latents, noise, timesteps)
        loss = torch.nn.functional.mse_loss(prediction.float(), target.float())
        loss.backward()
        optimizer.step()

    seconds = timed(step, args.repeats, sync)
    result = {f"{variant}_steps_per_s": round(1 / seconds, 3)}
    if cuda:
        result[f"{variant}_peak_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return result


def markdown(record: dict) -> str:
    if record["device"] == "meta":
        return sync_markdown(record)
    keys = ["family", "image_side", "parameters_M", "batch", "plain_passes_per_s", "capture_passes_per_s",
            "capture_overhead", "masks_images_per_s", "gflop_per_pass", "capture_tflops", "capture_fraction_of_peak",
            "masks_peak_GiB", "plain_syncs_per_pass", "capture_syncs_per_pass", "steps4_images_per_s", "channels_last_images_per_s", "compile_images_per_s",
            "all_images_per_s", "all_tflops", "compile_seconds", "finetune_batch", "lora_steps_per_s", "lora_peak_GiB", "lora_gc_steps_per_s",
            "lora_gc_peak_GiB", "full_steps_per_s", "full_peak_GiB"]
    models = ("tiny models of each family in float32: a check of the script, not a measurement" if record.get("dry")
              else "bf16 weights, random values, the published architectures (conceptdistill/diffusion/model_configs/)")
    lines = [f"# GPU benchmark ({record['device']})", "", f"`{record['command']}` on {record['date']}; "
             f"{record['steps']} denoiser passes per timing, median of {record['repeats']}; {models}. One masks-stage "
             "image costs 40 passes (T0 = 40). TFLOP/s: FLOPs of the useful (plain) pass per second of the capturing pass.",
             "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in record["rows"]:
        lines.append("| " + " | ".join(str(row.get(k, "")) for k in keys) + " |")
    return "\n".join(lines) + "\n"


def sync_markdown(record: dict) -> str:
    """The --device meta record: points per pass where a GPU would wait for the host, and their lines."""
    lines = [
        "# Where the masks stage's passes make a GPU wait for the host", "",
        f"`{record['command']}` on {record['date']} (torch {record['torch']}): each family's published architecture "
        "on the meta device (shapes only, nothing computed), the benchmark's masks loop with and without attention "
        "capture; blocking host/device copies and values read back per denoiser pass (6 passes minus 2, over 4), "
        "found by conceptdistill/utils/device_traffic.py. On a GPU each such point drains the queue of kernels the "
        "host has launched ahead.", "",
        "| family | parameters_M | image_side | batch | plain_syncs_per_pass | capture_syncs_per_pass | lines (per pass) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in record["rows"]:
        lines.append(f"| {row['family']} | {row.get('parameters_M', '')} | {row.get('image_side', '')} | {row.get('batch', '')} | "
                     f"{row.get('plain_syncs_per_pass', row.get('error', ''))} | {row.get('capture_syncs_per_pass', '')} | "
                     f"{row.get('capture_sync_lines') or row.get('plain_sync_lines') or ''} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None,
                        help="cuda (the default where there is a GPU), meta (sync points only: any machine) or cpu")
    parser.add_argument("--families", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--steps", type=int, default=10, help="denoiser passes per timing")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dry", action="store_true", help="tiny models on the CPU (seconds): checks the script")
    parser.add_argument("--no-variants", dest="variants", action="store_false",
                        help="skip the GPU options (timesteps per call, channels_last)")
    parser.add_argument("--compile", action="store_true",
                        help="also time torch.compile (SD 1.5 only; compiling the capturing UNet did not finish "
                             "within 4.5 minutes on an H200, so it is off by default)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (a .md is written beside it)")
    args = parser.parse_args(argv)
    from conceptdistill.utils.console import quiet_dependencies

    quiet_dependencies()  # no weight-loading bars
    if args.dry:  # tiny models: on the CPU, or on the meta device to find the sync points
        args.device, args.steps, args.repeats = ("meta" if args.device == "meta" else "cpu"), 2, 1
    elif args.device is None and not torch.cuda.is_available():
        parser.error("no GPU here: use --dry (tiny models, checks the script), --device meta (sync points of the "
                     "real architectures, shapes only) or --device cpu (the real sizes in float32: slow; FLUX "
                     "needs about 48 GB of memory)")
    args.device = args.device or "cuda"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch sees no GPU here")
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
    rows = []
    for family in args.families:
        try:
            rows.append(bench_family(family, args, args.device, dtype))
        except torch.OutOfMemoryError as err:  # recorded, not hidden: the table says which size did not fit
            rows.append({"family": family, "error": f"out of memory: {err}"[:200]})
        print(json.dumps(rows[-1]), flush=True)
    device = (torch.cuda.get_device_name() if args.device.startswith("cuda") else "meta" if args.device == "meta"
              else platform.processor() or "cpu")
    command = ["python", "experiments/benchmarks/gpu_bench.py", *(sys.argv[1:] if argv is None else argv)]
    record = {"device": device, "date": datetime.date.today().isoformat(), "command": " ".join(command),
              "dry": args.dry, "torch": torch.__version__, "rows": rows}
    if device != "meta":  # the meta mode times nothing
        record.update(steps=args.steps, repeats=args.repeats)
    if args.out:
        args.out.write_text(json.dumps(record, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(markdown(record))
    else:
        print("no --out given: the rows above are not written anywhere", file=sys.stderr)
    return record


if __name__ == "__main__":
    main()
