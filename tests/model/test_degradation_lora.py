"""Degradation-guided LoRA: Fourier features, block ids, the modulated forward and its folding."""
from __future__ import annotations

import math

import pytest
import torch
from diffusers import UNet2DConditionModel
from peft import LoraConfig

from s3diff_serve.model.config import UNET_ADAPTER, sd_turbo_unet_config, sd_turbo_vae_config
from s3diff_serve.model.degradation_lora import fourier_features, unet_block_id, vae_block_id
from s3diff_serve.model.presets import build_model
from s3diff_serve.model.s3diff import S3DiffModel


@pytest.fixture(scope="module")
def model():
    return build_model("tiny", seed=11)


def test_fourier_order_is_blur_then_noise():
    w = torch.tensor([0.5, -1.25])
    scores = torch.tensor([[0.2, 0.7]])  # [blur, noise]
    features = fourier_features(scores, w)[0]
    blur_phase, noise_phase = 2 * math.pi * 0.2 * w, 2 * math.pi * 0.7 * w
    expected = torch.cat([blur_phase.sin(), blur_phase.cos(), noise_phase.sin(), noise_phase.cos()])
    torch.testing.assert_close(features, expected)


@pytest.mark.parametrize(
    "name, block",
    [
        ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", 0),
        ("down_blocks.3.resnets.1.conv2", 3),
        ("mid_block.attentions.0.proj_in", 4),
        ("up_blocks.0.resnets.2.conv_shortcut", 5),
        ("up_blocks.3.attentions.2.proj_out", 8),
        ("conv_out", 9),
    ],
)
def test_unet_block_ids(name, block):
    assert unet_block_id(name) == block


@pytest.mark.parametrize(
    "name, block",
    [("encoder.down_blocks.2.resnets.0.conv_shortcut", 2), ("encoder.mid_block.attentions.0.to_k", 4),
     ("encoder.conv_in", 5), ("encoder.conv_out", 5)],
)
def test_vae_block_ids(name, block):
    assert vae_block_id(name) == block


def test_released_layer_and_key_counts_at_full_size():
    """The released model has 257 UNet and 31 VAE-encoder LoRA layers; 516 and 62 checkpoint tensors
    (docs/model.md, "Released files")."""
    with torch.device("meta"):
        model = S3DiffModel.from_configs(sd_turbo_unet_config(), sd_turbo_vae_config(), {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"})
    assert len(model.unet_slot.layers) == 257
    assert len(model.vae_slot.layers) == 31
    assert not any(not n.startswith("encoder.") for n in (e.name for e in model.vae_slot.layers))
    unet_keys = [k for k in model.unet.state_dict() if "lora" in k or "conv_in" in k]
    vae_keys = [k for k in model.vae.state_dict() if "lora" in k or "skip_conv" in k]
    assert len(unet_keys) == 516 and len(vae_keys) == 62
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.default.weight" in unet_keys
    assert "encoder.down_blocks.0.resnets.0.conv1.lora_A.vae_skip.weight" in vae_keys
    assert {"conv_in.weight", "conv_in.bias"} <= set(unet_keys)
    assert model.unet_modulation.block_embeddings.weight.shape == (10, 64)
    assert model.vae_modulation.block_embeddings.weight.shape == (6, 64)
    assert model.unet_modulation.fuse_mlp.weight.shape == (32 * 32, 320)


@pytest.mark.parametrize("layer_name", ["conv", "attention"])
def test_hooked_layer_equals_reference_formula(model, layer_name):
    """y = base(x) + s * B(einsum(A(x), M)) per layer, per sample."""
    slot = model.unet_slot
    wanted = torch.nn.Linear if layer_name == "attention" else torch.nn.Conv2d
    entry = next(e for e in slot.layers if isinstance(e.layer.get_base_layer(), wanted) and e.block_id > 0)
    layer = entry.layer
    generator = torch.Generator().manual_seed(0)
    modulation = torch.randn(2, 10, 32, 32, generator=generator)
    slot.modulation = modulation
    if layer_name == "attention":
        x = torch.randn(2, 5, layer.get_base_layer().in_features, generator=generator)
        a_out = x @ layer.lora_A[UNET_ADAPTER].weight.T
        mixed = torch.einsum("...lk,...kr->...lr", a_out, modulation[:, entry.block_id])
        lora = mixed @ layer.lora_B[UNET_ADAPTER].weight.T
    else:
        x = torch.randn(2, layer.get_base_layer().in_channels, 6, 6, generator=generator)
        conv_a, conv_b = layer.lora_A[UNET_ADAPTER], layer.lora_B[UNET_ADAPTER]  # calling them would run the hook
        a_out = torch.nn.functional.conv2d(x, conv_a.weight, stride=conv_a.stride, padding=conv_a.padding)
        mixed = torch.einsum("...khw,...kr->...rhw", a_out, modulation[:, entry.block_id])
        lora = torch.nn.functional.conv2d(mixed, conv_b.weight)
    with torch.no_grad():
        expected = layer.get_base_layer()(x) + layer.scaling[UNET_ADAPTER] * lora
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def _plain_lora_unet(model: S3DiffModel) -> UNet2DConditionModel:
    """The same weights under plain peft LoRA, without the modulation hooks."""
    unet = UNet2DConditionModel.from_config(model.unet.config)
    unet.add_adapter(LoraConfig(r=model.rank_unet, target_modules=model.unet_targets), adapter_name=UNET_ADAPTER)
    unet.load_state_dict(model.unet.state_dict())
    return unet.eval()


def test_identity_modulation_is_plain_lora_and_zero_is_base(model):
    plain = _plain_lora_unet(model)
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    states = model.positive_embeds
    rank = model.rank_unet
    with torch.no_grad():
        model.unet_slot.modulation = torch.eye(rank).expand(1, 10, rank, rank)
        torch.testing.assert_close(model.unet(latent, 999, states).sample, plain(latent, 999, states).sample, atol=1e-5, rtol=1e-5)
        model.unet_slot.modulation = torch.zeros(1, 10, rank, rank)
        modulated_zero = model.unet(latent, 999, states).sample
        plain.disable_adapters()
        torch.testing.assert_close(modulated_zero, plain(latent, 999, states).sample, atol=1e-5, rtol=1e-5)


def test_folded_encoder_equals_unfolded(model):
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        modulation = model.degradation_modulation(torch.tensor([0.3]), torch.tensor([0.6])).vae
        unfolded = model.encode(image, modulation)
        weights_before = {n: p.clone() for n, p in model.vae.named_parameters()}
        with model.vae_slot.folded(modulation):
            folded = model.encode(image, modulation)
        restored = dict(model.vae.named_parameters())
    torch.testing.assert_close(folded, unfolded, atol=1e-5, rtol=1e-5)
    assert all(torch.equal(weights_before[n], restored[n]) for n in weights_before)
    assert not any(e.layer.disable_adapters for e in model.vae_slot.layers)


def test_trainable_set_is_exactly_the_papers(model):
    trainable = {id(p) for p in model.trainable_parameters()}
    names = {n for n, p in model.named_parameters() if id(p) in trainable}
    assert any(n.startswith("unet.conv_in.") for n in names)
    assert not any(n.startswith("de_net.") or "base_layer" in n or n.startswith("vae.decoder.") for n in names)
    lora_names = {n for n, _ in model.named_parameters() if "lora_" in n}
    assert lora_names <= names
    assert {n for n in names if "modulation" in n} == {n for n, _ in model.named_parameters() if "modulation" in n}


def test_channels_last_model_equals_nchw_and_folds_in_place():
    """The hook's NHWC contraction and the NHWC folded weights give the NCHW model's latent."""
    nchw, nhwc = build_model("tiny", seed=12), build_model("tiny", seed=12)
    nhwc.to_runtime("cpu", torch.float32, channels_last=True)
    image = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3)) * 2 - 1
    weights = {n: p for n, p in nhwc.vae.named_parameters()}
    with torch.no_grad():
        scores = torch.tensor([0.3, 0.3]), torch.tensor([0.6, 0.6])
        expected = nchw.encode(image, nchw.degradation_modulation(*scores).vae)
        modulation = nhwc.degradation_modulation(*scores).vae
        torch.testing.assert_close(nhwc.encode(image, modulation), expected, atol=1e-5, rtol=1e-5)
        folded = nhwc.encode(image, modulation, fold=True)
    torch.testing.assert_close(folded, expected, atol=1e-5, rtol=1e-5)
    assert all(p is weights[n] for n, p in nhwc.vae.named_parameters())  # the originals are back
    conv = nhwc.vae.encoder.conv_in.base_layer.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
