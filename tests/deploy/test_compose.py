"""docker-compose.yml: valid against the compose specification, GPU and CPU profiles that Prometheus
scrapes under one name, a one-shot weights conversion the CLI accepts, and Grafana provisioning."""
from __future__ import annotations

import json
import re
import shlex

import pytest
import yaml
from .deploy_helpers import (COMPOSE_FILE, DASHBOARD_FILE, GRAFANA_DIR, PROMETHEUS_DIR, REPO_ROOT, drain_timeout_s,
                            parse_cli, pip_tool, run_tool, settings_env_names)

SERVE_SERVICES = ("s3diff-gpu", "s3diff-cpu")


def check_compose_schema(path) -> tuple[int, str]:
    # check-jsonschema vendors the compose-spec schema: no network at test time.
    result = run_tool([pip_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(path)])
    return result.returncode, result.stdout + result.stderr


def test_compose_file_matches_compose_spec():
    assert check_compose_schema(COMPOSE_FILE) == (0, "ok -- validation done\n")


def test_schema_check_rejects_a_misspelt_gpu_reservation(compose, tmp_path):
    broken = json.loads(json.dumps(compose))  # deep copy with the YAML anchors resolved
    broken["services"]["s3diff-gpu"]["deploy"]["resources"]["reservations"]["gpu"] = 1
    path = tmp_path / "docker-compose.yml"
    path.write_text(yaml.safe_dump(broken))
    returncode, output = check_compose_schema(path)
    assert returncode == 1 and "reservations: 'gpu' does not match" in output


def test_gpu_profile_reserves_nvidia_gpus_and_cpu_profile_none(compose):
    gpu, cpu = (compose["services"][name] for name in SERVE_SERVICES)
    assert (gpu["profiles"], cpu["profiles"]) == (["gpu"], ["cpu"])
    assert gpu["deploy"]["resources"]["reservations"]["devices"] == [
        {"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    assert "deploy" not in cpu


@pytest.mark.parametrize("name", SERVE_SERVICES)
def test_serve_service_is_scraped_checked_and_drained(compose, name):
    service = compose["services"][name]
    assert any("/readyz" in part for part in service["healthcheck"]["test"])
    scrape_target = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())[
        "scrape_configs"][0]["static_configs"][0]["targets"][0]
    host, port = scrape_target.split(":")
    assert host in service["networks"]["default"]["aliases"]
    assert service["ports"][0].endswith(f":{port}")
    assert float(service["stop_grace_period"].removesuffix("s")) > drain_timeout_s()
    assert service["depends_on"]["weights-init"]["condition"] == "service_completed_successfully"


@pytest.mark.parametrize("name", SERVE_SERVICES)
def test_serve_command_is_accepted_by_the_cli(compose, name):
    args = parse_cli(compose["services"][name]["command"])
    assert args.command == "serve"


def test_serve_environment_names_are_settings(compose):
    names = {key for name in SERVE_SERVICES for key in compose["services"][name]["environment"]
             if key.startswith("S3DIFF_")}
    assert names and names <= settings_env_names()
    assert all(compose["services"][name]["environment"]["HF_HUB_OFFLINE"] == "1" for name in SERVE_SERVICES)


def test_weights_init_converts_only_into_an_empty_volume(compose):
    init = compose["services"]["weights-init"]
    script = init["command"][0].replace("\\\n", " ")
    defaults = {key: re.fullmatch(r"\$\{\w+:-(.*)\}", value).group(1) for key, value in init["environment"].items()}
    (convert_line,) = [line for line in script.splitlines() if line.startswith("exec ")]
    argv = shlex.split(re.sub(r"\$\$(\w+)", lambda m: defaults[m.group(1)], convert_line))
    assert argv[:2] == ["exec", "s3diff"]
    args = parse_cli(argv[2:])
    assert args.download and str(args.out) == "/weights/merged"
    assert f"[ -f {args.out}/config.json ]" in script  # written last by `s3diff convert`
    assert args.de_net.startswith("https://") and args.sd_turbo == "stabilityai/sd-turbo"


def test_grafana_is_provisioned_with_the_dashboard_and_datasource(compose):
    grafana = compose["services"]["grafana"]
    mounts = dict(volume.removesuffix(":ro").split(":") for volume in grafana["volumes"] if volume.startswith("./"))
    assert all((REPO_ROOT / source).is_dir() for source in mounts)
    provider = yaml.safe_load((GRAFANA_DIR / "provisioning/dashboards/s3diff.yml").read_text())["providers"][0]
    assert mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider['options']['path']}/{DASHBOARD_FILE.name}"
    (datasource,) = yaml.safe_load((GRAFANA_DIR / "provisioning/datasources/prometheus.yml").read_text())["datasources"]
    assert datasource["url"] == "http://prometheus:9090" and "prometheus" in compose["services"]


def test_prometheus_mounts_the_repository_config(compose):
    prometheus = compose["services"]["prometheus"]
    assert "./deploy/prometheus:/etc/prometheus:ro" in prometheus["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]


def test_weights_init_converts_mounted_release_files_offline_else_downloads(compose):
    init = compose["services"]["weights-init"]
    assert "${RELEASE_DIR:-./weights/release}:/release:ro" in init["volumes"]
    assert "/weights/" in (REPO_ROOT / ".gitignore").read_text().split()  # the default folder stays out of git
    script = init["command"][0].replace("\\\n", " ")
    (local,) = [line.strip() for line in script.splitlines() if line.strip().startswith("exec s3diff convert --dtype")]
    args = parse_cli(shlex.split(local)[2:])
    assert not args.download and str(args.out) == "/weights/merged"
    assert (args.sd_turbo, args.s3diff, args.de_net) == ("/release/sd-turbo", "/release/s3diff.pkl", "/release/de_net.pth")
    assert script.index("if [ -f /release/s3diff.pkl ]") < script.index("exec s3diff convert --download")


def test_demo_profile_serves_the_builtin_model_without_weights_init(compose):
    demo = compose["services"]["s3diff-demo"]
    assert demo["profiles"] == ["demo"] and "depends_on" not in demo
    assert "S3DIFF_WEIGHTS" not in demo["environment"]
    assert not any(volume.startswith("weights:") for volume in demo["volumes"])
    assert "demo" not in compose["services"]["weights-init"]["profiles"]
    assert parse_cli(demo["command"]).command == "serve"


@pytest.mark.parametrize("name", ("s3diff-gpu", "s3diff-cpu", "s3diff-demo"))
def test_serving_services_keep_the_compile_cache_in_a_volume(compose, name):
    service = compose["services"][name]
    assert "compile-cache:/cache/compile" in service["volumes"]
    assert service["environment"]["S3DIFF_COMPILE_CACHE"] == "/cache/compile"
    assert service["environment"]["TORCHINDUCTOR_CACHE_DIR"] == "/cache/compile/inductor"
