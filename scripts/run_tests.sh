#!/usr/bin/env bash
# Runs the whole suite once per ComfyUI leg of the test matrix, each leg in its own venv, and prints a
# summary; exits non-zero when any leg failed (pytest's "no tests collected" included). Every leg runs.
# The legs run side by side (each is one process with one torch thread, so two legs use the two cores
# of the CI machine); every output line is prefixed with its leg's name.
#
#   LEGS="0.3.75 0.33.0"  the legs (default both; `make env` builds them)
#   PARALLEL=0            one leg after the other, output unprefixed
#   TESTS=...             the test files or folders (default tests, the whole suite)
#   PYTEST_ARGS=...       extra pytest arguments for every leg, e.g. "-x" or "-k sampler"
#   LEG_TIMEOUT=4200      seconds a leg may run; then pytest is interrupted, which prints the test that
#                         was running and its traceback, and the leg fails
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
PARALLEL=${PARALLEL:-1}
LEG_TIMEOUT=${LEG_TIMEOUT:-4200}
# The tiny test models gain nothing from more threads; on a busy 2-core machine OpenMP's extra threads
# made each model call ~10x slower. Servers the tests start inherit this.
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
results=$(mktemp -d)
trap 'rm -rf "$results"' EXIT

leg_name() {
    case "$1" in
        0.3.75) echo "ComfyUI 0.3.75" ;;
        0.33.0) echo "ComfyUI 0.33.0" ;;
        custom) echo "ComfyUI at $COMFYUI_PATH" ;;
    esac
}

run_leg() {  # run_leg LEG: one pytest session; writes "<exit code> <seconds>" to $results/LEG
    local leg=$1 python leg_env start rc
    case "$leg" in
        0.3.75) python=.venv/bin/python; leg_env=(env -u COMFYUI_PATH AMDM_COMFYUI_VERSION=0.3.75) ;;
        0.33.0) python=.venv-0.33/bin/python
                leg_env=(env COMFYUI_PATH="$PWD/.runtimes/comfyui-0.33.0" AMDM_COMFYUI_VERSION=0.33.0) ;;
        custom) python=.venv/bin/python; leg_env=(env) ;;
    esac
    echo "================ leg: $(leg_name "$leg") ($python), started $(date -u +%H:%M:%S) UTC ================"
    start=$SECONDS
    # Its own temp root: two pytest sessions side by side never share (or clean up) each other's folders.
    timeout -s INT -k 60 "$LEG_TIMEOUT" "${leg_env[@]}" "$python" -m pytest -c tests/pytest.ini --rootdir tests \
        --basetemp "$results/tmp-$leg" --durations=12 "${tests[@]}" "${pytest_args[@]}"
    rc=$?
    if [ "$rc" = 124 ] || [ "$rc" = 130 ]; then
        echo "[run_tests] $(leg_name "$leg"): stopped after LEG_TIMEOUT=$LEG_TIMEOUT s"
    fi
    echo "$rc $((SECONDS - start))" > "$results/$leg"
}

for leg in $LEGS; do
    case "$leg" in
        0.3.75|0.33.0|custom) ;;
        *) echo "[run_tests] unknown leg '$leg': use 0.3.75 and/or 0.33.0" >&2; exit 2 ;;
    esac
done
if [ "$PARALLEL" = 1 ] && [ "$(wc -w <<< "$LEGS")" -gt 1 ]; then
    for leg in $LEGS; do
        run_leg "$leg" 2>&1 | sed -u "s/^/[$leg] /" &
    done
    wait
else
    for leg in $LEGS; do
        echo
        run_leg "$leg"
    done
fi

echo
echo "================ test matrix summary ================"
failed=0
for leg in $LEGS; do
    read -r rc seconds < "$results/$leg" || { rc=missing; seconds=0; }
    if [ "$rc" = 0 ]; then verdict=PASSED; else verdict="FAILED (pytest exit code $rc)"; failed=1; fi
    echo "  $(leg_name "$leg"): $verdict in $seconds s"
done
exit "$failed"
