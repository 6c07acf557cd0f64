#!/usr/bin/env bash
# The serving benchmark, side by side with the baselines, in one run on loopback.
# usage: bench/run.sh [--rounds N] [--no-runagent] [--baseline-agentry OLD_BINARY]   (about 6 minutes with RunAgent)
set -euo pipefail
cd "$(dirname "$0")/.."
command -v wrk >/dev/null || { echo "installing wrk"; apt-get install -y -qq wrk >/dev/null; }
VENV="${AGENTRY_BENCH_VENV:-${AGENTRY_TEST_RUNAGENT_VENV:-$PWD/target/runagent-venv}}"
if [ ! -x "$VENV/bin/runagent" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check runagent==0.1.49
fi
cargo build --release --locked -p agentry
exec "$VENV/bin/python" bench/run.py --agentry target/release/agentry --venv "$VENV" "$@"
