#!/usr/bin/env bash
# Render an eval report to PNG with headless Chromium (Debian: apt-get install chromium).
#   docs/screenshot.sh runs/eval-demo/report.html docs/eval-report.png
set -euo pipefail
report=$(realpath "${1:-runs/eval-demo/report.html}")
out=$(realpath -m "${2:-docs/eval-report.png}")
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
# The networking flags keep Chromium from phoning home (refused on a closed network, and slow).
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
  --disable-component-update --disable-sync --hide-scrollbars --user-data-dir="$profile" \
  --window-size=1100,2000 --screenshot="$out" "file://$report" 2>/dev/null
echo "wrote $out"
