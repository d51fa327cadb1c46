#!/usr/bin/env bash
# Development / CI install: the package with every extra, plus the system tools the test suite
# drives for real (Prometheus' promtool and server, headless Chromium). Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."

# torch first, pinned: an unpinned torch resolves to a multi-GB CUDA build. The lock leaves torch
# out on purpose so that the CUDA image can install the CUDA build of the same release.
python3 -m pip install "torch==2.13.0"
# Every other dependency exactly as the suite was last green with (hashes checked), then the
# package itself without resolving anything again. Refresh the lock: scripts/lock.sh
python3 -m pip install --require-hashes -r requirements/lock.txt
python3 -m pip install --no-deps -e .

if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends prometheus chromium >/dev/null
else
    echo "not root or no apt-get: skipping prometheus/chromium (their tests will skip with a reason)"
fi
