"""Released formats in, merged format out: exact key round-trips and clear errors."""
from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from s3diff_serve.cli.main import main as cli_main
from s3diff_serve.model import CheckpointError, S3DiffPipeline
from s3diff_serve.model.checkpoints import MERGED_FILES, load_merged, load_release, release_checkpoint, weights_hash


@pytest.fixture(scope="module")
def loaded(tiny_release):
    files, _ = tiny_release
    return load_release(files.sd_turbo_dir, files.s3diff_pkl, files.de_net_pth)


def test_released_file_has_the_reference_keys(tiny_release):
    files, model = tiny_release
    checkpoint = torch.load(files.s3diff_pkl, weights_only=True)
    assert set(checkpoint) == {
        "rank_unet", "rank_vae", "unet_lora_target_modules", "vae_lora_target_modules", "state_dict_unet",
        "state_dict_vae", "state_dict_vae_de_mlp", "state_dict_unet_de_mlp", "state_dict_vae_block_mlp",
        "state_dict_unet_block_mlp", "state_dict_vae_fuse_mlp", "state_dict_unet_fuse_mlp", "w", "state_embeddings",
    }
    assert set(checkpoint["state_dict_unet_de_mlp"]) == {"0.weight", "0.bias"}
    assert set(checkpoint["state_dict_unet_fuse_mlp"]) == {"weight", "bias"}
    assert set(checkpoint["state_embeddings"]) == {"state_dict_vae_block", "state_dict_unet_block"}
    lora_layers = len(model.unet_slot.layers)
    assert len(checkpoint["state_dict_unet"]) == 2 * lora_layers + 2


def test_every_released_tensor_loads_exactly(tiny_release, loaded):
    files, written = tiny_release
    checkpoint = torch.load(files.s3diff_pkl, weights_only=True)
    unet_state, vae_state = loaded.unet.state_dict(), loaded.vae.state_dict()
    for key, value in checkpoint["state_dict_unet"].items():
        assert torch.equal(unet_state[key], value), key
    for key, value in checkpoint["state_dict_vae"].items():
        assert torch.equal(vae_state[key], value), key
    for net in ("vae", "unet"):
        head = getattr(loaded, f"{net}_modulation")
        for part in ("de_mlp", "block_mlp", "fuse_mlp"):
            for key, value in checkpoint[f"state_dict_{net}_{part}"].items():
                assert torch.equal(getattr(head, part).state_dict()[key], value), (net, part, key)
        assert torch.equal(head.block_embeddings.weight, checkpoint["state_embeddings"][f"state_dict_{net}_block"]["weight"])
    assert torch.equal(loaded.fourier_frequencies, checkpoint["w"])
    for key, value in torch.load(files.de_net_pth, weights_only=True).items():
        assert torch.equal(loaded.de_net.state_dict()[key], value), key
    # and nothing else differs from the model that wrote the files (base weights, prompts)
    written_state = written.state_dict()
    assert all(torch.equal(value, written_state[key]) for key, value in loaded.state_dict().items())


def test_release_round_trip_is_key_exact(loaded):
    again = release_checkpoint(loaded)
    assert set(again["state_dict_unet"]) == {k for k in loaded.unet.state_dict() if "lora" in k or "conv_in" in k}


def _write_modified(tiny_release, tmp_path, change):
    files, _ = tiny_release
    checkpoint = torch.load(files.s3diff_pkl, weights_only=True)
    change(checkpoint)
    path = tmp_path / "s3diff.pkl"
    torch.save(checkpoint, path)
    return files, path


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c["state_dict_unet"].update(extra=torch.zeros(1)), "unexpected key 'extra'"),
        (lambda c: c["state_dict_vae"].pop(next(iter(c["state_dict_vae"]))), "state_dict_vae lacks key"),
        (lambda c: c.pop("w"), "missing key 'w'"),
        (lambda c: c.update(w=torch.zeros(3)), "key 'w' must be a tensor of shape"),
        (lambda c: c["state_dict_unet_fuse_mlp"].update(weight=torch.zeros(2, 2)), "key 'weight' has shape"),
        (lambda c: c.update(optimizer={}), "unexpected key 'optimizer'"),
    ],
)
def test_mismatched_release_names_file_and_key(tiny_release, tmp_path, change, message):
    files, path = _write_modified(tiny_release, tmp_path, change)
    with pytest.raises(CheckpointError, match=message) as info:
        load_release(files.sd_turbo_dir, path, files.de_net_pth)
    assert str(path) in str(info.value)


def test_truncated_and_foreign_files_give_clear_errors(tiny_release, tmp_path):
    files, _ = tiny_release
    truncated = tmp_path / "truncated.pkl"
    truncated.write_bytes(files.s3diff_pkl.read_bytes()[:1000])
    foreign = tmp_path / "foreign.pkl"
    foreign.write_text("this is not a checkpoint")
    for path in (truncated, foreign):
        with pytest.raises(CheckpointError, match="not a readable torch checkpoint") as info:
            load_release(files.sd_turbo_dir, path, files.de_net_pth)
        assert str(path) in str(info.value)
    with pytest.raises(CheckpointError, match="file not found"):
        load_release(files.sd_turbo_dir, tmp_path / "absent.pkl", files.de_net_pth)
    wrong_de_net = tmp_path / "de_net.pth"
    torch.save({"conv_first.0.weight": torch.zeros(1)}, wrong_de_net)
    with pytest.raises(CheckpointError, match=r"de_net.pth: key 'conv_first.0.weight' has shape"):
        load_release(files.sd_turbo_dir, files.s3diff_pkl, wrong_de_net)


def test_convert_then_load_is_bit_identical_to_release(tiny_release, loaded, tmp_path):
    files, _ = tiny_release
    out = tmp_path / "merged"
    argv = ["convert", "--sd-turbo", str(files.sd_turbo_dir), "--s3diff", str(files.s3diff_pkl),
            "--de-net", str(files.de_net_pth), "--out", str(out), "--dtype", "fp32"]
    assert cli_main(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted([*MERGED_FILES.values(), "config.json"])
    config = json.loads((out / "config.json").read_text())
    assert config["guidance_scale"] == 1.07 and config["color_fix"] == "wavelet"
    assert config["rank_unet"] == 32 and config["tiling"]["latent_tile"] == 96
    # released weights: the reference inference code's bilinear pre-resize, SD's factor-8 VAE
    assert config["pre_resize"] == "bilinear" and config["latent_factor"] == 8
    assert config["weights_id"] == weights_hash(out)
    merged, _ = load_merged(out)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in merged.state_dict().items())
    lowres = torch.rand(1, 3, 13, 19, generator=torch.Generator().manual_seed(0))
    from_merged = S3DiffPipeline.from_merged(out, device="cpu", dtype="fp32").enhance(lowres)
    from_release = S3DiffPipeline(loaded, merged_config := load_merged(out)[1], "cpu", "fp32").enhance(lowres)
    assert merged_config.weights_id == config["weights_id"]
    assert torch.equal(from_merged.images, from_release.images)
    assert tuple(from_merged.images.shape) == (1, 3, 52, 76)


def test_weights_id_is_a_content_hash(tiny_merged_dir, tmp_path):
    digest = hashlib.sha256()
    for name in sorted(MERGED_FILES.values()):
        digest.update(name.encode())
        digest.update((tiny_merged_dir / name).read_bytes())
    assert weights_hash(tiny_merged_dir) == digest.hexdigest()
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in tiny_merged_dir.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    tensors = load_file(copy / MERGED_FILES["de_net"])
    tensors["conv_first.0.bias"][0] += 1
    save_file(tensors, copy / MERGED_FILES["de_net"])
    assert weights_hash(copy) != weights_hash(tiny_merged_dir)


def test_merged_dtype_and_corrupt_merged_folder(tiny_release, tmp_path):
    from s3diff_serve.model.checkpoints import save_merged

    _, model = tiny_release
    config = save_merged(model, tmp_path / "bf16", dtype="bf16")
    assert config.dtype == "bf16"
    assert load_file(tmp_path / "bf16" / MERGED_FILES["unet"])["conv_in.weight"].dtype == torch.bfloat16
    assert load_file(tmp_path / "bf16" / MERGED_FILES["modulation"])["fourier_frequencies"].dtype == torch.float32
    (tmp_path / "bf16" / MERGED_FILES["vae"]).write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="vae.safetensors: not a readable safetensors file"):
        load_merged(tmp_path / "bf16")
    with pytest.raises(CheckpointError, match="config.json: file not found"):
        load_merged(tmp_path / "nowhere")


def test_pre_resize_and_latent_factor_are_recorded_with_the_weights(tmp_path):
    """Both are properties of a set of weights: the pre-resize as trained, the latent factor from
    the VAE's depth (2 ** (levels - 1)); a config.json whose factor contradicts its VAE is refused."""
    from s3diff_serve.model.checkpoints import read_merged_config, save_merged
    from s3diff_serve.model.presets import build_model

    for preset, levels, factor in (("tiny", 4, 8), ("tiny-f4", 3, 4)):
        model = build_model(preset, seed=1)
        assert len(model.vae.config.block_out_channels) == levels
        folder = tmp_path / preset
        save_merged(model, folder, dtype="fp32", pre_resize="bicubic")
        stored = json.loads((folder / "config.json").read_text())
        assert stored["pre_resize"] == "bicubic" and stored["latent_factor"] == factor
        config = read_merged_config(folder)
        assert config.pre_resize == "bicubic" and config.latent_factor == factor
        pipe = S3DiffPipeline.from_merged(folder, device="cpu", dtype="fp32")
        assert pipe.latent_factor == factor and pipe.plan(16, 24).latent_size == (64 // factor, 128 // factor)
    stored["latent_factor"] = 8
    (folder / "config.json").write_text(json.dumps(stored))
    with pytest.raises(CheckpointError, match="latent_factor 8 does not match the VAE config"):
        read_merged_config(folder)
    stored["latent_factor"], stored["pre_resize"] = 4, "nearest"
    (folder / "config.json").write_text(json.dumps(stored))
    with pytest.raises(CheckpointError, match="pre_resize must be one of bilinear, bicubic"):
        read_merged_config(folder)
    del stored["pre_resize"]  # merged folders written before the field existed: bilinear
    (folder / "config.json").write_text(json.dumps(stored))
    assert read_merged_config(folder).pre_resize == "bilinear"
