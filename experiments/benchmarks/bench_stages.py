"""Throughput of the method's inner loops on this machine, recorded in experiments/benchmarks/.

Measures, for the shapes world's committed model and for a Stable-Diffusion-shaped UNet (the real SD 1.x
architecture from its config, random weights; no download):
- one attention-capturing UNet pass (the masks stage's unit of work), per image;
- one plain UNet pass (inpainting and sampling), per image;
- one LoRA training step (forward + backward), per image.
Run with `make bench`; pass --device cuda on a GPU machine. Results: bench_<device>.json and .md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from conceptdistill.diffusion.attention import AttentionStore, capture_cross_attention  # noqa: E402
from conceptdistill.diffusion.loading import load_diffusion_parts  # noqa: E402
from conceptdistill.diffusion.registry import PACKAGED_WORLD_MODEL  # noqa: E402

HERE = Path(__file__).resolve().parent


def sd_shaped_unet():
    """SD 1.x's UNet architecture (860M parameters) with random weights."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )


def timed(function, repeats: int, device: torch.device) -> float:
    """Median seconds of `repeats` calls after one warm-up (the median resists this machine's noise)."""
    function()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        function()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_unet(name: str, unet, latent_shape, text_shape, batch: int, repeats: int, device, dtype) -> dict:
    from peft import LoraConfig

    unet = unet.to(device=device, dtype=dtype).eval()
    latents = torch.randn(batch, *latent_shape, device=device, dtype=dtype)
    text = torch.randn(batch, *text_shape, device=device, dtype=dtype)
    timestep = torch.full((batch,), 500, device=device)
    store = AttentionStore([2], tuple(latent_shape[1:]))

    def plain():
        with torch.no_grad():
            unet(latents, timestep, encoder_hidden_states=text)

    def captured():
        with torch.no_grad(), capture_cross_attention(unet, store):
            unet(latents, timestep, encoder_hidden_states=text)
        store.reset()

    result = {"model": name, "parameters_m": round(sum(p.numel() for p in unet.parameters()) / 1e6, 2),
              "batch": batch, "latent": list(latent_shape),
              "plain_ms_per_image": 1000 * timed(plain, repeats, device) / batch,
              "captured_ms_per_image": 1000 * timed(captured, repeats, device) / batch}
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=8, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    for p in unet.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    unet.train()

    def train_step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = unet(latents, timestep, encoder_hidden_states=text).sample.float().pow(2).mean()
        loss.backward()

    result["lora_train_ms_per_image"] = 1000 * timed(train_step, repeats, device) / batch
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-sd", action="store_true", help="only the shapes world model")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    world = load_diffusion_parts(str(PACKAGED_WORLD_MODEL))
    rows = [bench_unet("shapes world (committed)", world.denoiser, world.latent_shape,
                       (world.tokenizer.model_max_length, world.denoiser.config.cross_attention_dim),
                       64, args.repeats, device, torch.float32)]
    if not args.skip_sd:
        batch = 8 if device.type == "cuda" else 1
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        rows.append(bench_unet("SD 1.x-shaped UNet (random weights)", sd_shaped_unet(), (4, 64, 64), (77, 768),
                               batch, args.repeats, device, dtype))
    label = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    record = {"date": datetime.date.today().isoformat(), "command": "python " + " ".join(sys.argv),
              "device": label, "torch": torch.__version__, "python": platform.python_version(), "rows": rows}
    stem = HERE / f"bench_{device.type}"
    stem.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [f"# Inner-loop throughput on {label}", "", f"{record['date']}, `{record['command']}`", "",
             "| model | params (M) | batch | plain pass ms/image | attention-capturing pass ms/image | LoRA train step ms/image |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['parameters_m']} | {r['batch']} | {r['plain_ms_per_image']} | "
              f"{r['captured_ms_per_image']} | {r['lora_train_ms_per_image']} |" for r in rows]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
