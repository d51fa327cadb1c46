"""The training losses: LPIPS-VGG16 (the metric module's, tested against published values in
tests/evaluation) as a loss, and the DINO discriminator with its multilevel sigmoid loss."""
from __future__ import annotations

import math

import pytest
import torch

from s3diff_serve.evaluation.cache import MissingWeightsError
from s3diff_serve.evaluation.metrics import LPIPS
from s3diff_serve.training.config import DiscriminatorConfig
from s3diff_serve.training.discriminator import DinoDiscriminator

TINY_VIT = {"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2, "intermediate_size": 64, "image_size": 32, "patch_size": 8}


def test_lpips_gradient_reaches_the_prediction(hr_batch):
    lpips = LPIPS("vgg", pretrained=False)
    prediction = (hr_batch * 2 - 1).clone().requires_grad_(True)
    target = (hr_batch.flip(-1) * 2 - 1)
    lpips(prediction, target).sum().backward()
    assert prediction.grad is not None and prediction.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in lpips.parameters())


def test_missing_lpips_weights_say_which_command_fetches_them(tmp_path, monkeypatch):
    monkeypatch.setenv("S3DIFF_CACHE", str(tmp_path))
    with pytest.raises(MissingWeightsError, match="s3diff weights fetch-metrics"):
        LPIPS("vgg")


@pytest.fixture(scope="module")
def discriminator():
    torch.manual_seed(0)
    return DinoDiscriminator(DiscriminatorConfig(random_vit=TINY_VIT, feature_layers=(1, 2, 3), head_channels=16)).train()


def test_discriminator_levels_and_shapes(discriminator, hr_batch):
    logits = discriminator(hr_batch * 2 - 1)
    assert [tuple(level.shape) for level in logits] == [(2, 1, 1), (2, 1, 1), (2, 1)]  # 4x4 tokens -> 1x1 maps
    assert not any(p.requires_grad for p in discriminator.backbone.parameters())


def test_multilevel_sigmoid_loss_values(discriminator):
    zeros = [torch.zeros(3, 2, 2), torch.zeros(3, 2, 2), torch.zeros(3, 1)]
    # BCE(logit 0, any label) = ln 2 per level, three levels.
    assert torch.allclose(discriminator.loss(zeros, real=True), torch.full((3,), 3 * math.log(2)))
    logits = [torch.full((1, 2, 2), 2.0), torch.full((1, 2, 2), -1.0), torch.full((1, 1), 0.5)]
    softplus = torch.nn.functional.softplus

    def bce(x, label):  # -(y log σ(x) + (1-y) log(1-σ(x)))
        return label * softplus(torch.tensor(-x)) + (1 - label) * softplus(torch.tensor(x))

    expected_real = sum(bce(x, 0.8) for x in (2.0, -1.0, 0.5))
    expected_fake = sum(bce(x, 0.0) for x in (2.0, -1.0, 0.5))
    assert float(discriminator.loss(logits, real=True)) == pytest.approx(float(expected_real), rel=1e-6)
    assert float(discriminator.loss(logits, real=False)) == pytest.approx(float(expected_fake), rel=1e-6)


def test_discriminator_step_moves_heads_not_backbone(hr_batch):
    torch.manual_seed(1)
    disc = DinoDiscriminator(DiscriminatorConfig(random_vit=TINY_VIT, feature_layers=(1, 2, 3), head_channels=16, diffaug=False)).train()
    backbone = {k: v.clone() for k, v in disc.backbone.state_dict().items()}
    optimizer = torch.optim.AdamW(disc.heads.parameters(), lr=1e-2)
    real, fake = hr_batch * 2 - 1, torch.rand_like(hr_batch) * 2 - 1
    losses = []
    for _ in range(10):
        logits = disc(torch.cat([real, fake]))
        loss = disc.loss([l[:2] for l in logits], real=True).mean() + disc.loss([l[2:] for l in logits], real=False).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.2
    assert all(torch.equal(v, disc.backbone.state_dict()[k]) for k, v in backbone.items())


def test_missing_dino_folder_says_where_to_get_it(tmp_path):
    with pytest.raises(MissingWeightsError, match="facebook/dino-vitb16"):
        DinoDiscriminator(DiscriminatorConfig(dino_path=tmp_path))
