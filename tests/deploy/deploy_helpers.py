"""Paths and external validators shared by the deployment tests. pip-installed validators must be
there; Prometheus' Debian binaries may be absent, and then their tests skip with the reason."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCKER_DIR = REPO_ROOT / "docker"
DEPLOY_DIR = REPO_ROOT / "deploy"
KUBERNETES_DIR = DEPLOY_DIR / "kubernetes"
PROMETHEUS_DIR = DEPLOY_DIR / "prometheus"
RULES_FILE = PROMETHEUS_DIR / "rules" / "s3diff.yml"
GRAFANA_DIR = DEPLOY_DIR / "grafana"
DASHBOARD_FILE = GRAFANA_DIR / "dashboards" / "s3diff.json"
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
DOCKERFILES = sorted(DOCKER_DIR.glob("*.Dockerfile"))


def pip_tool(name: str) -> str:
    """A validator from the `dev` extra; missing means a broken install, not a reason to skip."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not on PATH: install the dev extra (bash scripts/install-dev.sh)")
    return path


def debian_tool(name: str) -> str:
    """promtool/prometheus come from Debian's `prometheus` package (scripts/install-dev.sh)."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not installed (Debian package 'prometheus', installed by scripts/install-dev.sh as root)")
    return path


def run_tool(args: list[str], cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120)


def settings_env_names() -> set[str]:
    """The S3DIFF_* variables the service reads: one per field of its settings class."""
    from s3diff_serve.service.settings import ServiceSettings

    prefix = ServiceSettings.model_config["env_prefix"]
    return {prefix + field.upper() for field in ServiceSettings.model_fields}


def drain_timeout_s() -> float:
    from s3diff_serve.service.settings import ServiceSettings

    return ServiceSettings.model_fields["drain_timeout_s"].default


def default_max_batch() -> int:
    from s3diff_serve.service.settings import ServiceSettings

    return ServiceSettings.model_fields["max_batch"].default


def parse_cli(argv: list[str]):
    """argv as the real `s3diff` parser reads it: flags that drift from the CLI fail here."""
    from s3diff_serve.cli.main import build_parser

    return build_parser().parse_args(argv)


def dashboard_queries(dashboard: dict) -> list[str]:
    """Every PromQL expression of the Grafana dashboard: panel targets and variable queries."""
    queries = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    queries += [variable["definition"] for variable in dashboard["templating"]["list"] if variable["type"] == "query"]
    return queries


def as_plain_promql(grafana_query: str) -> str:
    """Grafana's macros replaced by values Prometheus accepts, so promtool can parse the query."""
    query = grafana_query.replace("$__rate_interval", "5m").replace("$endpoint", ".*")
    # label_values(metric, label) is Grafana's variable query, not PromQL: keep its selector.
    return re.sub(r"^label_values\((.+), *\w+\)$", r"\1", query)
