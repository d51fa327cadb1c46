"""LPIPS (VGG16 without torchvision) and the DINO discriminator with its multilevel sigmoid loss."""
from __future__ import annotations

import math

import pytest
import torch

from s3diff_serve.training.config import DiscriminatorConfig
from s3diff_serve.training.discriminator import DinoDiscriminator
from s3diff_serve.training.lpips import LPIPS, MissingWeightsError, TAP_CHANNELS, vgg16_features

TINY_VIT = {"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2, "intermediate_size": 64, "image_size": 32, "patch_size": 8}

# torchvision's vgg16().features: conv layers at these indices with these (out, in) channels.
TORCHVISION_CONVS = {0: (64, 3), 2: (64, 64), 5: (128, 64), 7: (128, 128), 10: (256, 128), 12: (256, 256), 14: (256, 256),
                     17: (512, 256), 19: (512, 512), 21: (512, 512), 24: (512, 512), 26: (512, 512), 28: (512, 512)}


def test_vgg16_state_dict_layout_is_torchvisions():
    state = vgg16_features().state_dict()
    expected = {f"{i}.{kind}" for i in TORCHVISION_CONVS for kind in ("weight", "bias")}
    assert set(state) == expected
    for index, (out_ch, in_ch) in TORCHVISION_CONVS.items():
        assert state[f"{index}.weight"].shape == (out_ch, in_ch, 3, 3)


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory):
    """A full torchvision-style VGG16 file (features.* + classifier.*) and an LPIPS heads file."""
    folder = tmp_path_factory.mktemp("lpips")
    torch.manual_seed(0)
    vgg = {f"features.{k}": v for k, v in vgg16_features().state_dict().items()}
    vgg["classifier.0.weight"] = torch.zeros(4, 4)
    torch.save(vgg, folder / "vgg16.pth")
    heads = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate(TAP_CHANNELS)}
    torch.save(heads, folder / "vgg.pth")
    return folder / "vgg16.pth", folder / "vgg.pth", vgg, heads


def test_lpips_loads_published_layouts_exactly(weight_files):
    vgg_path, heads_path, vgg, heads = weight_files
    lpips = LPIPS(vgg_path, heads_path)
    assert torch.equal(lpips.features[28].weight, vgg["features.28.weight"])
    assert torch.equal(lpips.heads[3].weight, heads["lin3.model.1.weight"])
    assert not any(p.requires_grad for p in lpips.parameters())


def test_lpips_distance_properties(weight_files, hr_batch):
    lpips = LPIPS(*weight_files[:2])
    images = hr_batch[:, :, :32, :32] * 2 - 1
    assert torch.allclose(lpips(images, images), torch.zeros(2), atol=1e-6)
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(images.shape, generator=generator)
    small, large = lpips(images, images + 0.05 * noise), lpips(images, images + 0.3 * noise)
    assert (small > 0).all() and (large > small).all()
    assert torch.allclose(lpips(images, images + 0.3 * noise), lpips(images + 0.3 * noise, images), atol=1e-5)


def test_lpips_gradient_reaches_the_prediction(hr_batch):
    lpips = LPIPS(random_weights=True)
    target = hr_batch[:1, :, :32, :32] * 2 - 1
    prediction = (target + 0.1).requires_grad_(True)
    lpips(prediction, target).sum().backward()
    assert prediction.grad is not None and prediction.grad.abs().sum() > 0


def test_missing_weight_files_say_where_to_get_them(tmp_path, weight_files):
    with pytest.raises(MissingWeightsError, match="download.pytorch.org/models/vgg16"):
        LPIPS(tmp_path / "absent.pth", weight_files[1])
    with pytest.raises(MissingWeightsError, match="PerceptualSimilarity"):
        LPIPS(weight_files[0], tmp_path / "absent.pth")
    with pytest.raises(MissingWeightsError, match="facebook/dino-vitb16"):
        DinoDiscriminator(DiscriminatorConfig(dino_path=tmp_path))


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
