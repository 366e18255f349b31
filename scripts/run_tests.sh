#!/usr/bin/env bash
# Runs the whole suite once per ComfyUI leg of the test matrix, each leg in its own venv, and prints a
# summary; exits non-zero when any leg failed (pytest's "no tests collected" included). Every leg runs.
#
#   LEGS="0.3.75 0.33.0"  the legs (default both; `make env` builds them)
#   TESTS=...             the test files or folders (default tests, the whole suite)
#   PYTEST_ARGS=...       extra pytest arguments for every leg, e.g. "-x" or "-k sampler"
#   COMFYUI_PATH=...      instead of the matrix, one leg against your own ComfyUI checkout in .venv
set -uo pipefail
cd "$(dirname "$0")/.."
read -r -a tests <<< "${TESTS:-tests}"
read -r -a pytest_args <<< "${PYTEST_ARGS:-}"
if [ -n "${COMFYUI_PATH:-}" ]; then
    LEGS=custom
else
    LEGS=${LEGS:-"0.3.75 0.33.0"}
fi
summary=()
failed=0
for leg in $LEGS; do
    case "$leg" in
        0.3.75) name="ComfyUI 0.3.75"; python=.venv/bin/python
                leg_env=(env -u COMFYUI_PATH AMDM_COMFYUI_VERSION=0.3.75) ;;
        0.33.0) name="ComfyUI 0.33.0"; python=.venv-0.33/bin/python
                leg_env=(env COMFYUI_PATH="$PWD/.runtimes/comfyui-0.33.0" AMDM_COMFYUI_VERSION=0.33.0) ;;
        custom) name="ComfyUI at $COMFYUI_PATH"; python=.venv/bin/python; leg_env=(env) ;;
        *) echo "[run_tests] unknown leg '$leg': use 0.3.75 and/or 0.33.0" >&2; exit 2 ;;
    esac
    echo
    echo "================ leg: $name ($python) ================"
    start=$SECONDS
    "${leg_env[@]}" "$python" -m pytest -c tests/pytest.ini --rootdir tests "${tests[@]}" "${pytest_args[@]}"
    rc=$?
    if [ "$rc" = 0 ]; then verdict=PASSED; else verdict="FAILED (pytest exit code $rc)"; failed=1; fi
    summary+=("  $name: $verdict in $((SECONDS - start)) s")
done
echo
echo "================ test matrix summary ================"
printf '%s\n' "${summary[@]}"
exit "$failed"
