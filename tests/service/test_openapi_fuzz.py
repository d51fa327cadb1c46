"""schemathesis generates requests from the served /openapi.json (bounded: a few examples per
operation, deterministic) and none may get a 5xx.

It runs schemathesis' own command line in a subprocess against a real server rather than its
pytest plugin: the plugin hooks into pytest internals and has broken on a new pytest release
before (the plugin is disabled in pyproject's addopts). A version pairing that breaks the CLI
fails this test with schemathesis' own output instead of an error inside a plugin.
"""
from __future__ import annotations

import shutil
import subprocess
import xml.etree.ElementTree as ET

import pytest

from tests.service.conftest import API_KEY

SCHEMATHESIS = shutil.which("schemathesis") or shutil.which("st")


@pytest.mark.skipif(SCHEMATHESIS is None, reason="schemathesis is in the dev extra")
def test_generated_requests_never_get_a_5xx(server, tmp_path):
    report = tmp_path / "junit.xml"
    command = [SCHEMATHESIS, "run", f"{server.url}/openapi.json", "--checks", "not_a_server_error",
               "--max-examples", "6", "--seed", "0", "--generation-deterministic",
               "--header", f"X-API-Key: {API_KEY}", "--request-timeout", "60",
               "--report", "junit", "--report-junit-path", str(report)]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)  # its state folder
    assert run.returncode == 0, f"schemathesis exit {run.returncode}:\n{run.stdout[-4000:]}\n{run.stderr[-2000:]}"
    cases = ET.parse(report).getroot().iter("testcase")
    assert sum(1 for _ in cases) >= 5, "schemathesis tested fewer operations than the API has"
