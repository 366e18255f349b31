#!/usr/bin/env bash
# Installs the npm packages the tests run into git-ignored .node_modules_test/ (`npm install --prefix`),
# pinned: semver, the node-semver library that the ComfyUI frontend's Manager evaluates a pack's
# requires-comfyui with (tests/test_manager_install.py runs the range through it). Idempotent: an
# installed package of the pinned version is not reinstalled. Needs Node.js with npm; on Debian without
# them it installs the `nodejs` and `npm` packages.
set -euo pipefail
cd "$(dirname "$0")/.."
SEMVER_VERSION=7.7.3
dest=.node_modules_test
installed=$(node -p "require('./$dest/node_modules/semver/package.json').version" 2>/dev/null || true)
if [ "$installed" = "$SEMVER_VERSION" ]; then
    exit 0
fi
if ! command -v npm >/dev/null 2>&1; then
    echo "[setup_node_tools] installing Debian's nodejs and npm"
    bash scripts/apt_install.sh nodejs npm || {
        echo "[setup_node_tools] no npm found: install Node.js 18 or newer (with npm)" >&2
        exit 1
    }
fi
echo "[setup_node_tools] installing semver@$SEMVER_VERSION into $dest"
npm install --prefix "$dest" --no-audit --no-fund --no-save --silent "semver@$SEMVER_VERSION"
