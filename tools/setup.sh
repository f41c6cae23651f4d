#!/usr/bin/env bash
# Creates .venv (CPU torch 2.13.0 first, so no CUDA build is ever pulled) and installs shardface
# with its test extras in editable mode. Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]"
# The end-to-end monitoring test scrapes the run with a real Prometheus server (Debian package).
if ! command -v prometheus >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus) >/dev/null 2>&1 \
        || echo "setup: could not install prometheus; the scrape test will be skipped" >&2
fi
