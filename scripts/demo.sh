#!/usr/bin/env bash
# The main job: serve the embedded tiny model, run an example inferlet against the server
# (built on first use), print its output, and stop the server.
#
#   bash scripts/demo.sh [APP] [-- ARGS...]     (default: inferlets/fork_choices/app.py)
#
# LOOM_PORT picks the port (default 8080).
set -euo pipefail
cd "$(dirname "$0")/.."
PORT=${LOOM_PORT:-8080}
URL="http://127.0.0.1:$PORT"
APP=${1:-inferlets/fork_choices/app.py}
shift || true
[ "${1:-}" = "--" ] && shift
if [ $# -eq 0 ]; then set -- "Once upon a time"; fi

.venv/bin/loom serve --model tiny --port "$PORT" &
SERVER=$!
trap 'kill "$SERVER" 2>/dev/null || true; wait "$SERVER" 2>/dev/null || true' EXIT

# Wait for the server (loading the model takes a few seconds; the first run makes it).
for _ in $(seq 1 300); do
  if .venv/bin/python -c "import httpx, sys; httpx.get(sys.argv[1], timeout=1).raise_for_status()" \
      "$URL/health" >/dev/null 2>&1; then
    break
  fi
  if ! kill -0 "$SERVER" 2>/dev/null; then
    echo "demo: the server exited" >&2
    exit 1
  fi
  sleep 0.5
done

.venv/bin/loom run "$APP" --server "$URL" -- "$@"
