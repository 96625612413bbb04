"""Training speed of the `world` stage: steps per second of its own training loop, recorded in world_speed.json.

Runs the stage's training function (`conceptdistill.stages.world._train`: the world config's model, trainer
module, step-indexed data stream, checkpoint callback and Lightning trainer) for `--steps` steps from random
weights, and times the steps after `--warmup` (the first steps pay for CUDA's start-up, kernel selection and
the first batches). Images are rendered before the clock starts, as the stage renders them before training.

    python experiments/shapes/world_speed.py --device cpu --batch-size 256 --steps 20
    python experiments/shapes/world_speed.py --device cuda --batch-size 256 --steps 200 data.num_workers=4
    python experiments/shapes/world_speed.py --device cpu --batch-size 32 --steps 30 --profile   # where time goes

Extra arguments are Hydra overrides of the run's config (e.g. `world.module.ema_decay=null`). `--device cuda`
uses `trainer=gpu` (bf16 mixed precision, as the committed model was trained); `--device cpu` `trainer=cpu`.
Each run appends one record (the command, date, machine and its load, settings, steps/s and the loss of the last
step) to world_speed.json, unless `--no-record`. The loss is a check that a faster version trains the same
model: at the same settings it must not change. To compare with an older version, run this script beside
that version's package (`git archive <commit> conceptdistill conf | tar -x -C <folder>`, the script copied
into `<folder>/experiments/shapes/`, and `--record` pointing here): it imports the package beside it.

On a CPU a step at batch 256 is ~25 s of UNet work, so what this measures there is mostly the model; on a GPU
the model's share is small and the loop's per-step overheads (data, per-sample draws, the EMA, logging)
decide the rate. `--steps 200` on a GPU takes well under a minute.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import io
import json
import os
import platform
import pstats
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(REPO))  # the package of this checkout, whatever else is installed

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402

RECORD = HERE / "world_speed.json"


class StepClock(pl.Callback):
    """The wall time of the steps after `warmup`: the clock starts when step `warmup` ends and stops when the
    last step ends (before the final checkpoint is written), each time after waiting for the device, so
    asynchronous GPU work is counted in full."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.started, self.stopped, self.steps = warmup, None, None, 0

    @staticmethod
    def _sync(module) -> None:
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_index) -> None:
        step = trainer.global_step
        if step == self.warmup or step == trainer.max_steps:
            self._sync(module)
            now = time.perf_counter()
            if step == self.warmup:
                self.started = now
            else:
                self.stopped, self.steps = now, step - self.warmup

    @property
    def steps_per_second(self) -> float:
        if self.started is None or self.steps <= 0:
            raise RuntimeError(f"too few steps to time: ran {self.steps + self.warmup}, warm-up {self.warmup}")
        return self.steps / (self.stopped - self.started)


def compose_config(args: argparse.Namespace, run_dir: Path):
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    overrides = [
        "stages=[world]", f"trainer={'gpu' if args.device == 'cuda' else 'cpu'}", "logger=csv",
        f"world.batch_size={args.batch_size}", f"world.max_steps={args.steps}", f"world.num_images={args.num_images}",
        *args.overrides,
    ]
    with initialize_config_dir(config_dir=str(REPO / "conceptdistill" / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    with open_dict(cfg):
        cfg.run_dir = str(run_dir)
    return cfg, overrides


def measure(args: argparse.Namespace) -> dict:
    from conceptdistill.pipeline.context import RunContext
    from conceptdistill.runner import _configure_torch
    from conceptdistill.stages.world import _train
    from conceptdistill.utils.console import quiet_dependencies
    from conceptdistill.world.model import build_world_parts

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch")
    _configure_torch()  # as a run does: every core (or OMP_NUM_THREADS), "high" float32 matmul precision
    quiet_dependencies()
    clock = StepClock(args.warmup)

    class TimedContext(RunContext):
        def trainer(self, stage, **overrides):
            overrides["callbacks"] = [*overrides.get("callbacks", []), clock]
            overrides.setdefault("enable_progress_bar", not args.profile)
            return super().trainer(stage, **overrides)

    with tempfile.TemporaryDirectory(prefix="world-speed-") as folder:
        cfg, overrides = compose_config(args, Path(folder) / "run")
        ctx = TimedContext(cfg)
        world, arch = ctx.datamodule.world, cfg.world.architecture
        parts = build_world_parts(
            Path(folder) / "build", shapes=list(world.shapes), colours=list(world.colours), image_size=world.image_size,
            block_out_channels=tuple(arch.block_out_channels), layers_per_block=arch.layers_per_block,
            attention_heads=arch.attention_heads, text_dim=arch.text_dim, text_layers=arch.text_layers, seed=cfg.seed,
        )

        profiler = cProfile.Profile() if args.profile else None
        if profiler:
            profiler.enable()
        record = _train(ctx, parts, Path(folder) / "world")
        if profiler:
            profiler.disable()
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats(args.sort).print_stats(args.profile_lines)
            print(text.getvalue())
    return {
        "steps_per_second": round(clock.steps_per_second, 3),
        "seconds_per_step": round(1.0 / clock.steps_per_second, 5),
        "timed_steps": clock.steps,
        "final_loss": record["final_loss"],
        "overrides": overrides,
    }


def machine(device: str) -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "cpus": len(os.sched_getaffinity(0)),
            # other processes on the machine slow a CPU measurement: their load is kept with it
            "load_average_1min": round(os.getloadavg()[0], 2)}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=REPO).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20, help="training steps in all, warm-up included")
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the timing")
    parser.add_argument("--num-images", type=int, default=4096, help="captioned training images (rendered first)")
    parser.add_argument("--label", default="", help="a note kept with the record, e.g. the code version")
    parser.add_argument("--record", type=Path, default=RECORD, help="the JSON file the record is appended to")
    parser.add_argument("--no-record", action="store_true", help="print only")
    parser.add_argument("--profile", action="store_true", help="print cProfile's table of the training loop")
    parser.add_argument("--sort", default="tottime", help="cProfile sort key (tottime, cumulative)")
    parser.add_argument("--profile-lines", type=int, default=30)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. data.num_workers=4")
    args = parser.parse_args(argv)
    if args.steps <= args.warmup:
        parser.error("--steps must exceed --warmup")
    result = measure(args)
    record = {
        "label": args.label,
        "command": shlex.join(["python", "experiments/shapes/world_speed.py", *(sys.argv[1:] if argv is None else argv)]),
        "date": datetime.date.today().isoformat(),
        "git_commit": git_commit(),
        "device": args.device,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "warmup": args.warmup,
        "profiled": args.profile,
        **result,
        "machine": machine(args.device),
    }
    print(f"{record['steps_per_second']:.2f} steps/s ({1000 * record['seconds_per_step']:.1f} ms per step) over "
          f"{record['timed_steps']} steps at batch {args.batch_size} on {args.device}")
    if not args.no_record:
        records = json.loads(args.record.read_text()) if args.record.exists() else []
        args.record.write_text(json.dumps([*records, record], indent=2) + "\n")
    return record


if __name__ == "__main__":
    main()
