"""The training loop (MODEL.md, "Training"): Real-ESRGAN degradation on the device, online
negative prompting, 2·MSE + 5·LPIPS + 0.5·GAN for the generator, the multilevel-sigmoid loss for the
discriminator heads, AdamW, gradient clipping — on Hugging Face accelerate (multi-GPU, mixed
precision, gradient accumulation).
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

from s3diff_serve.model.degradation_estimator import BLUR_INDEX, NOISE_INDEX

from .checkpointing import checkpoint_dir, latest_checkpoint, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .data import build_dataloader
from .degradations import RealESRGANDegradation
from .discriminator import DinoDiscriminator
from .lpips import LPIPS
from .model_setup import build_trainable_model, resolve_base_files, set_train_mode


@dataclass
class StepLosses:
    total: float
    mse: float
    lpips: float
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


class Trainer:
    def __init__(self, config: TrainConfig):
        self.config = config
        # sync_with_dataloader=False: our loader is endless, an epoch end must not force a step.
        accumulation = GradientAccumulationPlugin(num_steps=config.grad_accum_steps, sync_with_dataloader=False)
        self.accelerator = Accelerator(mixed_precision=config.mixed_precision, gradient_accumulation_plugin=accumulation)
        set_seed(config.seed)
        self.output_dir = Path(config.output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with self.accelerator.main_process_first():
            self.files = resolve_base_files(config.model, self.output_dir, config.seed)
        # Loss networks first: a missing weight file should stop the run before the big model loads.
        losses = config.losses
        self.lpips = LPIPS(losses.vgg16_path, losses.lpips_heads_path, losses.random_weights)
        discriminator = DinoDiscriminator(config.discriminator)
        model = build_trainable_model(self.files, config.model)
        optim = config.optim
        optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=optim.lr, betas=optim.betas, weight_decay=optim.weight_decay)
        disc_optimizer = torch.optim.AdamW(
            discriminator.heads.parameters(), lr=config.discriminator.lr, betas=optim.betas, weight_decay=optim.weight_decay,
        )
        resume_state = self._resume(model, discriminator)
        self.step = int(resume_state["step"]) if resume_state else 0
        loader = build_dataloader(config.data, config.batch_size, config.seed + self.step)
        self.model, self.discriminator, self.optimizer, self.disc_optimizer, self.loader = self.accelerator.prepare(
            model, discriminator, optimizer, disc_optimizer, loader,
        )
        if resume_state:
            # After prepare: torch moves optimizer state to where the parameters now live.
            self.optimizer.load_state_dict(resume_state["optimizer"])
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
            state = {
                "step": self.step,
                "optimizer": self.optimizer.state_dict(),
                "disc_optimizer": self.disc_optimizer.state_dict(),
                "disc_heads": self.raw_discriminator.heads.state_dict(),
            }
            save_checkpoint(folder, self.raw_model, self.files, state, self.config.merged_dtype)
        self.accelerator.wait_for_everyone()
        return folder

    def step_generator(self) -> torch.Generator:
        """Degradation/negative draws seeded by (seed, process, step): reproducible and resumable."""
        key = (self.config.seed * 1_000_003 + self.accelerator.process_index) * 1_000_003 + self.step
        return torch.Generator().manual_seed(key)

    # --- one step ---------------------------------------------------------------------------
    def generator_prediction(self, highres: torch.Tensor, generator: torch.Generator):
        """Degrade, draw negatives, run the model: (prediction, target, negatives), in [-1,1]."""
        batch = self.degrade(highres, generator)
        negatives = draw_negatives(highres.shape[0], self.config.negative_prompt_probability, generator).to(highres.device)
        raw = self.raw_model
        target, states = negative_prompting(negatives, batch.highres, batch.lowres_upscaled, raw.positive_embeds, raw.negative_embeds)
        with torch.no_grad():
            scores = raw.estimate(batch.lowres)  # the estimator reads the LR before upscaling
        prediction = self.model(batch.lowres_upscaled * 2 - 1, scores[:, BLUR_INDEX], scores[:, NOISE_INDEX], states)
        return prediction.float(), target * 2 - 1, negatives

    def reconstruction_loss(self, prediction: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return F.mse_loss(prediction, target.float()), self.lpips(prediction, target.float()).mean()

    def generator_gan_loss(self, prediction: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
        """Adversarial loss on positive-prompt outputs only; the heads get no gradient from it."""
        positives = prediction[~negatives]
        if positives.shape[0] == 0 or self.config.losses.gan_weight == 0:
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
        with accelerator.accumulate(self.model, self.discriminator):
            prediction, target, negatives = self.generator_prediction(highres, generator)
            mse, lpips = self.reconstruction_loss(prediction, target)
            gan = self.generator_gan_loss(prediction, negatives)
            total = losses.mse_weight * mse + losses.lpips_weight * lpips + losses.gan_weight * gan
            accelerator.backward(total)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(self.raw_model.trainable_parameters(), self.config.optim.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

            disc_loss = torch.zeros((), device=highres.device)
            if losses.gan_weight > 0:
                disc_loss = losses.gan_weight * self.discriminator_loss(highres, prediction, negatives)
                accelerator.backward(disc_loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(self.raw_discriminator.heads.parameters(), self.config.optim.grad_clip)
                self.disc_optimizer.step()
                self.disc_optimizer.zero_grad(set_to_none=True)
        return StepLosses(
            total=total.item(), mse=mse.item(), lpips=lpips.item(), gan_generator=gan.item(),
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
            prediction = raw(batch.lowres_upscaled * 2 - 1, scores[:, BLUR_INDEX], scores[:, NOISE_INDEX]).float()
            mse, lpips = self.reconstruction_loss(prediction, batch.highres * 2 - 1)
        finally:
            set_train_mode(raw)
        return float(self.config.losses.mse_weight * mse + self.config.losses.lpips_weight * lpips)

    # --- loop -------------------------------------------------------------------------------
    def batches(self) -> Iterator[torch.Tensor]:
        while True:
            yield from self.loader

    def run(self) -> Path | None:
        """Train to `max_steps` optimizer steps; returns the last checkpoint folder."""
        cfg, accelerator = self.config, self.accelerator
        set_train_mode(self.raw_model)
        self.discriminator.train()
        log_path = self.output_dir / "train_log.csv"
        fields = ["step", *StepLosses.__dataclass_fields__]
        log_file = None
        if accelerator.is_main_process:
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
