#!/usr/bin/env bash
# The durable-runs benchmark: Agentry's /v1/runs against Celery + Redis, same load, same run.
# usage: bench/runs.sh [--rounds N] [--n 10000] [--threads 32] [--baseline-agentry OLD_BINARY]   (about 2 minutes for 3 rounds)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${AGENTRY_CELERY_VENV:-$PWD/target/celery-venv}"
if [ ! -x "$VENV/bin/celery" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check -c bench/celery-baseline/constraints.txt "celery[redis]"
fi
if ! "$VENV/bin/python" -c "import redis; redis.Redis(host='127.0.0.1', port=6379, socket_connect_timeout=1).ping()" 2>/dev/null; then
  command -v redis-server >/dev/null || { apt-get update -qq && apt-get install -y -qq redis-server; }
  redis-server --bind 127.0.0.1 --port 6379 --save "" --appendonly no --daemonize yes >/dev/null
  sleep 0.5
fi
cargo build --release --locked -p agentry -p agentry-loadgen
exec "$VENV/bin/python" bench/runs.py --agentry target/release/agentry \
  --loadgen target/release/agentry-loadgen --celery-venv "$VENV" "$@"
