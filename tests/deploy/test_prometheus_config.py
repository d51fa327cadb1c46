"""Prometheus' own checker on the compose config and the alert rules, its rule unit tests
(alert_rules_test.yml), and every dashboard / autoscaler query parsed by Prometheus."""
from __future__ import annotations

import json

import yaml
from .deploy_helpers import (DASHBOARD_FILE, PROMETHEUS_DIR, RULES_FILE, as_plain_promql, dashboard_queries,
                            debian_tool, run_tool)

ALERT_TESTS = PROMETHEUS_DIR.parents[1] / "tests" / "deploy" / "alert_rules_test.yml"


def test_promtool_accepts_the_config_and_finds_the_rules():
    result = run_tool([debian_tool("promtool"), "check", "config", str(PROMETHEUS_DIR / "prometheus.yml")])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 1 rule files found" in result.stdout


def test_promtool_accepts_the_rules():
    result = run_tool([debian_tool("promtool"), "check", "rules", str(RULES_FILE)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 3 rules found" in result.stdout


def test_alerts_fire_on_bad_series_and_stay_quiet_on_healthy_ones():
    # Expected alerts, labels and rendered annotations are in alert_rules_test.yml.
    result = run_tool([debian_tool("promtool"), "test", "rules", str(ALERT_TESTS)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_dashboard_and_scaler_query_parses(manifests, tmp_path):
    queries = dashboard_queries(json.loads(DASHBOARD_FILE.read_text()))
    queries += [trigger["metadata"]["query"] for trigger in manifests["ScaledObject"]["spec"]["triggers"]]
    rules = {"groups": [{"name": "queries", "rules": [
        {"record": f"check:query_{index}", "expr": as_plain_promql(query)} for index, query in enumerate(queries)]}]}
    rules_file = tmp_path / "queries.yml"
    rules_file.write_text(yaml.safe_dump(rules))
    result = run_tool([debian_tool("promtool"), "check", "rules", str(rules_file)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(queries)} rules found" in result.stdout


def test_promql_check_rejects_a_broken_query(tmp_path):
    rules_file = tmp_path / "broken.yml"
    rules_file.write_text(yaml.safe_dump({"groups": [{"name": "q", "rules": [
        {"record": "check:broken", "expr": as_plain_promql("sum(rate(s3diff_requests_total[$__rate_interval])")}]}]}))
    result = run_tool([debian_tool("promtool"), "check", "rules", str(rules_file)])
    assert result.returncode == 1 and "unclosed left parenthesis" in result.stdout + result.stderr
