"""Training from scratch (the built-in demo model's recipe) on the tiny preset: every weight
trains, the one-step path starts as an autoencoder, the UNet waits for its start step, the
estimator learns the applied scores, and a checkpoint restores the whole model."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from s3diff_serve.model.checkpoints import read_merged_config, save_merged
from s3diff_serve.model.config import TIMESTEP
from s3diff_serve.model.output_size import pre_resize
from s3diff_serve.training.config import DegradationConfig, LossConfig, ModelSource, TrainConfig
from s3diff_serve.training.degradations import NOISE_STD_FULL, RealESRGANDegradation, kernel_std
from s3diff_serve.training.kernels import gaussian_family
from s3diff_serve.training.model_setup import build_trainable_model, init_from_merged, resolve_pre_resize
from s3diff_serve.training.trainer import Trainer

from .conftest import TINY_CONFIG

REPO = Path(__file__).resolve().parents[2]


def scratch_config(output_dir: Path, **overrides) -> TrainConfig:
    config = TrainConfig.from_yaml(TINY_CONFIG)
    values = {
        "output_dir": output_dir, "max_steps": 2, "batch_size": 2, "grad_accum_steps": 1, "checkpoint_every": 2,
        "model": ModelSource(preset="tiny", train_all=True, rank_unet=4, rank_vae=4),
        "losses": LossConfig(mse_weight=0, l1_weight=1, lpips_weight=0.5, gan_weight=0, estimator_weight=1,
                             color_fix="wavelet", random_weights=True),
        "discriminator": None, "scores_from": "applied",
        "optim": config.optim.model_copy(update={"lr": 1e-3, "unet_start_step": 1, "unet_lr_scale": 0.5}),
        **overrides,
    }
    return config.model_copy(update=values)


def test_every_weight_trains_and_the_start_is_an_autoencoder():
    model = build_trainable_model(None, ModelSource(preset="tiny", train_all=True, rank_unet=4, rank_vae=4)).eval()
    assert all(p.requires_grad for p in model.parameters())
    lowres = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        image = pre_resize(lowres, "bilinear") * 2 - 1
        latent = model.encode(image, model.degradation_modulation(torch.zeros(1), torch.zeros(1)).vae)
        expected = model.vae.decode(latent / model.alpha_bar**0.5 / model.scaling_factor).sample * 0.5 + 0.5
        output = model(lowres, torch.zeros(1), torch.zeros(1), pre_resize="bilinear", color_fix="none")
        assert torch.allclose(output, expected, atol=1e-5)
    assert model.alpha_bar == pytest.approx(0.0046601, rel=1e-3) and TIMESTEP == 999


def test_kernel_std_of_a_gaussian_is_its_sigma():
    sigma = torch.tensor([0.8, 1.5, 2.5], dtype=torch.float64)
    kernels = gaussian_family(torch.zeros(3, dtype=torch.long), sigma, sigma, torch.zeros(3, dtype=torch.float64),
                              torch.ones(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64), 21)
    assert torch.allclose(kernel_std(kernels), sigma, rtol=2e-2)


def test_applied_noise_score_measures_the_noise_added(hr_batch):
    config = DegradationConfig()
    quiet = config.model_copy(update={
        "blur1": config.blur1.model_copy(update={"probability": 0.0}),
        "noise1": config.noise1.model_copy(update={"gaussian_probability": 1.0, "gaussian_sigma": (8.0, 8.0), "gray_probability": 0.0}),
        "noise2": config.noise2.model_copy(update={"gaussian_probability": 1.0, "gaussian_sigma": (6.0, 6.0), "gray_probability": 0.0}),
    })
    batch = RealESRGANDegradation(quiet)(hr_batch, torch.Generator().manual_seed(0))
    expected = math.hypot(8, 6) / 255 / NOISE_STD_FULL  # clamping at 0/1 trims a little
    assert batch.noise_score.tolist() == pytest.approx([expected] * 2, rel=0.1)


def test_clean_samples_are_bicubic_downscales_scored_zero(hr_batch):
    batch = RealESRGANDegradation(DegradationConfig(clean_probability=1.0))(hr_batch, torch.Generator().manual_seed(0))
    bicubic = F.interpolate(hr_batch, size=(16, 16), mode="bicubic", align_corners=False, antialias=True)
    assert torch.allclose(batch.lowres, (bicubic.clamp(0, 1) * 255).round() / 255)
    assert not batch.blur_score.any() and not batch.noise_score.any()


@pytest.fixture(scope="module")
def scratch_run(tmp_path_factory, photo_dirs):
    general, _ = photo_dirs
    config = scratch_config(tmp_path_factory.mktemp("scratch"))
    config.data = config.data.model_copy(update={"hr_dirs": [general], "face_dirs": [], "face_share": 0.0})
    trainer = Trainer(config)
    start = {name: p.detach().clone() for name, p in trainer.raw_model.named_parameters()}
    trainer.training_step(next(iter(trainer.loader)))  # step 0 < unet_start_step: the UNet waits
    after_first = {name: p.detach().clone() for name, p in trainer.raw_model.named_parameters()}
    trainer.step = 1
    trainer.training_step(next(iter(trainer.loader)))
    return trainer, start, after_first


def test_the_unet_waits_for_its_start_step_and_the_rest_trains(scratch_run):
    trainer, start, after_first = scratch_run
    now = dict(trainer.raw_model.named_parameters())
    unet = [n for n in start if n.startswith("unet.")]
    others = [n for n in start if n.startswith(("vae.encoder.", "vae.decoder.", "de_net."))]
    assert all(torch.equal(start[n], after_first[n]) for n in unet)
    assert any(not torch.equal(start[n], after_first[n]) for n in others)
    assert any(not torch.equal(after_first[n], now[n].detach()) for n in unet)
    assert trainer.optimizer.param_groups[1]["lr"] == pytest.approx(1e-3 * 0.5)


def test_a_scratch_checkpoint_restores_the_whole_model(scratch_run, tmp_path):
    trainer, _, _ = scratch_run
    trainer.step = 2
    folder = trainer.save()
    assert (folder / "merged" / "config.json").is_file() and not (folder / "s3diff.pkl").exists()
    # the pre-resize it trained with (bicubic: the paper's training code) goes with the weights
    assert trainer.pre_resize == "bicubic" and read_merged_config(folder / "merged").pre_resize == "bicubic"
    config = scratch_config(trainer.config.output_dir, resume_from=folder)
    config.data = trainer.config.data
    resumed = Trainer(config)
    assert resumed.step == 2
    for (name, a), b in zip(trainer.raw_model.state_dict().items(), resumed.raw_model.state_dict().values()):
        assert torch.equal(a, b), name


def test_the_demo_recipe_trains_from_scratch_with_the_real_lpips():
    clean = TrainConfig.from_yaml(REPO / "training" / "configs" / "demo-clean.yaml")
    config = TrainConfig.from_yaml(REPO / "training" / "configs" / "demo.yaml")
    assert config.model.preset == "demo" and config.model.train_all and clean.model == config.model
    assert not config.losses.random_weights and config.losses.lpips_weight > 0
    assert config.scores_from == "applied" and config.losses.estimator_weight > 0 and config.discriminator is None
    # stage 1: clean inputs only, the UNet waits; stage 2 resumes it in the same folder
    assert clean.degradation.clean_probability == 1.0 and clean.optim.unet_start_step == clean.max_steps
    assert clean.output_dir == config.output_dir and config.resume_from.name == "latest"
    assert config.optim.unet_start_step == clean.max_steps < config.max_steps
    # stage 3 resumes stage 2 in the same folder and decays the lr from where stage 2 ended
    finish = TrainConfig.from_yaml(REPO / "training" / "configs" / "demo-finish.yaml")
    assert finish.model == config.model and finish.output_dir == config.output_dir
    assert finish.optim.decay_start_step == config.max_steps < finish.max_steps
    assert finish.optim.lr_factor(finish.max_steps, finish.max_steps) == pytest.approx(finish.optim.final_lr_fraction)


def test_the_lr_decays_linearly_from_its_start_step_to_the_final_fraction():
    from s3diff_serve.training.config import OptimConfig

    optim = OptimConfig(decay_start_step=900, final_lr_fraction=0.1)
    factors = [optim.lr_factor(step, 1500) for step in (0, 900, 1200, 1500, 1600)]
    assert factors == pytest.approx([1.0, 1.0, 0.55, 0.1, 0.1])
    assert OptimConfig().lr_factor(10_000, 100) == 1.0  # no decay unless asked for


def test_a_resumed_run_drops_the_log_rows_past_its_checkpoint(tmp_path):
    from s3diff_serve.training.trainer import drop_rows_after

    log = tmp_path / "train_log.csv"
    log.write_text("step,total\n10,1\n20,1\n30,1\n")
    drop_rows_after(log, 20)
    assert log.read_text() == "step,total\n10,1\n20,1\n"


def test_training_can_start_from_merged_weights(tmp_path):
    source = ModelSource(preset="tiny", train_all=True, rank_unet=4, rank_vae=4)
    trained = build_trainable_model(None, source, seed=5)
    save_merged(trained, tmp_path / "merged", dtype="fp32")
    again = build_trainable_model(None, source.model_copy(update={"init_merged": tmp_path / "merged"}), seed=0)
    for (name, a), b in zip(trained.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name
    assert all(p.requires_grad for p in again.parameters())


def test_the_training_pre_resize_comes_from_the_config_else_the_starting_weights(tmp_path):
    source = ModelSource(preset="tiny", train_all=True, rank_unet=4, rank_vae=4)
    assert resolve_pre_resize(source) == "bicubic"
    save_merged(build_trainable_model(None, source), tmp_path / "merged", dtype="fp32", pre_resize="bilinear")
    started = source.model_copy(update={"init_merged": tmp_path / "merged"})
    assert resolve_pre_resize(started) == "bilinear"
    assert resolve_pre_resize(started.model_copy(update={"pre_resize": "bicubic"})) == "bicubic"


def test_the_trainer_feeds_the_model_its_pre_resize(scratch_run, monkeypatch):
    """The x4 input of a training step is model.output_size.pre_resize of the degraded LR with the
    run's mode, in step 1 of the recipe serving runs too (model/one_step.py)."""
    from s3diff_serve.model import one_step
    from s3diff_serve.model.output_size import pre_resize

    trainer, _, _ = scratch_run
    seen = []
    monkeypatch.setattr(one_step, "resize_to_model_size",
                        lambda lowres, mode: seen.append((lowres.clone(), mode)) or pre_resize(lowres, mode))
    highres = next(iter(trainer.loader))
    trainer.generator_prediction(highres, torch.Generator().manual_seed(4))
    lowres = trainer.degrade(highres, torch.Generator().manual_seed(4)).lowres
    assert len(seen) == 1 and seen[0][1] == "bicubic" and torch.equal(seen[0][0], lowres)


def test_a_shallower_vae_starts_from_the_deeper_ones_matching_levels():
    """Factor 4 from factor 8 weights: the encoder keeps its block indices, decoder up-block i
    comes from up-block i + 1 (the same image resolutions); with the tiny presets all of it fits."""
    deep = build_trainable_model(None, ModelSource(preset="tiny", train_all=True, rank_unet=4, rank_vae=4), seed=3)
    shallow = build_trainable_model(None, ModelSource(preset="tiny-f4", train_all=True, rank_unet=4, rank_vae=4), seed=4)
    assert init_from_merged(shallow, deep) == []
    deep_state, shallow_state = deep.state_dict(), shallow.state_dict()
    for name, value in shallow_state.items():
        source = name
        if name.startswith("vae.decoder.up_blocks."):
            index = int(name.split(".")[3])
            source = name.replace(f"up_blocks.{index}.", f"up_blocks.{index + 1}.", 1)
        assert torch.equal(value, deep_state[source]), name
    assert "vae.encoder.down_blocks.2.downsamplers.0.conv.base_layer.weight" in deep_state  # dropped
    # what does not fit keeps its init: a wider UNet input cannot come from the tiny one
    wider = build_trainable_model(None, ModelSource(preset="demo-f4", train_all=True, rank_unet=4, rank_vae=4), seed=4)
    fresh = init_from_merged(wider, deep)
    assert "unet.conv_in.weight" in fresh and "de_net.conv_first.0.weight" not in fresh
