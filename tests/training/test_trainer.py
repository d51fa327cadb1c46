"""The training engine on the tiny preset: trainable set, negative prompting, a short CPU run
whose loss falls, checkpoints that load back through the model package, and resume."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from s3diff_serve.model.checkpoints import load_merged, load_release
from s3diff_serve.training.config import TrainConfig
from s3diff_serve.training.trainer import Trainer, draw_negatives, negative_prompting

from .conftest import TINY_CONFIG

STEPS = 6


def tiny_config(output_dir: Path, **overrides) -> TrainConfig:
    config = TrainConfig.from_yaml(TINY_CONFIG)
    values = {"output_dir": output_dir, "max_steps": STEPS, "batch_size": 1, "grad_accum_steps": 1, "checkpoint_every": STEPS,
              "optim": config.optim.model_copy(update={"lr": 2e-3}), **overrides}
    return config.model_copy(update=values)


EVAL_SEED = 0


class FixedBatchTrainer(Trainer):
    """Every step draws the degradation `evaluate(seed=EVAL_SEED)` uses, so training sees exactly
    the batch the before/after loss is measured on."""

    def step_generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(EVAL_SEED)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, hr_batch):
    """(trainer after STEPS optimizer steps, eval loss before, eval loss after, last checkpoint).

    The data folder holds one 64x64 photo (the evaluation image, unflipped, so every crop is the
    whole photo), every step uses the evaluation's degradation and no negative prompts: the run
    fits one fixed batch, and its loss on that batch must fall by far more than any CPU's
    rounding can move it (random batches differ by more than a few steps of learning)."""
    photos = tmp_path_factory.mktemp("one-photo")
    Image.fromarray((hr_batch[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(photos / "photo.png")
    config = tiny_config(tmp_path_factory.mktemp("run"), negative_prompt_probability=0.0)
    config.data = config.data.model_copy(update={"hr_dirs": [photos], "face_dirs": [], "face_share": 0.0, "flip": False})
    torch.manual_seed(0)
    trainer = FixedBatchTrainer(config)
    before = trainer.evaluate(hr_batch[:1], seed=EVAL_SEED)
    checkpoint = trainer.run()
    after = trainer.evaluate(hr_batch[:1], seed=EVAL_SEED)
    return trainer, before, after, checkpoint


def test_negative_prompting_replaces_exactly_the_drawn_samples():
    generator = torch.Generator().manual_seed(0)
    negatives = draw_negatives(6, 0.5, generator)
    assert 0 < int(negatives.sum()) < 6
    highres, upscaled = torch.rand(6, 3, 8, 8), torch.rand(6, 3, 8, 8)
    positive, negative = torch.randn(1, 77, 4), torch.randn(1, 77, 4)
    target, states = negative_prompting(negatives, highres, upscaled, positive, negative)
    for i in range(6):
        assert torch.equal(target[i], upscaled[i] if negatives[i] else highres[i])
        assert torch.equal(states[i], negative[0] if negatives[i] else positive[0])
    assert not draw_negatives(1000, 0.0, generator).any() and draw_negatives(1000, 1.0, generator).all()
    rate = draw_negatives(20000, 0.05, generator).float().mean()
    assert float(rate) == pytest.approx(0.05, abs=0.006)


def test_trainable_set_is_the_papers(trained):
    model = trained[0].raw_model
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(names) == len(model.trainable_parameters())
    assert not any(n.startswith("de_net.") for n in names)
    assert not any(n.startswith("vae.decoder.") for n in names)
    for name in names:
        assert ("lora_" in name or name.startswith("unet.conv_in.") or name.startswith(("vae_modulation.", "unet_modulation."))), name
    assert {"unet.conv_in.weight", "unet_modulation.block_embeddings.weight", "vae_modulation.block_embeddings.weight"} <= set(names)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert any(n.endswith("base_layer.weight") for n in frozen)


def test_short_run_loss_falls_and_logs(trained):
    trainer, before, after, checkpoint = trained
    assert trainer.step == STEPS
    # Six steps on this batch take ~22% off its loss; a CPU's kernels move it by well under 1%.
    assert after < 0.9 * before, (before, after)
    rows = (trainer.output_dir / "train_log.csv").read_text().strip().splitlines()
    assert rows[0].startswith("step,total,mse,l1,lpips,estimator,gan_generator,discriminator,negatives")
    assert [int(r.split(",")[0]) for r in rows[1:]] == list(range(1, STEPS + 1))
    assert checkpoint.name == f"step-{STEPS:07d}"


def test_checkpoint_loads_back_and_reproduces_the_trained_model(trained):
    trainer, _, _, checkpoint = trained
    files = trainer.files
    model = trainer.raw_model.eval()
    generator = torch.Generator().manual_seed(5)
    lowres = torch.rand(1, 3, 16, 16, generator=generator)
    blur, noise = torch.tensor([0.3]), torch.tensor([0.6])
    recipe = {"pre_resize": trainer.pre_resize, "color_fix": "none"}
    with torch.no_grad():
        expected = model(lowres, blur, noise, **recipe)
        released = load_release(files.sd_turbo_dir, checkpoint / "s3diff.pkl", files.de_net_pth)
        from_release = released(lowres, blur, noise, **recipe)
        merged_model, _ = load_merged(checkpoint / "merged")
        from_merged = merged_model(lowres, blur, noise, **recipe)
    assert torch.allclose(from_release, expected, atol=1e-5)
    assert torch.allclose(from_merged, expected, atol=1e-5)
    initial = torch.load(files.init_s3diff_pkl, weights_only=True)["state_dict_unet"]
    saved = torch.load(checkpoint / "s3diff.pkl", weights_only=True)["state_dict_unet"]
    assert initial.keys() == saved.keys()
    assert sum(not torch.equal(initial[k], saved[k]) for k in saved) > len(saved) // 2  # training moved them


def test_resume_restores_step_weights_and_optimizer(trained):
    trainer, _, _, checkpoint = trained
    resumed = Trainer(tiny_config(trainer.output_dir, resume_from=Path("latest")))
    assert resumed.step == STEPS
    saved = trainer.raw_model.state_dict()
    for name, value in resumed.raw_model.state_dict().items():
        assert torch.equal(value, saved[name]), name
    optimizer_state = resumed.optimizer.state_dict()["state"]
    assert optimizer_state and all(int(s["step"]) == STEPS for s in optimizer_state.values())
    assert resumed.run() is None  # already at max_steps
