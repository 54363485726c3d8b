#!/usr/bin/env bash
# Debian's chromium, for tests/e2e/test_console.py (Playwright drives the system browser: its own browser
# download cannot reach the internet here). Skips the install when a chromium is already on PATH.
# Usage (as root, or with sudo): bash scripts/install_chromium.sh
set -euo pipefail
if command -v chromium >/dev/null || command -v chromium-browser >/dev/null; then
  exit 0
fi
sudo=""
if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -q
$sudo apt-get install -y -q chromium
