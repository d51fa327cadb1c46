"""schemathesis generates requests from the served /openapi.json (bounded: a few examples per
operation) and none may get a 5xx."""
from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is in the dev extra")
from hypothesis import HealthCheck, settings  # noqa: E402

from tests.service.conftest import API_KEY  # noqa: E402


@pytest.fixture(scope="module")
def api_schema(server):
    return schemathesis.openapi.from_url(f"{server.url}/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=6, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_generated_requests_never_get_a_5xx(case):
    response = case.call(headers={"X-API-Key": API_KEY}, timeout=60)
    assert response.status_code < 500, (case.method, case.path, response.status_code, response.text[:300])
