#!/usr/bin/env bash
# Screenshots of the TensorBoard sidecar on a short demo run, for a human to look at.
#
#   ci/screenshot_tensorboard.sh [folder]     # default: a new temporary folder
#
# Runs tests/test_tensorboard.py with MEEBS_TENSORBOARD_SCREENSHOTS set, which keeps
# tensorboard_scalars.png (time series: loss and lr charts) and tensorboard_images.png
# (the sample images). Needs chromium (Debian: apt-get install -y chromium); without it
# the screenshot tests skip and only the HTTP checks run.
set -euo pipefail
cd "$(dirname "$0")/.."
folder="$(realpath -m "${1:-$(mktemp -d)}")"
python="${PYTHON:-.venv/bin/python}"
command -v chromium >/dev/null || echo "warning: chromium not installed: no screenshots" >&2
MEEBS_TENSORBOARD_SCREENSHOTS="$folder" "$python" -m pytest -q tests/test_tensorboard.py
ls -l "$folder"/tensorboard_*.png 2>/dev/null || true
