"""Every metric and label the dashboard, alert rules and autoscaler query is one the service's
registry exposes (names as scraped: counters `_total`, histograms `_bucket/_sum/_count`)."""
from __future__ import annotations

import json
import re

import pytest
import yaml
from .deploy_helpers import DASHBOARD_FILE, GRAFANA_DIR, dashboard_queries

SAMPLE_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",),
                   "info": ("_info",), "summary": ("", "_sum", "_count")}
# Labels Prometheus adds at scrape time, and the bucket bound of histogram series.
SCRAPE_LABELS = {"job", "instance", "le"}
SELECTOR = re.compile(r"\b(s3diff_\w+)(?:\{([^}]*)\})?")
GROUPING = re.compile(r"\bby \(([^)]*)\)")


@pytest.fixture(scope="module")
def service_series() -> dict[str, set[str]]:
    """Scraped series name -> its label names, read from the service's own metric objects."""
    try:
        from s3diff_serve.service import metrics
    except ImportError as error:
        pytest.fail(f"the service's metrics module (service/metrics.py) does not import: {error}")
    from prometheus_client import REGISTRY
    from prometheus_client.metrics import MetricWrapperBase

    # prometheus-client has no public accessor for a labelled metric's label names.
    labels = {metric._name: set(metric._labelnames) for metric in vars(metrics).values()
              if isinstance(metric, MetricWrapperBase)}
    series = {}
    for family in REGISTRY.collect():
        if family.name in labels:
            for suffix in SAMPLE_SUFFIXES[family.type]:
                series[family.name + suffix] = labels[family.name]
    return series


def all_queries(manifests, alert_rules) -> list[str]:
    queries = dashboard_queries(json.loads(DASHBOARD_FILE.read_text()))
    queries += [rule["expr"] for group in alert_rules["groups"] for rule in group["rules"]]
    queries += [trigger["metadata"]["query"] for trigger in manifests["ScaledObject"]["spec"]["triggers"]]
    return queries


def test_service_exposes_the_metrics_of_the_contract(service_series):
    # The metric names documented in docs/service.md, "Metrics".
    assert {"s3diff_requests_total", "s3diff_request_duration_seconds_bucket", "s3diff_queue_wait_seconds_bucket",
            "s3diff_stage_duration_seconds_bucket", "s3diff_batch_size_bucket", "s3diff_queue_depth",
            "s3diff_inflight_requests", "s3diff_output_pixels_total", "s3diff_rejected_total",
            "s3diff_gpu_memory_bytes", "s3diff_model_info"} <= set(service_series)


def test_every_queried_metric_and_label_exists(manifests, alert_rules, service_series):
    for query in all_queries(manifests, alert_rules):
        selectors = SELECTOR.findall(query)
        assert selectors, f"no s3diff metric in {query!r}"
        for name, matchers in selectors:
            assert name in service_series, f"{name} (in {query!r}) is not exposed by the service"
            used = set(re.findall(r"(\w+)\s*[=!]~?", matchers))
            assert used <= service_series[name] | SCRAPE_LABELS, f"unknown label in {query!r}"
        known = set().union(*(service_series[name] for name, _ in selectors)) | SCRAPE_LABELS
        for grouping in GROUPING.findall(query):
            assert {label.strip() for label in grouping.split(",")} <= known, f"unknown grouping in {query!r}"


def test_checker_catches_a_misnamed_metric(service_series):
    # The names the check sees as scraped: the un-suffixed counter name is not one of them.
    assert "s3diff_requests" not in service_series and "s3diff_requests_total" in service_series
    assert service_series["s3diff_requests_total"] == {"endpoint", "status"}


def test_dashboard_shows_what_operators_need():
    queries = dashboard_queries(json.loads(DASHBOARD_FILE.read_text()))
    joined = "\n".join(queries)
    for quantile in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({quantile}, sum by (le) (rate(s3diff_request_duration_seconds_bucket" in joined
    for needed in ("rate(s3diff_requests_total", "s3diff_queue_depth", "s3diff_batch_size_",
                   "s3diff_gpu_memory_bytes", 'sum by (status) (rate(s3diff_requests_total{endpoint=~"/v1/.+",status=~"[45].."}'):
        assert needed in joined, needed


def test_dashboard_panels_use_the_datasource_and_do_not_overlap():
    dashboard = json.loads(DASHBOARD_FILE.read_text())
    (datasource,) = yaml.safe_load((GRAFANA_DIR / "provisioning/datasources/prometheus.yml").read_text())["datasources"]
    panel_ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(panel_ids) == len(set(panel_ids))
    covered: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == datasource["uid"]
        assert all(target["datasource"]["uid"] == datasource["uid"] for target in panel["targets"])
        grid = panel["gridPos"]
        cells = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"]) for y in range(grid["y"], grid["y"] + grid["h"])}
        assert grid["x"] + grid["w"] <= 24 and not cells & covered, panel["title"]  # Grafana's grid is 24 wide
        covered |= cells
