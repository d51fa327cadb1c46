"""Training config (YAML + environment) and `s3diff train` errors, without building a model."""
from __future__ import annotations

import yaml

from s3diff_serve.cli.main import main
from s3diff_serve.training.config import TrainConfig

from .conftest import TINY_CONFIG

PAPER_CONFIG = TINY_CONFIG.parent / "paper.yaml"


def test_paper_config_holds_the_papers_numbers():
    config = TrainConfig.from_yaml(PAPER_CONFIG)
    assert (config.losses.mse_weight, config.losses.lpips_weight, config.losses.gan_weight) == (2.0, 5.0, 0.5)
    assert (config.optim.lr, config.optim.betas, config.optim.weight_decay, config.optim.grad_clip) == (2e-5, (0.9, 0.999), 1e-2, 1.0)
    assert (config.batch_size, config.grad_accum_steps, config.negative_prompt_probability) == (4, 4, 0.05)
    assert config.degradation.resize2.probs == (0.3, 0.4, 0.3) and config.degradation.jpeg2 == (60, 100)
    assert config.model.sd_turbo_dir.parts[-2:] == ("weights", "sd-turbo")


def test_relative_paths_follow_the_config_file_and_env_overrides(monkeypatch):
    monkeypatch.setenv("S3DIFF_TRAIN_OPTIM__LR", "0.125")
    monkeypatch.setenv("S3DIFF_TRAIN_MAX_STEPS", "77")
    config = TrainConfig.from_yaml(TINY_CONFIG)
    assert config.optim.lr == 0.125 and config.max_steps == 77
    assert config.optim.grad_clip == 1.0  # the rest of the section is kept
    assert config.data.hr_dirs == [TINY_CONFIG.parent / "tiny-data" / "photos"]


def test_init_merged_names_the_builtin_model_wherever_the_config_sits(tmp_path):
    """`builtin-demo` is the packaged model, not a path next to the config (the training image
    copies configs without the checkout around them)."""
    from s3diff_serve.model.builtin import BUILTIN_DIR

    config = tmp_path / "elsewhere.yaml"
    values = yaml.safe_load(TINY_CONFIG.read_text())
    values["model"] = {"preset": "tiny", "train_all": True, "init_merged": "builtin-demo"}
    config.write_text(yaml.safe_dump(values))
    assert TrainConfig.from_yaml(config).model.init_merged == BUILTIN_DIR
    values["model"]["init_merged"] = "weights/v1"
    config.write_text(yaml.safe_dump(values))
    assert TrainConfig.from_yaml(config).model.init_merged == tmp_path / "weights" / "v1"


def test_train_without_lpips_weights_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("S3DIFF_CACHE", str(tmp_path / "empty-cache"))
    values = yaml.safe_load(TINY_CONFIG.read_text())
    values["losses"] = {"random_weights": False}
    values["output_dir"] = str(tmp_path / "out")
    values["data"]["hr_dirs"] = [str(TINY_CONFIG.parent / "tiny-data" / "photos")]
    values["data"]["face_dirs"] = [str(TINY_CONFIG.parent / "tiny-data" / "faces")]
    config_path = tmp_path / "bad.yaml"
    config_path.write_text(yaml.safe_dump(values))
    assert main(["train", "--config", str(config_path)]) == 2
    message = capsys.readouterr().out
    assert "s3diff weights fetch-metrics" in message
    assert not (tmp_path / "out").exists()


def test_train_with_missing_config_file(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "absent.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().out
