"""One configuration of the masks-stage peer benchmark (bench_peers.py), measured in a process of its own.

    python peer_worker.py SPEC.json        # prints one JSON line: times, peak memory, the concept map

Run by bench_peers.py with this project's Python (methods "plain", "capture", "reference") or with DAAM's
virtual environment (methods "daam", and "plain" for that environment's floor), so this file imports only torch
and diffusers at module level: conceptdistill is imported by the methods that use it, DAAM by "daam".

Every configuration does the same UNet work: the same saved UNet weights, one image's noised latents at the
masks stage's timesteps (prepared once by bench_peers.py), batch 1, conditional only, no guidance. It loads the
UNet, runs one plain warm-up pass (so the memory baseline includes a pass's activations), records the resident
set size high-water mark, then runs the method over all steps and reduces to the concept's map. The peak
memory is the process's ru_maxrss (kernel-tracked, so it sees torch's allocations, unlike tracemalloc).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch


def max_rss_mb() -> float:
    """This process's resident-set-size high-water mark (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def load_inputs(folder: Path, steps: int, device: torch.device):
    """The saved UNet, its noised latents for the last `steps` timesteps, their timesteps and the text."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(folder / "unet")).to(device).eval()
    data = torch.load(folder / "inputs.pt")
    noisy = data["noisy"][-steps:].to(device)  # (steps, 1, 4, h, w): the masks stage's last `steps` timesteps
    timesteps = data["timesteps"][-steps:].to(device)
    return unet, noisy, timesteps, data["text"].to(device), data


def layer_filter(names: list[str] | None):
    return (lambda name: True) if names is None else (lambda name: any(part in name for part in names))


def make_method(method: str, unet, spec: dict, latent_hw: tuple[int, int]):
    """(context manager factory, finish, retained) for a method: finish() returns the (h, w) concept map (None
    for plain passes), retained() the bytes of attention data the method holds at the end of the steps."""
    import contextlib

    token = int(spec["token_index"])
    layers = spec.get("layers")
    if method == "plain":
        return contextlib.nullcontext, lambda: None, lambda: 0
    if method in ("capture", "reference"):
        here = Path(__file__).resolve().parent
        sys.path[:0] = [str(here.parent.parent), str(here)]  # this checkout's conceptdistill; reference_store
        from conceptdistill.diffusion.attention import AttentionStore, capture_cross_attention

        if method == "capture":
            store = AttentionStore([token], latent_hw, layers=layers)
        else:
            from reference_store import ReferenceStore

            store = ReferenceStore([token], latent_hw, layers=layers)
        def retained() -> int:
            if method == "reference":
                return store.stored_bytes()
            return sum(t.numel() * t.element_size() for t in [store._sum] if t is not None)

        return (lambda: capture_cross_attention(unet, store)), (lambda: store.mean()[0]), retained
    if method == "daam":
        return daam_method(unet, spec, latent_hw)
    raise ValueError(f"unknown method {method!r}")


def daam_method(unet, spec: dict, latent_hw: tuple[int, int]):
    """DAAM's own tracer (daam.trace.DiffusionHeatMapHooker, i.e. `daam.trace`) on the bare UNet.

    DAAM hooks a StableDiffusionPipeline; the masks stage has no pipeline (it runs the UNet on noised real
    latents), so the tracer is given a stand-in exposing what it reads: the UNet, the VAE's scale factor and a
    tokenizer (word-level, for the prompt's token positions). Its UNet hookers (UNetCrossAttentionHooker),
    heat-map collection (RawHeatMapCollection) and aggregation (compute_global_heat_map, then
    compute_word_heat_map) are DAAM's code, unchanged. Two settings follow DAAM's own conventions at this
    resolution: `latent_hw` is set to the true latent grid (DAAM hard-codes 64x64 or 96x96), so that its maps come out
    at the latent resolution and, as at 512 px, none of the located layers falls under its `factor != 8` rule;
    and the located layers are filtered by name, as the other methods' are. DAAM's locator never locates the
    mid block (unless heads are saved or loaded), so its "all layers" are the 15 of the down and up blocks.
    DAAM slices each map's batch*heads rows in half to drop a guidance batch's unconditional half; on this
    conditional-only batch of one that keeps 4 of the 8 heads (its arithmetic, not ours: left as is).
    """
    from types import SimpleNamespace

    from daam.trace import DiffusionHeatMapHooker

    prompt, word = spec["prompt"], spec["word"]
    tokenizer = SimpleNamespace(tokenize=lambda text: [w + "</w>" for w in text.lower().split()])
    pipe = SimpleNamespace(unet=unet, vae_scale_factor=8, tokenizer=tokenizer,
                           check_inputs=lambda *args, **kwargs: None)
    # Built as DAAM builds it (its locator skips the mid block unless heads are loaded or saved), then only the
    # hookers of the layers this configuration measures are kept.
    tracer = DiffusionHeatMapHooker(pipe)
    hw = latent_hw[0] * latent_hw[1]
    tracer.latent_hw = hw
    wanted = layer_filter(spec.get("layers"))
    names = {id(module): name for name, module in unet.named_modules()}
    kept = []
    for hooker in tracer.module:
        if hasattr(hooker, "latent_hw"):
            hooker.latent_hw = hw
            if not wanted(names[id(hooker.module)]):
                continue
        kept.append(hooker)
    tracer.module = kept
    tracer.last_prompt = prompt

    def finish():
        heat_map = tracer.compute_global_heat_map(prompt)
        return heat_map.compute_word_heat_map(word).heatmap

    def retained() -> int:
        return sum(t.numel() * t.element_size() for _, t in tracer.all_heat_maps if isinstance(t, torch.Tensor))

    return (lambda: tracer), finish, retained


def run(spec: dict) -> dict:
    torch.set_num_threads(int(spec.get("threads") or max(1, len(os.sched_getaffinity(0)))))
    device = torch.device(spec.get("device", "cpu"))
    cuda = device.type == "cuda"
    folder, steps, method = Path(spec["folder"]), int(spec["steps"]), spec["method"]
    unet, noisy, timesteps, text, data = load_inputs(folder, steps, device)
    latent_hw = tuple(noisy.shape[-2:])
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def unet_pass(i: int) -> torch.Tensor:
        return unet(noisy[i], timesteps[i].reshape(1), encoder_hidden_states=text).sample

    with torch.no_grad():
        check = unet_pass(len(noisy) - 1)  # warm-up; its output identifies the weights and inputs across envs
        sync()
        checksum = float(check.double().abs().sum())
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        baseline_rss = max_rss_mb()
        baseline_gpu = torch.cuda.memory_allocated(device) / 2**20 if cuda else None
        context, finish, retained = make_method(method, unet, spec, latent_hw)
        pass_times, pass_cpu = [], []
        sync()
        start, start_cpu = time.perf_counter(), time.process_time()
        with context():
            for i in range(steps):
                t0, c0 = time.perf_counter(), time.process_time()
                unet_pass(i)
                sync()
                pass_times.append(time.perf_counter() - t0)
                pass_cpu.append(time.process_time() - c0)
        retained_bytes = retained()
        reduce_start = time.perf_counter()
        concept_map = finish()
        sync()
        end, end_cpu = time.perf_counter(), time.process_time()
    result = {
        **{k: spec[k] for k in ("method", "steps", "layers_name") if k in spec},
        "seconds_per_image": end - start,
        "reduce_seconds": end - reduce_start,
        "cpu_seconds_per_image": end_cpu - start_cpu,
        "median_pass_seconds": statistics.median(pass_times),
        "median_pass_cpu_seconds": statistics.median(pass_cpu),
        "baseline_rss_mb": baseline_rss,
        "peak_rss_mb": max_rss_mb(),
        "retained_mb": retained_bytes / 2**20,
        "checksum": checksum,
        "torch": torch.__version__,
        "diffusers": __import__("diffusers").__version__,
    }
    if cuda:
        result["baseline_gpu_mb"] = baseline_gpu
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    if concept_map is not None:
        result["map"] = concept_map.detach().float().cpu().reshape(-1).tolist()
        result["map_shape"] = list(concept_map.shape)
    return result


if __name__ == "__main__":
    print(json.dumps(run(json.loads(Path(sys.argv[1]).read_text()))))
