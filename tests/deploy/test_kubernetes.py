"""The kustomize base: schema-valid manifests whose names, labels, ports, paths and timings agree
with each other, with the image and with the service's settings and CLI."""
from __future__ import annotations

import importlib
import re
import shlex
import shutil

import kubernetes_validate
import pytest
import yaml
from .deploy_helpers import (DOCKER_DIR, KUBERNETES_DIR, default_max_batch, drain_timeout_s, parse_cli, run_tool,
                             settings_env_names)

# Oldest Kubernetes still widely run, and the newest kubernetes-validate knows.
KUBERNETES_VERSIONS = ("1.29", kubernetes_validate.utils.latest_version())
# kubernetes-validate ships schemas for built-in kinds only. For the CRDs, cloudcoil's model
# packages are generated from KEDA's and the Prometheus operator's published CRD schemas.
CRD_MODELS = {"ScaledObject": "cloudcoil.models.keda.v1alpha1", "ServiceMonitor": "cloudcoil.models.prometheus_operator.v1",
              "PrometheusRule": "cloudcoil.models.prometheus_operator.v1"}


def server_container(deployment: dict) -> dict:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def test_kustomization_lists_every_manifest(kustomization):
    on_disk = {path.name for path in KUBERNETES_DIR.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(kustomization["resources"]) == sorted(on_disk)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_builtin_kinds_pass_strict_schema(manifests, version):
    builtin = {kind: doc for kind, doc in manifests.items() if kind not in CRD_MODELS}
    assert set(builtin) == {"Deployment", "Service", "PodDisruptionBudget", "PersistentVolumeClaim", "Job"}
    for document in builtin.values():
        kubernetes_validate.validate(document, version, strict=True)


def test_strict_schema_rejects_an_unknown_field(manifests):
    deployment = yaml.safe_load(yaml.safe_dump(manifests["Deployment"]))
    deployment["spec"]["template"]["spec"]["containers"][0]["startupprobe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError, match="'startupprobe' was unexpected"):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)


@pytest.mark.parametrize("kind", sorted(CRD_MODELS))
def test_custom_resources_match_their_crd_models(manifests, kind):
    # The models ignore unknown fields, so compare the round trip: a misspelt field is dropped.
    document = manifests[kind]
    # Imported here: the generated models take seconds to import, which test collection need not pay.
    model = getattr(importlib.import_module(CRD_MODELS[kind]), kind)
    parsed = model.model_validate(document)
    assert parsed.model_dump(by_alias=True, exclude_none=True, mode="json") == document


def test_kustomize_renders_the_base(manifests):
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed: kustomize rendering not checked (the manifests are validated one by one)")
    result = run_tool([kubectl, "kustomize", str(KUBERNETES_DIR)])
    assert result.returncode == 0, result.stderr
    rendered = {doc["kind"]: doc for doc in yaml.safe_load_all(result.stdout)}
    assert set(rendered) == set(manifests)
    assert all(doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "s3diff" for doc in rendered.values())


def test_each_pod_gets_one_gpu(manifests):
    resources = server_container(manifests["Deployment"])["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 1
    assert {"cpu", "memory"} <= set(resources["requests"])


def test_probes_give_weight_loading_time_then_track_readiness(manifests):
    container = server_container(manifests["Deployment"])
    port_names = {port["name"] for port in container["ports"]}
    startup, readiness, liveness = (container[probe] for probe in ("startupProbe", "readinessProbe", "livenessProbe"))
    assert startup["httpGet"]["path"] == readiness["httpGet"]["path"] == "/readyz"
    assert liveness["httpGet"]["path"] == "/healthz"
    assert {probe["httpGet"]["port"] for probe in (startup, readiness, liveness)} <= port_names
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300


def test_grace_period_covers_prestop_sleep_and_drain(manifests):
    pod = manifests["Deployment"]["spec"]["template"]["spec"]
    pre_stop = server_container(manifests["Deployment"])["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] > int(pre_stop[1]) + drain_timeout_s()


def test_server_container_matches_image_cli_and_settings(manifests):
    container = server_container(manifests["Deployment"])
    assert parse_cli(container["args"]).command == "serve"
    assert {env["name"] for env in container["env"] if env["name"].startswith("S3DIFF_")} <= settings_env_names()
    assert {"name": "HF_HUB_OFFLINE", "value": "1"} in container["env"]
    image_user = re.search(r"^USER (\d+)", (DOCKER_DIR / "service.Dockerfile").read_text(), re.M).group(1)
    assert manifests["Deployment"]["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == int(image_user)
    assert re.search(r"S3DIFF_PORT=(\d+)", (DOCKER_DIR / "service.Dockerfile").read_text()).group(1) == str(
        container["ports"][0]["containerPort"])


def test_selectors_reach_the_server_pods(manifests):
    deployment, service, budget = manifests["Deployment"], manifests["Service"], manifests["PodDisruptionBudget"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert budget["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] in {p["name"] for p in server_container(deployment)["ports"]}


def test_service_monitor_scrapes_the_service(manifests):
    monitor, service = manifests["ServiceMonitor"], manifests["Service"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {port["name"] for port in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"


def test_scaled_object_scales_the_deployment_on_its_queue(manifests):
    scaled, deployment, service = manifests["ScaledObject"], manifests["Deployment"], manifests["Service"]
    assert scaled["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    queries = {trigger["metadata"]["query"] for trigger in scaled["spec"]["triggers"] if trigger["type"] == "prometheus"}
    # The operator names a ServiceMonitor's job after the Service.
    assert queries == {f'sum({metric}{{job="{service["metadata"]["name"]}"}})'
                       for metric in ("s3diff_queue_depth", "s3diff_inflight_requests")}
    # Per pod: one full batch waiting; one batch running plus one waiting.
    thresholds = {trigger["name"]: float(trigger["metadata"]["threshold"]) for trigger in scaled["spec"]["triggers"]}
    assert thresholds == {"queue-depth": default_max_batch(), "inflight-requests": 2 * default_max_batch()}


def test_prometheus_rule_equals_the_compose_rules(manifests, alert_rules):
    assert manifests["PrometheusRule"]["spec"]["groups"] == alert_rules["groups"]


def test_weights_job_and_pods_share_the_claim(manifests):
    claim = manifests["PersistentVolumeClaim"]["metadata"]["name"]
    job_pod = manifests["Job"]["spec"]["template"]["spec"]
    server_pod = manifests["Deployment"]["spec"]["template"]["spec"]
    for pod in (job_pod, server_pod):
        claims = [v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v]
        assert claims == [claim]
    (weights_env,) = [env["value"] for env in server_container(manifests["Deployment"])["env"] if env["name"] == "S3DIFF_WEIGHTS"]
    (convert,) = job_pod["containers"]
    script = convert["args"][0].replace("\\\n", " ")
    (exec_line,) = [line for line in script.splitlines() if line.startswith("exec ")]
    env = {item["name"]: item["value"] for item in convert["env"] if "value" in item}
    args = parse_cli(shlex.split(re.sub(r"\$(\w+)", lambda m: env[m.group(1)], exec_line))[2:])
    assert str(args.out) == weights_env and args.download
    assert f"[ -f {weights_env}/config.json ]" in script
