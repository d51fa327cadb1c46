"""Fixtures for the deployment checks: the parsed compose file, Kubernetes manifests and alert
rules, and the locally built images of the stack tests."""
from __future__ import annotations

import pytest
import yaml
from .deploy_helpers import COMPOSE_FILE, KUBERNETES_DIR, RULES_FILE


@pytest.fixture(scope="session")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="session")
def kustomization() -> dict:
    return yaml.safe_load((KUBERNETES_DIR / "kustomization.yaml").read_text())


@pytest.fixture(scope="session")
def manifests(kustomization) -> dict[str, dict]:
    """Every resource of the kustomize base, keyed by kind (the base has one of each)."""
    by_kind: dict[str, dict] = {}
    for name in kustomization["resources"]:
        for document in yaml.safe_load_all((KUBERNETES_DIR / name).read_text()):
            assert document["kind"] not in by_kind, f"second {document['kind']} in {name}"
            by_kind[document["kind"]] = document
    return by_kind


@pytest.fixture(scope="session")
def alert_rules() -> dict:
    return yaml.safe_load(RULES_FILE.read_text())


SERVICE_IMAGE = "s3diff-serve:stack-test"


@pytest.fixture(scope="session")
def images() -> tuple[str, str]:
    """(service image, Prometheus image): base images from mmdebstrap (cached by content), the
    service image from docker/service.Dockerfile (Docker's layer cache makes a rebuild quick)."""
    from .images import PROMETHEUS, SERVICE_BASE, build, ensure_all, offer_local_torch_wheel
    from .stack import require_container_engine

    require_container_engine()
    base, prometheus = ensure_all(SERVICE_BASE, PROMETHEUS)
    offer_local_torch_wheel()
    build("service.Dockerfile", SERVICE_IMAGE, base)
    return SERVICE_IMAGE, prometheus
