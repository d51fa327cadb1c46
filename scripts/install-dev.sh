#!/usr/bin/env bash
# Development / CI install: the package with every extra, plus the system tools the test suite
# drives for real (Prometheus' promtool and server, headless Chromium). Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."

# torch first, pinned: an unpinned torch resolves to a multi-GB CUDA build.
python3 -m pip install "torch==2.13.0"
python3 -m pip install -e ".[dev]"

if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends prometheus chromium >/dev/null
else
    echo "not root or no apt-get: skipping prometheus/chromium (their tests will skip with a reason)"
fi
