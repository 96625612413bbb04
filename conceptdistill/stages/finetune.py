"""Stage "finetune": concept-distillation fine-tuning of the diffusion UNet (docs/METHOD.md, stage 2).

Each training sample gets one of two tasks by a seeded coin:
- object task: the ordinary epsilon-prediction loss over the whole latent, captioned with the foreground
  prompt (or the sample's own caption when training the shapes world model);
- background task: the background prompt, with the loss restricted to the background pixels of a random
  rectangle drawn from the preliminary mask M_pre. The UNet sees the whole noised latent; only the loss is
  masked. This teaches "a photo of a background" to mean "whatever this image has behind the object".

Adapters (config `finetune.adapter`): `lora` (peft LoRA on the UNet's attention projections, the default),
`full` (every UNet weight), `inpaint9` (LoRA plus a UNet input widened to noisy latent + mask + masked
latent, the new input weights zero-initialised). The same module in `full` mode from random weights, with
the text encoder trained too and no background task, trains the shapes world's own model (stage "world").
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch

from conceptdistill.diffusion.loading import register_parts
from conceptdistill.maskmath import rectangle_rules_for, sample_background_rectangle
from conceptdistill.stages.registry import TRAINING_HARDWARE, register_stage
from conceptdistill.utils.seeding import randn_per_sample, sample_generators, sample_seed

log = logging.getLogger(__name__)

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
ADAPTERS = ("lora", "full", "inpaint9")


def masked_mse(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the masked latent pixels of each sample, averaged over samples.

    `mask` is (B, 1, h, w) and broadcasts over channels; a sample with an empty mask contributes zero.
    """
    squared = (prediction.float() - target.float()) ** 2 * mask
    per_sample = squared.flatten(1).sum(1) / (mask.flatten(1).sum(1) * prediction.shape[1]).clamp(min=1)
    return per_sample.mean()


def widen_unet_input(unet, extra_channels: int) -> None:
    """Give the UNet `extra_channels` more input channels whose weights start at zero, so the widened
    model computes exactly what the original did until training moves them."""
    old = unet.conv_in
    new = torch.nn.Conv2d(
        old.in_channels + extra_channels, old.out_channels, old.kernel_size, old.stride, old.padding,
        device=old.weight.device, dtype=old.weight.dtype,
    )
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, : old.in_channels] = old.weight
        new.bias.copy_(old.bias)
    unet.conv_in = new
    unet.register_to_config(in_channels=new.in_channels)


class NonFiniteLossError(FloatingPointError):
    """A training loss became NaN or inf; raised with the step and the batch's sample ids."""


class ConceptDistillationFineTuner(pl.LightningModule):
    """Fine-tunes (or, in full mode from random weights, trains) the UNet of a `DiffusionParts` set."""

    def __init__(
        self,
        parts,
        *,
        adapter: str = "lora",
        lora_rank: int = 4,
        lora_alpha: float = 4.0,
        lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0"),
        learning_rate: float = 1e-4,
        weight_decay: float = 1e-2,
        warmup_steps: int = 0,
        background_probability: float = 0.5,
        foreground_prompt: str = "a photo of a thing",
        background_prompt: str = "a photo of a background",
        use_batch_captions: bool = False,
        caption_dropout: float = 0.0,
        train_text_encoder: bool = False,
        rectangle: dict | None = None,
        ema_decay: float | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if adapter not in ADAPTERS:
            raise ValueError(f"finetune.adapter={adapter!r}: choose one of {ADAPTERS}")
        self.save_hyperparameters(ignore=["parts"])
        self.parts = parts
        register_parts(self, parts)
        self.vae.requires_grad_(False)
        self.text_encoder.requires_grad_(train_text_encoder)
        self._configure_adapter()
        self.ema = None
        if ema_decay:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(self.unet.parameters(), decay=ema_decay)

    # ----- model surgery ------------------------------------------------------------------------
    def _configure_adapter(self) -> None:
        hp = self.hparams
        if hp.adapter == "full":
            self.unet.requires_grad_(True)
            return
        from peft import LoraConfig

        self.unet.requires_grad_(False)
        if hp.adapter == "inpaint9":
            latent_channels = self.unet.config.in_channels
            widen_unet_input(self.unet, latent_channels + 1)
        # LoRA's random init is seeded by the run seed (and leaves the caller's RNG stream alone).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hp.seed)
            self.unet.add_adapter(
                LoraConfig(r=hp.lora_rank, lora_alpha=hp.lora_alpha, init_lora_weights="gaussian",
                           target_modules=list(hp.lora_targets))
            )
        if hp.adapter == "inpaint9":
            self.unet.conv_in.requires_grad_(True)
        # Trainable weights stay fp32 under mixed precision, even when the frozen base is half precision.
        for parameter in self.unet.parameters():
            if parameter.requires_grad:
                parameter.data = parameter.data.float()

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        modules = [self.unet] + ([self.text_encoder] if self.hparams.train_text_encoder else [])
        return [p for module in modules for p in module.parameters() if p.requires_grad]

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = torch.optim.AdamW(self.trainable_parameters(), lr=hp.learning_rate, weight_decay=hp.weight_decay)
        if not hp.warmup_steps:
            return optimizer
        warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / hp.warmup_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": warmup, "interval": "step"}}

    # ----- the two tasks ------------------------------------------------------------------------
    def _sample_rng(self, sample_id: str) -> np.random.Generator:
        # Seeded by (run seed, step, sample): reproducible, and exact after resuming from a checkpoint.
        return np.random.default_rng(sample_seed(self.hparams.seed, f"{sample_id}@{self.global_step}", "finetune"))

    def plan_batch(self, batch: dict, latent_size: tuple[int, int]) -> tuple[list[str], torch.Tensor]:
        """Per sample: the caption and the loss mask (B, 1, h, w) on the batch's latent grid `latent_size` =
        (h, w), which is also what a 9-channel UNet is told to repaint (all ones for the object task: the
        whole image is generated). Background rectangles follow the paper's rules scaled to that grid unless
        `rectangle` fixes them."""
        hp = self.hparams
        ids = batch["id"]
        h, w = latent_size
        rules = hp.rectangle or rectangle_rules_for(min(h, w))
        loss_masks = np.ones((len(ids), 1, h, w), dtype=np.float32)
        captions: list[str] = []
        prelim = batch.get("prelim_mask")
        for i, sample_id in enumerate(ids):
            rng = self._sample_rng(sample_id)
            background_task = prelim is not None and rng.random() < hp.background_probability
            if background_task:
                background = ~prelim[i].cpu().numpy().astype(bool)
                loss_masks[i, 0] = sample_background_rectangle(background, rng, **rules)[0]
                captions.append(hp.background_prompt)
            else:
                caption = batch["caption"][i] if hp.use_batch_captions else hp.foreground_prompt
                if hp.caption_dropout and rng.random() < hp.caption_dropout:
                    caption = ""
                captions.append(caption)
        return captions, torch.from_numpy(loss_masks).to(self.device)

    def training_step(self, batch: dict, batch_index: int) -> torch.Tensor:
        ids = batch["id"]
        with torch.no_grad():
            latents = self.parts.encode_images(batch["image"])
        captions, loss_mask = self.plan_batch(batch, tuple(latents.shape[-2:]))
        generators = sample_generators(self.hparams.seed, [f"{i}@{self.global_step}" for i in ids], "finetune-noise")
        noise = randn_per_sample(generators, tuple(latents.shape[1:]), device=self.device, dtype=latents.dtype)
        steps = self.parts.scheduler.config.num_train_timesteps
        timesteps = torch.tensor(
            [int(torch.randint(0, steps, (1,), generator=g)) for g in generators], device=self.device
        )
        noisy = self.parts.add_noise(latents, noise, timesteps)  # the VP forward process, any scheduler class
        text = self.parts.encode_prompts(captions, grad=self.hparams.train_text_encoder)
        if self.parts.unet_in_channels > latents.shape[1]:
            # 9-channel input: what to repaint (the loss region) and the latent with that region blanked.
            noisy = torch.cat([noisy, loss_mask, latents * (1 - loss_mask)], dim=1)
        prediction = self.unet(noisy, timesteps, encoder_hidden_states=text).sample
        target = self.parts.training_target(latents, noise, timesteps)  # epsilon or v, as the model predicts
        loss = masked_mse(prediction, target, loss_mask)
        if not torch.isfinite(loss):
            # Stop before the optimizer spreads NaN into every weight; the last checkpoint stays as it was.
            raise NonFiniteLossError(
                f"fine-tuning loss is {float(loss)} at step {self.global_step} for the batch {list(ids)}: stopping "
                "(the last good checkpoint is kept; check those images, the learning rate, or the precision)"
            )
        self._log_task_losses(prediction, target, loss_mask, captions, len(ids))
        self.log("train/loss", loss, prog_bar=True, batch_size=len(ids))
        return loss

    def _log_task_losses(self, prediction, noise, loss_mask, captions, batch_size) -> None:
        is_background = torch.tensor([c == self.hparams.background_prompt for c in captions], device=self.device)
        with torch.no_grad():
            for name, selected in (("object", ~is_background), ("background", is_background)):
                if selected.any():
                    value = masked_mse(prediction[selected], noise[selected], loss_mask[selected])
                    self.log(f"train/loss_{name}", value, batch_size=int(selected.sum()))

    def on_fit_start(self) -> None:
        if self.ema is not None:
            self.ema.to(self.device)  # the shadow weights live where the weights train

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        # Here rather than in on_train_batch_end: Lightning runs callbacks' on_train_batch_end (ModelCheckpoint's
        # save) before the module's, so a checkpoint would miss this step's EMA update; and with gradient
        # accumulation the EMA follows optimizer steps, not micro-batches.
        if self.ema is not None:
            self.ema.step(self.unet.parameters())

    # EMA weights are not parameters; carry them in the Lightning checkpoint so a resume is exact.
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.ema is not None:
            checkpoint["ema"] = self.ema.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.ema is not None and "ema" in checkpoint:
            self.ema.load_state_dict(checkpoint["ema"])

    def apply_ema(self) -> None:
        if self.ema is not None:
            self.ema.copy_to(self.unet.parameters())


# ----- saving and loading what was trained ------------------------------------------------------
def save_finetuned(module: ConceptDistillationFineTuner, folder: str | Path) -> Path:
    """Write the fine-tuned weights: a LoRA file in the diffusers format (`lora`), or a whole UNet folder
    (`full`; `inpaint9` merges its LoRA into the widened UNet so the folder stands alone)."""
    folder = Path(folder)
    adapter = module.hparams.adapter
    unet = module.unet
    # Never export weights a NaN/inf has reached (that run is not done; its checkpoints stay for inspection).
    broken = [name for name, p in unet.named_parameters() if not torch.isfinite(p).all()]
    if broken:
        raise NonFiniteLossError(f"{len(broken)} fine-tuned weight tensor(s) hold NaN or inf (e.g. {broken[0]}); "
                                 "not saving them")
    folder.mkdir(parents=True, exist_ok=True)
    if adapter == "lora":
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
        # The adapter's config (rank, lora_alpha, targets) travels as safetensors metadata: without it loaders
        # assume lora_alpha == rank and a model trained with lora_alpha != lora_rank comes back scaled wrongly.
        metadata = unet.peft_config["default"].to_dict()
        StableDiffusionPipeline.save_lora_weights(
            folder, unet_lora_layers=layers, safe_serialization=True, unet_lora_adapter_metadata=metadata
        )
        return folder / LORA_WEIGHTS
    if adapter == "inpaint9":
        unet.fuse_lora() if hasattr(unet, "fuse_lora") else None
        unet.unload_lora() if hasattr(unet, "unload_lora") else None
    unet.save_pretrained(folder / "unet", safe_serialization=True)
    return folder / "unet"


def load_finetuned(parts, folder: str | Path):
    """Apply what `save_finetuned` wrote to a freshly loaded `DiffusionParts` set (in place)."""
    folder = Path(folder)
    if (folder / LORA_WEIGHTS).exists():
        parts.unet.load_lora_adapter(str(folder), weight_name=LORA_WEIGHTS, prefix="unet", adapter_name="concept")
        parts.unet.fuse_lora()
    elif (folder / "unet" / "config.json").exists():
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=parts.dtype)
        parts.unet = unet.to(parts.device).eval()
    else:
        raise FileNotFoundError(
            f"no fine-tuned weights in {folder}: expected {LORA_WEIGHTS} or unet/. Run the finetune stage first "
            "(stages=[finetune]) or point the run at a run folder where it finished."
        )
    return parts


# ----- the stage --------------------------------------------------------------------------------
class SampleImagesCallback(pl.Callback):
    """Every `every` steps: object-prompt samples and background-prompt inpaintings of a few training
    images (their M_pre repainted), saved under the stage folder and sent to the logger as image panels."""

    def __init__(self, folder: Path, examples: dict, *, every: int, steps: int, seed: int) -> None:
        self.folder, self.examples, self.every, self.steps, self.seed = Path(folder), examples, every, steps, seed

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_index) -> None:
        step = trainer.global_step
        if self.every and step % self.every == 0 and trainer.is_global_zero:
            self.render(trainer, module, step)

    def on_train_end(self, trainer, module) -> None:
        if trainer.is_global_zero:
            self.render(trainer, module, trainer.global_step)

    @torch.no_grad()
    def render(self, trainer, module, step: int) -> Path:
        from conceptdistill.diffusion.sampling import inpaint_latents, sample_latents
        from conceptdistill.figures import save_grid

        parts, hp = module.parts, module.hparams
        ids = [f"sample-{i}" for i in range(len(self.examples["id"]))]
        was_training = module.training
        module.eval()
        images = self.examples["image"].to(parts.device)
        generated = parts.decode_latents(sample_latents(
            parts, [hp.foreground_prompt] * len(ids), sample_generators(self.seed, ids, "finetune-samples"),
            steps=self.steps, latent_shape=parts.latent_shape_for(images.shape[-1])))
        unknown = self.examples["prelim_mask"].to(parts.device, parts.dtype)[:, None]
        backgrounds = parts.decode_latents(inpaint_latents(
            parts, parts.encode_images(images), unknown, [hp.background_prompt] * len(ids),
            sample_generators(self.seed, ids, "finetune-inpaint"), steps=self.steps))
        module.train(was_training)
        path = save_grid(self.folder / f"step_{step:06d}.png", {
            "object prompt": list(generated.float().cpu().numpy()),
            "image": list(images.float().cpu().numpy()),
            "M_pre": list(self.examples["prelim_mask"].numpy()),
            "background prompt": list(backgrounds.float().cpu().numpy()),
        })
        logger = trainer.logger
        if logger is not None and hasattr(logger, "log_image"):
            logger.log_image(key="train/samples", images=[str(path)], step=step)
        return path


class LossHistory(pl.Callback):
    """Keeps (step, loss) pairs so the stage can record its loss curve."""

    def __init__(self) -> None:
        self.history: list[tuple[int, float]] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_index) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.history.append((trainer.global_step, float(loss)))

    # Carried in the checkpoint, so a resumed run's curve covers the steps before the interruption too.
    def state_dict(self) -> dict:
        return {"history": list(self.history)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = [tuple(pair) for pair in state_dict.get("history", [])]


def loss_curve_summary(history: list[tuple[int, float]]) -> dict:
    """Mean loss over the first and the last tenth of training: the curve should go down."""
    if not history:
        return {}
    losses = np.array([loss for _, loss in history])
    tenth = max(1, len(losses) // 10)
    return {"loss_first_tenth": float(losses[:tenth].mean()), "loss_last_tenth": float(losses[-tenth:].mean())}


@register_stage(
    "finetune", inputs=("masks",), uses_model=True,
    settings=("seed", "prompts", "model", "data", "finetune", *TRAINING_HARDWARE),
)
def run_finetune(ctx) -> dict:
    from pytorch_lightning.callbacks import ModelCheckpoint

    from conceptdistill.data.base import collate_samples
    from conceptdistill.data.stream import checkpoint_step, step_loader
    from conceptdistill.stages.artifacts import WithArtifacts
    from conceptdistill.stages.masks import mask_store
    from conceptdistill.utils.io import write_json

    cfg, ft = ctx.cfg, ctx.cfg.finetune
    folder = ctx.stage_dir("finetune")
    parts = ctx.load_parts()
    rectangle = dict(ft.rectangle) if ft.get("rectangle") else None  # None: the paper's rules for the latent grid
    module = ConceptDistillationFineTuner(
        parts, adapter=ft.adapter, lora_rank=ft.lora_rank, lora_alpha=ft.lora_alpha, lora_targets=tuple(ft.lora_targets),
        learning_rate=ft.learning_rate, weight_decay=ft.weight_decay, warmup_steps=ft.warmup_steps,
        background_probability=ft.background_probability, foreground_prompt=cfg.prompts.foreground,
        background_prompt=cfg.prompts.background, rectangle=rectangle, seed=cfg.seed,
    )
    pl.seed_everything(cfg.seed, workers=True)  # the data order too, so a rerun trains the same model
    dataset = WithArtifacts(ctx.datamodule.dataset("train"), {"prelim_mask": (mask_store(ctx, "train"), "mask")})
    examples = collate_samples([dataset[i] for i in range(min(ft.sample_count, len(dataset)))])
    history = LossHistory()
    callbacks = [
        ModelCheckpoint(dirpath=folder / "checkpoints", save_last=True, every_n_train_steps=ft.checkpoint_every),
        SampleImagesCallback(folder / "samples", examples, every=ft.sample_every, steps=ft.sample_steps, seed=cfg.seed),
        history,
    ]
    trainer = ctx.trainer("finetune", max_steps=ft.max_steps, gradient_clip_val=ft.gradient_clip_val,
                          callbacks=callbacks, log_every_n_steps=10)
    last = folder / "checkpoints" / "last.ckpt"
    resume = last if last.exists() else None
    # batches and augmentations follow the step, so a resumed run trains on what an uninterrupted one would
    loader = step_loader(ctx.datamodule, dataset, batch_size=ft.batch_size, seed=cfg.seed, salt="finetune",
                         start_step=checkpoint_step(resume), trainer=trainer)
    trainer.fit(module, loader, ckpt_path=str(resume) if resume else None)
    weights = save_finetuned(module, folder / "weights")
    write_json(folder / "loss.json", {"step_loss": history.history})
    return {"adapter": ft.adapter, "steps": int(trainer.global_step), "weights": str(weights.relative_to(ctx.run_dir)),
            "trainable_parameters": sum(p.numel() for p in module.trainable_parameters()),
            **loss_curve_summary(history.history)}
