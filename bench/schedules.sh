#!/usr/bin/env bash
# Schedule precision: 1,000 every-second schedules on one node (SQLite), 30 s measured.
# usage: bench/schedules.sh [--n 1000] [--seconds 30] [--workers 2]   (about a minute)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -p agentry
exec python3 bench/schedules.py --agentry target/release/agentry "$@"
