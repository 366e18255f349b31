#!/usr/bin/env bash
# Installs the browser the browser test drives: Debian's `chromium` package (Playwright's own browser
# download is not used: `playwright install` is never run; tests launch this binary through
# executable_path). Idempotent: does nothing when a chromium binary is already present.
# Set CHROMIUM=/path/to/chrome to use another Chromium/Chrome build instead.
set -euo pipefail
if [ -n "${CHROMIUM:-}" ] && [ -x "$CHROMIUM" ]; then
    exit 0
fi
for candidate in /usr/lib/chromium/chromium /usr/bin/chromium /usr/bin/chromium-browser; do
    if [ -x "$candidate" ]; then
        exit 0
    fi
done
echo "[setup_browser] installing Debian's chromium (about a minute)"
bash "$(dirname "$0")/apt_install.sh" chromium || {
    echo "[setup_browser] no chromium found: install Chromium and set CHROMIUM=/path/to/it" >&2
    exit 1
}
echo "[setup_browser] ready: $(command -v chromium)"
