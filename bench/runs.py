"""Durable no-op runs: Agentry against Celery + Redis, interleaved rounds, one machine, loopback.

Each round runs the Celery baseline (the copied kit's bench.py against a fresh prefork worker,
its `prefork-durable` configuration) and then Agentry (bench/loadgen against a fresh server on a
fresh state directory, fsync on every commit), with the same load: warm-up, 200 sequential
enqueue->start samples, then N no-op runs submitted by 32 concurrent submitters, every result
fetched and checked. Prints per-round figures, medians, ratios (Agentry / Celery), and writes
everything to bench/results/runs-<time>.json. With --baseline-agentry, an older build runs the
same load in every round too (`agentry_old`), and the new/old ratios are printed (an A/B).
"""
import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CELERY_DIR = os.path.join(HERE, "celery-baseline")
AGENT = os.path.join(HERE, "agents", "runs_bench")


def log(*a):
    print("[runs.py]", *a, file=sys.stderr, flush=True)


def stop(proc, sig=signal.SIGTERM, wait=20):
    if proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(wait)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def celery_round(venv, n, threads, outdir, r):
    env = dict(os.environ, BENCH_REDIS_URL="redis://127.0.0.1:6379/9", BENCH_ACKS_LATE="1",
               BENCH_REJECT_ON_WORKER_LOST="1", PYTHONDONTWRITEBYTECODE="1")
    py = os.path.join(venv, "bin", "python")
    subprocess.run([py, "-c", "import redis; redis.Redis.from_url('redis://127.0.0.1:6379/9').flushdb()"], check=True)
    wlog = open(os.path.join(outdir, f"celery.{r}.worker.log"), "w")
    worker = subprocess.Popen([os.path.join(venv, "bin", "celery"), "-A", "tasks", "worker", "--pool", "prefork",
                               "-c", "2", "-O", "fair", "--without-gossip", "--without-mingle",
                               "--without-heartbeat", "-l", "warning"],
                              cwd=CELERY_DIR, env=env, stdout=wlog, stderr=subprocess.STDOUT)
    try:
        out = subprocess.run([py, os.path.join(CELERY_DIR, "bench.py"), "--n", str(n), "--threads", str(threads),
                              "--worker-pid", str(worker.pid), "--label", "celery-prefork-durable",
                              "--pool", "prefork", "--concurrency", "2"],
                             cwd=CELERY_DIR, env=env, capture_output=True, text=True, timeout=200)
        if out.returncode != 0:
            raise RuntimeError(f"celery bench failed: {out.stderr[-2000:]}")
        return json.loads(out.stdout)
    finally:
        stop(worker)
        for line in subprocess.run(["ps", "-o", "pid=", "--ppid", str(worker.pid)], capture_output=True,
                                   text=True).stdout.split():
            try:
                os.kill(int(line), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass


def agentry_round(agentry, loadgen, n, threads, outdir, r, extra):
    state = tempfile.mkdtemp(prefix="agentry-runs-bench-")
    slog = open(os.path.join(outdir, f"agentry.{r}.server.log"), "w+")
    server = subprocess.Popen([agentry, "serve", AGENT, "--port", "0", "--state-dir", state, "--no-runagent-db",
                               *extra], stdout=subprocess.DEVNULL, stderr=slog,
                              env=dict(os.environ, NO_COLOR="1"))
    try:
        port = None
        for _ in range(600):
            slog.flush()
            with open(slog.name) as f:
                m = re.search(r"ready on http://127\.0\.0\.1:(\d+)", f.read())
            if m:
                port = int(m.group(1))
                break
            if server.poll() is not None:
                break
            time.sleep(0.05)
        if port is None:
            raise RuntimeError("agentry did not start")
        out = subprocess.run([loadgen, "--url", f"http://127.0.0.1:{port}", "--n", str(n), "--threads", str(threads),
                              "--server-pid", str(server.pid), "--label", "agentry"],
                             capture_output=True, text=True, timeout=200)
        if out.returncode != 0:
            raise RuntimeError(f"loadgen failed: {out.stderr[-2000:]}")
        return json.loads(out.stdout)
    finally:
        stop(server)
        subprocess.run(["rm", "-rf", state])


def med(rows, *path):
    vals = []
    for row in rows:
        v = row
        for p in path:
            v = v[p]
        vals.append(v)
    return statistics.median(vals)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--agentry", required=True)
    ap.add_argument("--loadgen", required=True)
    ap.add_argument("--celery-venv", required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--threads", type=int, default=32)
    ap.add_argument("--agentry-arg", action="append", default=[], help="extra flag for agentry serve")
    ap.add_argument("--baseline-agentry", help="an older agentry binary, run in every round too (A/B)")
    a = ap.parse_args()
    outdir = tempfile.mkdtemp(prefix="runs-bench-")
    rounds = []
    for r in range(1, a.rounds + 1):
        c = celery_round(a.celery_venv, a.n, a.threads, outdir, r)
        log(f"round {r} celery : e2e {c['e2e_runs_per_s']}/s submit {c['submit_runs_per_s']}/s "
            f"enq->start p50 {c['enqueue_to_start_ms']['p50']} ms cpu {c['cpu_us_per_run']} us/run")
        g = agentry_round(a.agentry, a.loadgen, a.n, a.threads, outdir, r, a.agentry_arg)
        log(f"round {r} agentry: e2e {g['e2e_runs_per_s']}/s submit {g['submit_runs_per_s']}/s "
            f"enq->start p50 {g['enqueue_to_start_ms']['p50']} ms cpu {g['cpu_us_per_run']} us/run "
            f"errors {g['errors']}")
        row = {"celery": c, "agentry": g}
        if a.baseline_agentry:
            o = agentry_round(a.baseline_agentry, a.loadgen, a.n, a.threads, outdir, f"{r}-old", a.agentry_arg)
            log(f"round {r} old    : e2e {o['e2e_runs_per_s']}/s submit {o['submit_runs_per_s']}/s "
                f"enq->start p50 {o['enqueue_to_start_ms']['p50']} ms cpu {o['cpu_us_per_run']} us/run "
                f"errors {o['errors']}")
            row["agentry_old"] = o
        rounds.append(row)
    cel = [x["celery"] for x in rounds]
    agt = [x["agentry"] for x in rounds]
    old = [x["agentry_old"] for x in rounds if "agentry_old" in x]

    def figures(rows):
        return {"e2e_runs_per_s": med(rows, "e2e_runs_per_s"), "submit_runs_per_s": med(rows, "submit_runs_per_s"),
                "enqueue_to_start_p50_ms": med(rows, "enqueue_to_start_ms", "p50"),
                "enqueue_to_start_p99_ms": med(rows, "enqueue_to_start_ms", "p99"),
                "round_trip_p50_ms": med(rows, "round_trip_ms", "p50"),
                "cpu_us_per_run": med(rows, "cpu_us_per_run")}
    summary = {
        "n": a.n, "threads": a.threads, "rounds": a.rounds,
        "celery": {"e2e_runs_per_s": med(cel, "e2e_runs_per_s"), "submit_runs_per_s": med(cel, "submit_runs_per_s"),
                   "enqueue_to_start_p50_ms": med(cel, "enqueue_to_start_ms", "p50"),
                   "enqueue_to_start_p99_ms": med(cel, "enqueue_to_start_ms", "p99"),
                   "round_trip_p50_ms": med(cel, "round_trip_ms", "p50"),
                   "cpu_us_per_run": med(cel, "cpu_us_per_run")},
        "agentry": {"e2e_runs_per_s": med(agt, "e2e_runs_per_s"), "submit_runs_per_s": med(agt, "submit_runs_per_s"),
                    "enqueue_to_start_p50_ms": med(agt, "enqueue_to_start_ms", "p50"),
                    "enqueue_to_start_p99_ms": med(agt, "enqueue_to_start_ms", "p99"),
                    "round_trip_p50_ms": med(agt, "round_trip_ms", "p50"),
                    "cpu_us_per_run": med(agt, "cpu_us_per_run")},
        "errors": [e for g in agt for e in g["errors"]],
    }
    s = summary
    s["ratios"] = {
        "e2e_throughput": round(s["agentry"]["e2e_runs_per_s"] / s["celery"]["e2e_runs_per_s"], 2),
        "enqueue_to_start_p50": round(s["agentry"]["enqueue_to_start_p50_ms"] / s["celery"]["enqueue_to_start_p50_ms"], 2),
        "cpu_per_run": round(s["agentry"]["cpu_us_per_run"] / s["celery"]["cpu_us_per_run"], 2),
    }
    if old:
        s["agentry_old"] = figures(old)
        s["errors"] += [e for o in old for e in o["errors"]]
        s["new_vs_old"] = {
            k: round(s["agentry"][k] / s["agentry_old"][k], 3) if s["agentry_old"][k] else None
            for k in ["e2e_runs_per_s", "submit_runs_per_s", "enqueue_to_start_p50_ms", "cpu_us_per_run"]
        }
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    path = os.path.join(HERE, "results", time.strftime("runs-%Y%m%d-%H%M%S.json"))
    with open(path, "w") as f:
        json.dump({"summary": summary, "rounds": rounds}, f, indent=1)
    print(f"""
| durable no-op runs (medians of {a.rounds}) | Celery + Redis | Agentry (SQLite, fsync) | ratio |
|---|---|---|---|
| submit→all results, runs/s | {s['celery']['e2e_runs_per_s']:,.0f} | {s['agentry']['e2e_runs_per_s']:,.0f} | **{s['ratios']['e2e_throughput']}×** |
| submit only, runs/s | {s['celery']['submit_runs_per_s']:,.0f} | {s['agentry']['submit_runs_per_s']:,.0f} | |
| enqueue→start p50 / p99, ms (idle) | {s['celery']['enqueue_to_start_p50_ms']} / {s['celery']['enqueue_to_start_p99_ms']} | {s['agentry']['enqueue_to_start_p50_ms']} / {s['agentry']['enqueue_to_start_p99_ms']} | {s['ratios']['enqueue_to_start_p50']}× |
| round trip p50, ms (idle) | {s['celery']['round_trip_p50_ms']} | {s['agentry']['round_trip_p50_ms']} | |
| CPU µs per run (client + server/worker + broker) | {s['celery']['cpu_us_per_run']:,.0f} | {s['agentry']['cpu_us_per_run']:,.0f} | {s['ratios']['cpu_per_run']}× |
""")
    if old:
        o, n_ = s["agentry_old"], s["agentry"]
        print(f"""| A/B (same rounds) | old | new | new / old |
|---|---|---|---|
| submit→all results, runs/s | {o['e2e_runs_per_s']:,.0f} | {n_['e2e_runs_per_s']:,.0f} | {s['new_vs_old']['e2e_runs_per_s']} |
| submit only, runs/s | {o['submit_runs_per_s']:,.0f} | {n_['submit_runs_per_s']:,.0f} | {s['new_vs_old']['submit_runs_per_s']} |
| enqueue→start p50, ms | {o['enqueue_to_start_p50_ms']} | {n_['enqueue_to_start_p50_ms']} | {s['new_vs_old']['enqueue_to_start_p50_ms']} |
| CPU µs per run | {o['cpu_us_per_run']:,.0f} | {n_['cpu_us_per_run']:,.0f} | {s['new_vs_old']['cpu_us_per_run']} |
""")
    print(f"errors: {summary['errors']}\nfull results: {path}\nlogs: {outdir}")


if __name__ == "__main__":
    main()
