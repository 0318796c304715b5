#!/usr/bin/env bash
# Quick start, command 2: install what the tests need and run the whole suite.
source "$(dirname "$0")/_env.sh"
apt_install mosquitto sqlite3 ca-certificates dbus libdbus-1-dev libglib2.0-dev pkg-config gcc chromium
# Node.js for the front-end step: scripts/frontend.sh installs it only where npm is missing
# (a machine with Node.js from elsewhere would conflict with Debian's npm)
ensure_venv test
# the appliance's image build and boot test (slow-marked, run here too): see docs/appliance.md
bash "$ROOT/scripts/appliance-tools.sh"
export SITEWARD_REQUIRE_BOOT_TEST=1
bash "$ROOT/scripts/frontend.sh"
cd "$ROOT"
"$VENV/bin/ruff" check .
set +e
"$VENV/bin/python" -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "pytest collected no tests: that is a failure here" >&2
    exit 1
fi
exit "$rc"
