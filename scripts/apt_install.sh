#!/usr/bin/env bash
# Installs Debian packages for the setup scripts (setup_browser.sh, setup_node_tools.sh): apt-get as root,
# else through sudo. Exits 1 without installing anything where there is no apt-get.
#   bash scripts/apt_install.sh PACKAGE...
set -euo pipefail
if ! command -v apt-get >/dev/null 2>&1; then
    echo "[apt_install] no apt-get here to install $*" >&2
    exit 1
fi
sudo=()
if [ "$(id -u)" != 0 ]; then
    sudo=(sudo)
fi
"${sudo[@]}" apt-get update -qq
DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "$@" >/dev/null
