#!/usr/bin/env bash
# The durable-runs benchmark: Agentry's /v1/runs (SQLite; PostgreSQL with one node and with two)
# against Celery + Redis and PgQueuer, same load, same run; then the create-and-wait path.
# usage: bench/runs.sh [--rounds N] [--n 10000] [--threads 32] [--only celery,pgqueuer,sqlite,pg1,pg2]
#                      [--pg-url URL] [--wait-seconds 10] [--baseline-agentry OLD_BINARY]
# (about 2 minutes a round)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${AGENTRY_CELERY_VENV:-$PWD/target/celery-venv}"
PGQ_VENV="${AGENTRY_PGQUEUER_VENV:-$PWD/target/pgqueuer-venv}"
if [ ! -x "$VENV/bin/celery" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check -c bench/celery-baseline/constraints.txt "celery[redis]"
fi
if [ ! -x "$PGQ_VENV/bin/python" ] || ! "$PGQ_VENV/bin/python" -c "import pgqueuer" 2>/dev/null; then
  python3 -m venv "$PGQ_VENV"
  "$PGQ_VENV/bin/pip" install -q --disable-pip-version-check -r bench/pgqueuer/constraints.txt
fi
if ! "$VENV/bin/python" -c "import redis; redis.Redis(host='127.0.0.1', port=6379, socket_connect_timeout=1).ping()" 2>/dev/null; then
  command -v redis-server >/dev/null || { apt-get update -qq && apt-get install -y -qq redis-server; }
  redis-server --bind 127.0.0.1 --port 6379 --save "" --appendonly no --daemonize yes >/dev/null
  sleep 0.5
fi
if ! pg_isready -q -h 127.0.0.1 -p 5432; then
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start
  for _ in $(seq 50); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 0.2; done
fi
command -v wrk >/dev/null || { apt-get install -y -qq wrk >/dev/null; }
cargo build --release --locked -p agentry -p agentry-loadgen
exec "$VENV/bin/python" bench/runs.py --agentry target/release/agentry \
  --loadgen target/release/agentry-loadgen --celery-venv "$VENV" --pgqueuer-venv "$PGQ_VENV" "$@"
