"""Schedule precision: N every-second schedules on one node (SQLite), all due on the same whole
seconds (the worst case: they fire together, as crons on second boundaries do), or with
`--spread` their phases spread evenly over the second (as `every` schedules made at different
times are). Reports, over
the measured window, fire time minus slot time (when the node fired it) and code start minus
slot time (when the agent's code began: scheduling, run creation, dispatch, worker), p50/p99/max,
and the CPU it cost: the server's and its Python workers', per second and per fire.

usage: python3 bench/schedules.py --agentry target/release/agentry [--n 1000] [--seconds 30]
"""
import argparse
import datetime
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(__file__))
from proc_cpu import tree_cpu_s  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def call(base, method, path, body=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(base + path, data=data, method=method,
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read() or b"null")


def ms(text):
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1000


def pct(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--agentry", required=True)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--seconds", type=int, default=30)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--spread", action="store_true",
                    help="phases spread evenly over the second instead of all on whole seconds")
    args = ap.parse_args()
    state = tempfile.mkdtemp()
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    server = subprocess.Popen(
        [args.agentry, "serve", os.path.join(ROOT, "tests/fixtures/agents/durable"), "--port",
         str(port), "--state-dir", state, "--workers", str(args.workers), "--no-runagent-db"],
        stderr=subprocess.PIPE, text=True)
    for line in server.stderr:
        if re.search(r"ready on", line):
            break
    base = f"http://127.0.0.1:{port}"
    # Every schedule's slots are whole seconds, starting a few seconds from now.
    first = (int(time.time()) + 5 + args.n // 500) * 1000
    ids = []
    for i in range(args.n):
        phase = (i * 1000 // args.n) if args.spread else 0
        start_at = datetime.datetime.fromtimestamp((first + phase) / 1000,
                                                   datetime.timezone.utc).isoformat()
        ids.append(call(base, "POST", "/v1/schedules", {
            "agent": "durable", "entrypoint": "work", "input": {"i": i}, "every": "1s",
            "start_at": start_at})["id"])
    while time.time() * 1000 < first + 2000:  # two seconds of warm-up
        time.sleep(0.05)
    window_start = (int(time.time()) + 1) * 1000
    while time.time() * 1000 < window_start:
        time.sleep(0.001)
    cpu0 = (tree_cpu_s(server.pid), time.time())
    server_only0 = tree_cpu_s_only(server.pid)
    time.sleep(args.seconds)
    cpu1 = (tree_cpu_s(server.pid), time.time())
    server_only1 = tree_cpu_s_only(server.pid)
    window_end = window_start + args.seconds * 1000
    for sid in ids:
        call(base, "POST", f"/v1/schedules/{sid}/pause")
    fire_lag, start_lag, slots = [], [], 0
    run_slot = {}
    for sid in ids:
        page = call(base, "GET", f"/v1/schedules/{sid}/fires?limit=500")
        for f in page["fires"]:
            slot = ms(f["slot"])
            if window_start <= slot < window_end and f["outcome"] == "created":
                slots += 1
                fire_lag.append(ms(f["fired_at"]) - slot)
                run_slot[f["run_id"]] = slot
    cursor = ""
    while True:
        page = call(base, "GET", f"/v1/runs?limit=500&cursor={cursor}")
        for r in page["runs"]:
            if r["id"] in run_slot and r["started_at"]:
                start_lag.append(ms(r["started_at"]) - run_slot[r["id"]])
        cursor = page["next_cursor"]
        if not cursor:
            break
    server.terminate()
    server.wait()
    wall = cpu1[1] - cpu0[1]
    expected = args.n * args.seconds
    out = {
        "schedules": args.n, "seconds": args.seconds, "spread": args.spread, "slots_expected": expected,
        "slots_fired": slots, "workers": args.workers,
        "fire_minus_slot_ms": {"p50": pct(fire_lag, 0.5), "p99": pct(fire_lag, 0.99),
                               "max": max(fire_lag)},
        "start_minus_slot_ms": {"p50": pct(start_lag, 0.5), "p99": pct(start_lag, 0.99),
                                "max": max(start_lag), "n": len(start_lag)},
        "cpu_cores_server": (server_only1 - server_only0) / wall,
        "cpu_cores_server_and_workers": (cpu1[0] - cpu0[0]) / wall,
        "cpu_us_per_fire_server": (server_only1 - server_only0) / max(slots, 1) * 1e6,
        "cpu_us_per_fire_total": (cpu1[0] - cpu0[0]) / max(slots, 1) * 1e6,
    }
    print(json.dumps(out, indent=2))


def tree_cpu_s_only(pid):
    tick = os.sysconf("SC_CLK_TCK")
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / tick


if __name__ == "__main__":
    main()
