"""The `network` marker's rule (tests/conftest.py): offline, a network test's skip is a skip; in CI
(CI=true) the same skip fails the run, and other skips stay skips."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE = '''
import pytest

@pytest.mark.network
def test_needs_a_registry():
    pytest.skip("no registry here")

def test_other_skip():
    pytest.skip("not this machine")
'''


def run_sample(tmp_path: Path, ci: str | None) -> subprocess.CompletedProcess:
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    env = {key: value for key, value in os.environ.items() if key != "CI"}
    env["PYTHONPATH"] = str(REPO_ROOT)
    if ci is not None:
        env["CI"] = ci
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "tests.conftest", "-q", "-rA", "-p", "no:cacheprovider",
                           "--rootdir", str(tmp_path), "-o", "markers=network: x", str(tmp_path)],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)


@pytest.mark.parametrize("ci", [None, "false"])
def test_outside_ci_a_network_skip_is_a_skip(tmp_path, ci):
    run = run_sample(tmp_path, ci)
    assert run.returncode == 0, run.stdout
    assert "2 skipped" in run.stdout


def test_in_ci_a_network_skip_fails_the_run(tmp_path):
    run = run_sample(tmp_path, "true")
    assert run.returncode == 1, run.stdout
    assert "FAILED" in run.stdout and "test_needs_a_registry" in run.stdout
    assert "must run: Skipped: no registry here" in run.stdout and "1 failed, 1 skipped" in run.stdout
