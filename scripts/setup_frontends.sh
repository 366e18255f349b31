#!/usr/bin/env bash
# Installs the ComfyUI frontends the browser test runs against into git-ignored .frontends/<version>/
# (each a plain `pip install --target`, no dependencies): the one ComfyUI 0.3.75 ships with and the newest
# on the package registry. Idempotent: a version whose static/index.html is present is not reinstalled.
# FRONTENDS="1.32.9 1.58.1" overrides the list; PYTHON (default .venv/bin/python) runs pip.
set -euo pipefail
cd "$(dirname "$0")/.."
FRONTENDS=${FRONTENDS:-"1.32.9 1.58.1"}
PYTHON=${PYTHON:-.venv/bin/python}
for version in $FRONTENDS; do
    dest=".frontends/$version"
    if [ -f "$dest/comfyui_frontend_package/static/index.html" ]; then
        continue
    fi
    echo "[setup_frontends] installing comfyui-frontend-package==$version into $dest"
    rm -rf "$dest"
    "$PYTHON" -m pip install --disable-pip-version-check -q --no-deps --target "$dest" \
        "comfyui-frontend-package==$version"
done
