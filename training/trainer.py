"""The training loop: Real-ESRGAN degradation on the device, online negative prompting,
2·MSE + 5·LPIPS + 0.5·GAN for the generator (the paper's weights; L1 and an estimator term are
there for training from scratch), the multilevel-sigmoid loss for the discriminator heads, AdamW,
gradient clipping — on Hugging Face accelerate (multi-GPU, mixed precision, gradient accumulation).
"""
from __future__ import annotations

import csv
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import GradientAccumulationPlugin, set_seed
from tqdm.auto import tqdm

from s3diff_serve.evaluation.metrics import LPIPS
from s3diff_serve.model.degradation_estimator import BLUR_INDEX, NOISE_INDEX
from s3diff_serve.model.output_size import pre_resize

from .checkpointing import checkpoint_dir, latest_checkpoint, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .data import build_dataloader
from .degradations import RealESRGANDegradation
from .discriminator import DinoDiscriminator
from .model_setup import build_trainable_model, optimized_parameters, resolve_base_files, resolve_pre_resize, set_train_mode


@dataclass
class StepLosses:
    total: float
    mse: float
    l1: float
    lpips: float
    estimator: float
    gan_generator: float
    discriminator: float
    negatives: int


def draw_negatives(count: int, probability: float, generator: torch.Generator) -> torch.Tensor:
    """(count,) bool: which samples become negative-prompt samples this step."""
    return torch.rand(count, generator=generator) < probability


def negative_prompting(
    negatives: torch.Tensor, highres: torch.Tensor, lowres_upscaled: torch.Tensor,
    positive_embeds: torch.Tensor, negative_embeds: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Online negative prompting (paper Sec. 3.3): drawn samples get the LR input as target and
    the negative-prompt embedding as conditioning, so the negative prompt learns to mean
    "degraded". Returns (target images, encoder hidden states)."""
    negatives = negatives.to(highres.device)
    target = torch.where(negatives[:, None, None, None], lowres_upscaled, highres)
    batch = highres.shape[0]
    states = torch.where(
        negatives[:, None, None], negative_embeds.expand(batch, -1, -1), positive_embeds.expand(batch, -1, -1),
    )
    return target, states


def drop_rows_after(log_path: Path, step: int) -> None:
    """Remove logged rows past `step` (written after the checkpoint a run resumes from)."""
    if not log_path.is_file():
        return
    lines = log_path.read_text().splitlines(keepends=True)
    kept = lines[:1] + [line for line in lines[1:] if int(line.split(",", 1)[0]) <= step]
    if len(kept) != len(lines):
        log_path.write_text("".join(kept))


class Trainer:
    def __init__(self, config: TrainConfig):
        self.config = config
        # sync_with_dataloader=False: our loader is endless, an epoch end must not force a step.
        accumulation = GradientAccumulationPlugin(num_steps=config.grad_accum_steps, sync_with_dataloader=False)
        self.accelerator = Accelerator(mixed_precision=config.mixed_precision, gradient_accumulation_plugin=accumulation)
        set_seed(config.seed)
        # Loss networks first: a missing weight file should stop the run before anything is written
        # or the big model loads.
        self.lpips = LPIPS("vgg", pretrained=not config.losses.random_weights)
        discriminator = DinoDiscriminator(config.discriminator) if config.discriminator else None
        self.output_dir = Path(config.output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with self.accelerator.main_process_first():
            self.files = resolve_base_files(config.model, self.output_dir, config.seed)
        model = build_trainable_model(self.files, config.model, config.seed)
        self.pre_resize = resolve_pre_resize(config.model)  # saved into every merged config
        optim = config.optim
        self.parameters = optimized_parameters(model, config.model)
        unet_ids = {id(p) for p in model.unet.parameters()}
        groups = [{"params": [p for p in self.parameters if id(p) not in unet_ids], "lr": optim.lr},
                  {"params": [p for p in self.parameters if id(p) in unet_ids], "lr": optim.lr * optim.unet_lr_scale}]
        optimizer = torch.optim.AdamW(groups, lr=optim.lr, betas=optim.betas, weight_decay=optim.weight_decay)
        resume_state = self._resume(model, discriminator)
        self.step = int(resume_state["step"]) if resume_state else 0
        loader = build_dataloader(config.data, config.batch_size, config.seed + self.step)
        self.model, self.optimizer, self.loader = self.accelerator.prepare(model, optimizer, loader)
        self.discriminator = self.disc_optimizer = None
        if discriminator is not None:
            disc_optimizer = torch.optim.AdamW(
                discriminator.heads.parameters(), lr=config.discriminator.lr, betas=optim.betas, weight_decay=optim.weight_decay,
            )
            self.discriminator, self.disc_optimizer = self.accelerator.prepare(discriminator, disc_optimizer)
        if resume_state:
            # After prepare: torch moves optimizer state to where the parameters now live.
            self.optimizer.load_state_dict(resume_state["optimizer"])
            if self.disc_optimizer is not None:
                self.disc_optimizer.load_state_dict(resume_state["disc_optimizer"])
        self.lpips.to(self.accelerator.device)
        self.degrade = RealESRGANDegradation(config.degradation)

    # --- state ------------------------------------------------------------------------------
    def _resume(self, model, discriminator) -> dict | None:
        """Trained tensors and discriminator heads from `resume_from` ("latest": the newest complete
        checkpoint under output_dir, or a fresh start if there is none); returns the saved state."""
        folder = self.config.resume_from
        if folder is None:
            return None
        if folder.name == "latest":
            folder = latest_checkpoint(self.output_dir)
            if folder is None:
                return None
        state = load_checkpoint(Path(folder), model)
        if discriminator is not None:
            discriminator.heads.load_state_dict(state["disc_heads"])
        return state

    @property
    def raw_model(self):
        return self.accelerator.unwrap_model(self.model)

    @property
    def raw_discriminator(self) -> DinoDiscriminator:
        return self.accelerator.unwrap_model(self.discriminator)

    def save(self) -> Path:
        folder = checkpoint_dir(self.output_dir, self.step)
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            state = {"step": self.step, "optimizer": self.optimizer.state_dict()}
            if self.discriminator is not None:
                state["disc_optimizer"] = self.disc_optimizer.state_dict()
                state["disc_heads"] = self.raw_discriminator.heads.state_dict()
            save_checkpoint(folder, self.raw_model, self.files, state, self.config.merged_dtype, self.pre_resize)
        self.accelerator.wait_for_everyone()
        return folder

    def step_generator(self) -> torch.Generator:
        """Degradation/negative draws seeded by (seed, process, step): reproducible and resumable."""
        key = (self.config.seed * 1_000_003 + self.accelerator.process_index) * 1_000_003 + self.step
        return torch.Generator().manual_seed(key)

    # --- one step ---------------------------------------------------------------------------
    def generator_prediction(self, highres: torch.Tensor, generator: torch.Generator):
        """Degrade, draw negatives, run the model: (prediction, target, negatives, estimator loss);
        images in [-1,1], the prediction colour-fixed against the input as configured."""
        batch = self.degrade(highres, generator)
        negatives = draw_negatives(highres.shape[0], self.config.negative_prompt_probability, generator).to(highres.device)
        raw = self.raw_model
        upscaled = pre_resize(batch.lowres, self.pre_resize)
        target, states = negative_prompting(negatives, batch.highres, upscaled, raw.positive_embeds, raw.negative_embeds)
        estimator_loss = highres.new_zeros(())
        with torch.set_grad_enabled(self.config.losses.estimator_weight > 0):
            estimated = raw.estimate(batch.lowres)  # the estimator reads the LR before upscaling
        if self.config.losses.estimator_weight > 0:
            applied = torch.empty_like(estimated)
            applied[:, BLUR_INDEX], applied[:, NOISE_INDEX] = batch.blur_score, batch.noise_score
            estimator_loss = F.mse_loss(estimated, applied)
        if self.config.scores_from == "applied":
            blur, noise = batch.blur_score, batch.noise_score
        else:
            blur, noise = estimated[:, BLUR_INDEX].detach(), estimated[:, NOISE_INDEX].detach()
        prediction = self.model(batch.lowres, blur, noise, states, pre_resize=self.pre_resize,
                                color_fix=self.config.losses.color_fix).float()
        return prediction * 2 - 1, target * 2 - 1, negatives, estimator_loss

    def reconstruction_loss(self, prediction: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(MSE, L1, LPIPS); LPIPS is skipped when its weight is 0."""
        target = target.float()
        lpips = self.lpips(prediction, target).mean() if self.config.losses.lpips_weight > 0 else prediction.new_zeros(())
        return F.mse_loss(prediction, target), F.l1_loss(prediction, target), lpips

    def generator_gan_loss(self, prediction: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
        """Adversarial loss on positive-prompt outputs only; the heads get no gradient from it."""
        positives = prediction[~negatives]
        if positives.shape[0] == 0 or self.discriminator is None or self.config.losses.gan_weight == 0:
            return prediction.new_zeros(())
        disc = self.raw_discriminator
        disc.heads.requires_grad_(False)
        try:
            with self.accelerator.autocast():
                return disc.loss(disc(positives), real=True).mean()
        finally:
            disc.heads.requires_grad_(True)

    def discriminator_loss(self, highres: torch.Tensor, prediction: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
        """Real: every HR crop; fake: the positive-prompt outputs. One forward per step (DDP)."""
        real = highres * 2 - 1
        fake = prediction.detach()[~negatives]
        logits = self.discriminator(torch.cat([real, fake]))
        count = real.shape[0]
        real_loss = self.raw_discriminator.loss([level[:count] for level in logits], real=True).mean()
        fake_loss = self.raw_discriminator.loss([level[count:] for level in logits], real=False).sum() / max(fake.shape[0], 1)
        return real_loss + fake_loss

    def training_step(self, highres: torch.Tensor) -> StepLosses:
        losses, accelerator = self.config.losses, self.accelerator
        generator = self.step_generator()
        optim = self.config.optim
        lr = optim.lr * optim.lr_factor(self.step, self.config.max_steps)
        self.optimizer.param_groups[0]["lr"] = lr
        self.optimizer.param_groups[1]["lr"] = 0.0 if self.step < optim.unet_start_step else lr * optim.unet_lr_scale
        with accelerator.accumulate(*[m for m in (self.model, self.discriminator) if m is not None]):
            prediction, target, negatives, estimator = self.generator_prediction(highres, generator)
            mse, l1, lpips = self.reconstruction_loss(prediction, target)
            gan = self.generator_gan_loss(prediction, negatives)
            total = (losses.mse_weight * mse + losses.l1_weight * l1 + losses.lpips_weight * lpips
                     + losses.gan_weight * gan + losses.estimator_weight * estimator)
            accelerator.backward(total)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(self.parameters, self.config.optim.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

            disc_loss = torch.zeros((), device=highres.device)
            if self.discriminator is not None and losses.gan_weight > 0:
                disc_loss = losses.gan_weight * self.discriminator_loss(highres, prediction, negatives)
                accelerator.backward(disc_loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(self.raw_discriminator.heads.parameters(), self.config.optim.grad_clip)
                self.disc_optimizer.step()
                self.disc_optimizer.zero_grad(set_to_none=True)
        return StepLosses(
            total=total.item(), mse=mse.item(), l1=l1.item(), lpips=lpips.item(), estimator=estimator.item(),
            gan_generator=gan.item(),
            discriminator=disc_loss.item(), negatives=int(negatives.sum()),
        )

    @torch.no_grad()
    def evaluate(self, highres: torch.Tensor, seed: int = 0) -> float:
        """Weighted MSE + LPIPS on a fixed degradation of `highres` with the positive prompt: a
        noise-free number to compare across training (the per-step loss varies with the draws)."""
        generator = torch.Generator().manual_seed(seed)
        batch = self.degrade(highres.to(self.accelerator.device), generator)
        raw = self.raw_model
        raw.eval()
        try:
            scores = raw.estimate(batch.lowres)
            prediction = raw(batch.lowres, scores[:, BLUR_INDEX], scores[:, NOISE_INDEX], pre_resize=self.pre_resize,
                             color_fix=self.config.losses.color_fix).float()
            mse, l1, lpips = self.reconstruction_loss(prediction * 2 - 1, batch.highres * 2 - 1)
        finally:
            set_train_mode(raw, self.config.model)
        losses = self.config.losses
        return float(losses.mse_weight * mse + losses.l1_weight * l1 + losses.lpips_weight * lpips)

    # --- loop -------------------------------------------------------------------------------
    def batches(self) -> Iterator[torch.Tensor]:
        while True:
            yield from self.loader

    def run(self) -> Path | None:
        """Train to `max_steps` optimizer steps; returns the last checkpoint folder."""
        cfg, accelerator = self.config, self.accelerator
        set_train_mode(self.raw_model, cfg.model)
        if self.discriminator is not None:
            self.discriminator.train()
        log_path = self.output_dir / "train_log.csv"
        fields = ["step", *StepLosses.__dataclass_fields__]
        log_file = None
        if accelerator.is_main_process:
            drop_rows_after(log_path, self.step)  # a resumed run logs those steps again
            is_new = not log_path.is_file()
            log_file = open(log_path, "a", newline="")
            writer = csv.DictWriter(log_file, fieldnames=fields)
            if is_new:
                writer.writeheader()
        progress = tqdm(total=cfg.max_steps, initial=self.step, disable=not accelerator.is_main_process, desc="train")
        last_saved = None
        try:
            for highres in self.batches():
                if self.step >= cfg.max_steps:
                    break
                result = self.training_step(highres)
                if not accelerator.sync_gradients:
                    continue  # still accumulating: not an optimizer step yet
                self.step += 1
                progress.update(1)
                progress.set_postfix(loss=f"{result.total:.4f}")
                if log_file is not None and (self.step % cfg.log_every == 0 or self.step == cfg.max_steps):
                    writer.writerow({"step": self.step, **asdict(result)})
                    log_file.flush()
                if self.step % cfg.checkpoint_every == 0 or self.step == cfg.max_steps:
                    last_saved = self.save()
        finally:
            progress.close()
            if log_file is not None:
                log_file.close()
        return last_saved
