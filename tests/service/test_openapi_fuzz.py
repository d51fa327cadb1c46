"""schemathesis generates requests from the served /openapi.json (bounded: a few examples per
operation, deterministic) and runs every check on the answers: no 5xx, only documented statuses,
content types and headers, bodies matching the documented schemas, schema-valid requests
accepted, invalid ones rejected with a 4xx, 405s with a fitting `Allow`.

It runs schemathesis' own command line in a subprocess against a real server rather than its
pytest plugin: the plugin hooks into pytest internals and has broken on a new pytest release
before (the plugin is disabled in pyproject's addopts). A version pairing that breaks the CLI
fails this test with schemathesis' own output instead of an error inside a plugin.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.service.conftest import API_KEY, REPO_ROOT

SCHEMATHESIS = shutil.which("schemathesis") or shutil.which("st")
HOOKS = Path(__file__).with_name("schemathesis_hooks.py")  # real images for the image media types


@pytest.mark.skipif(SCHEMATHESIS is None, reason="schemathesis is in the dev extra")
def test_generated_requests_pass_every_check(server, tmp_path):
    report = tmp_path / "junit.xml"
    command = [SCHEMATHESIS, "run", f"{server.url}/openapi.json", "--checks", "all",
               "--max-examples", "20", "--seed", "0", "--generation-deterministic",
               "--header", f"X-API-Key: {API_KEY}", "--request-timeout", "60",
               "--report", "junit", "--report-junit-path", str(report)]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": str(HOOKS), "PYTHONPATH": str(REPO_ROOT)}
    # cwd: schemathesis keeps its state folder there
    run = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert run.returncode == 0, f"schemathesis exit {run.returncode}:\n{run.stdout[-6000:]}\n{run.stderr[-2000:]}"
    cases = ET.parse(report).getroot().iter("testcase")
    assert sum(1 for _ in cases) >= 10, "schemathesis tested fewer operations than the API has"
