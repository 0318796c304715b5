#!/usr/bin/env bash
# Quick start, command 1: set everything up and run the gateway with simulated nodes.
# Then open http://localhost:8080 (the admin password is printed, or set SITEWARD_WEB__ADMIN_PASSWORD).
source "$(dirname "$0")/_env.sh"
apt_install ca-certificates
ensure_venv test
bash "$ROOT/scripts/frontend.sh"
cd "$ROOT"
exec "$VENV/bin/siteward" run "$@"
