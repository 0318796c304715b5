#!/usr/bin/env bash
# The web UI's front-end step: install the pinned npm packages (package-lock.json, `npm ci`)
# and copy the files the gateway serves into gateway/web/static/vendor/ (git-ignored).
# Run by scripts/run.sh, scripts/test.sh and the image build; cheap when nothing changed.
source "$(dirname "$0")/_env.sh"
FRONTEND="$ROOT/gateway/web/frontend"
VENDOR="$ROOT/gateway/web/static/vendor"
command -v npm >/dev/null || apt_install nodejs npm
stamp="$VENDOR/.lock-$(sha256sum "$FRONTEND/package-lock.json" | cut -c1-16)"
if [ -f "$stamp" ] && [ -f "$VENDOR/uPlot.iife.min.js" ]; then
    exit 0
fi
# --ignore-scripts: no install hook of any package runs on the build machine
(cd "$FRONTEND" && npm ci --no-audit --no-fund --ignore-scripts --loglevel=error)
rm -rf "$VENDOR"
mkdir -p "$VENDOR"
cp "$FRONTEND/node_modules/uplot/dist/uPlot.iife.min.js" "$FRONTEND/node_modules/uplot/dist/uPlot.min.css" "$VENDOR/"
# the MIT licence travels with the copy that is served
cp "$FRONTEND/node_modules/uplot/LICENSE" "$VENDOR/uPlot.LICENSE.txt"
touch "$stamp"
echo "front-end assets ready in ${VENDOR#"$ROOT"/}"
