#!/usr/bin/env bash
# Creates .venv (once) and installs edarnn with its test extras into it. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[dev]"
