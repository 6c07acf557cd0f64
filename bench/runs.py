"""Durable no-op runs: Agentry (SQLite; PostgreSQL with one node and with two) against Celery +
Redis and PgQueuer, interleaved rounds, one machine, loopback.

Each round runs, in turn and each on a fresh worker, server or schema, with the same load:
  celery    the copied kit's bench.py against a fresh prefork worker (its `prefork-durable`
            configuration);
  pgqueuer  bench/pgqueuer/bench.py (PgQueuer on the same PostgreSQL, two worker processes);
  sqlite    bench/loadgen against `agentry serve` on a fresh state directory (fsync on every
            commit);
  pg1, pg2  the same against one and two `agentry serve` nodes on one fresh PostgreSQL schema
            (the submitters split between the nodes);
Load: warm-up, 200 sequential enqueue->start samples, then N no-op runs submitted by 32
concurrent submitters, every result fetched and checked. After the load, the sqlite and pg1
servers also take `wrk -t1 -c32` on POST /v1/runs/wait (one no-op run created, executed and
awaited per request), with their CPU per run. Prints per-round figures, medians, ratios to
Celery and PgQueuer, and writes everything to bench/results/runs-<time>.json. With
--baseline-agentry, an older build runs the sqlite load in every round too (`agentry_old`), and
the new/old ratios are printed (an A/B).
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

from proc_cpu import tree_cpu_s

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


PGQ_DIR = os.path.join(HERE, "pgqueuer")
WAIT_LUA = os.path.join(HERE, "wait.lua")


def pg_postmaster_pid(pg_url):
    """The PostgreSQL server's postmaster pid (its data directory's postmaster.pid)."""
    out = subprocess.run(["psql", pg_url, "-Atc", "SHOW data_directory"], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"PostgreSQL is not reachable at {pg_url}: {out.stderr.strip()}")
    with open(os.path.join(out.stdout.strip(), "postmaster.pid")) as f:
        return int(f.readline())


def reset_schema(pg_url, schema):
    subprocess.run(["psql", pg_url, "-qc", f"DROP SCHEMA IF EXISTS {schema} CASCADE"], check=True,
                   capture_output=True)


def pgqueuer_round(venv, pg_url, pg_pid, n, threads, outdir, r):
    py = os.path.join(venv, "bin", "python")
    out = subprocess.run([py, os.path.join(PGQ_DIR, "bench.py"), "--dsn", pg_url, "--n", str(n),
                          "--threads", str(threads), "--pg-pid", str(pg_pid), "--workers", "2"],
                         cwd=PGQ_DIR, capture_output=True, text=True, timeout=400)
    with open(os.path.join(outdir, f"pgqueuer.{r}.log"), "w") as f:
        f.write(out.stderr)
    if out.returncode != 0:
        raise RuntimeError(f"pgqueuer bench failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout)


def wait_path(port, server_pids, pg_pid, seconds):
    """wrk -t1 -c32 on POST /v1/runs/wait: runs/s, latency, and the server's (and database's)
    CPU per run."""
    cpu0 = sum(tree_cpu_s(p) for p in server_pids), (tree_cpu_s(pg_pid, True) if pg_pid else 0.0)
    out = subprocess.run(["wrk", "-t1", "-c32", f"-d{seconds}s", "--latency", "-s", WAIT_LUA,
                          f"http://127.0.0.1:{port}/v1/runs/wait"], capture_output=True, text=True, timeout=seconds + 60)
    cpu1 = sum(tree_cpu_s(p) for p in server_pids), (tree_cpu_s(pg_pid, True) if pg_pid else 0.0)
    text = out.stdout
    reqs = int(re.search(r"(\d+) requests in", text).group(1))
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    errs = re.search(r"Socket errors: (.*)", text)
    p50 = re.search(r"50%\s+([\d.]+)(us|ms|s)", text)
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}
    server_s, db_s = cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]
    return {"runs_per_s": float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1)),
            "requests": reqs, "p50_ms": round(float(p50.group(1)) * scale[p50.group(2)], 3) if p50 else None,
            "server_cpu_us_per_run": round(server_s / max(reqs, 1) * 1e6, 1),
            "db_cpu_us_per_run": round(db_s / max(reqs, 1) * 1e6, 1),
            "errors": ([f"{bad.group(1)} non-2xx"] if bad else []) + ([errs.group(1)] if errs else [])}


def start_node(agentry, label, outdir, extra):
    state = tempfile.mkdtemp(prefix="agentry-runs-bench-")
    slog = open(os.path.join(outdir, f"{label}.server.log"), "w+")
    server = subprocess.Popen([agentry, "serve", AGENT, "--port", "0", "--state-dir", state, "--no-runagent-db",
                               *extra], stdout=subprocess.DEVNULL, stderr=slog,
                              env=dict(os.environ, NO_COLOR="1"))
    for _ in range(600):
        slog.flush()
        with open(slog.name) as f:
            m = re.search(r"ready on http://127\.0\.0\.1:(\d+)", f.read())
        if m:
            return server, state, int(m.group(1))
        if server.poll() is not None:
            break
        time.sleep(0.05)
    stop(server)
    raise RuntimeError(f"agentry did not start ({label}); see {slog.name}")


def agentry_round(agentry, loadgen, n, threads, outdir, label, extra, nodes=1, pg=None, wait_s=0):
    """`nodes` servers (on PostgreSQL when `pg` = (url, schema, postmaster pid)), the loadgen
    across them, then the create-and-wait path on the first when wait_s > 0."""
    if pg:
        reset_schema(pg[0], pg[1])
        extra = [*extra, "--database", pg[0], "--database-schema", pg[1]]
    started = []
    try:
        for k in range(nodes):
            started.append(start_node(agentry, f"{label}.{k}", outdir, extra))
        cmd = [loadgen, "--n", str(n), "--threads", str(threads), "--label", label]
        for server, _, port in started:
            cmd += ["--url", f"http://127.0.0.1:{port}", "--server-pid", str(server.pid)]
        if pg:
            cmd += ["--db-pid", str(pg[2])]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
        if out.returncode != 0:
            raise RuntimeError(f"loadgen failed: {out.stderr[-2000:]}")
        result = json.loads(out.stdout)
        if wait_s:
            server, _, port = started[0]
            result["wait_path"] = wait_path(port, [server.pid], pg[2] if pg else None, wait_s)
        return result
    finally:
        for server, state, _ in started:
            stop(server)
            subprocess.run(["rm", "-rf", state])


def med(rows, *path):
    vals = []
    for row in rows:
        v = row
        for p in path:
            v = v.get(p) if isinstance(v, dict) else None
        if v is not None:
            vals.append(v)
    return statistics.median(vals) if vals else None


def figures(rows):
    f = {"e2e_runs_per_s": med(rows, "e2e_runs_per_s"), "submit_runs_per_s": med(rows, "submit_runs_per_s"),
         "enqueue_to_start_p50_ms": med(rows, "enqueue_to_start_ms", "p50"),
         "enqueue_to_start_p99_ms": med(rows, "enqueue_to_start_ms", "p99"),
         "round_trip_p50_ms": med(rows, "round_trip_ms", "p50"),
         "cpu_us_per_run": med(rows, "cpu_us_per_run"),
         "db_cpu_us_per_run": med(rows, "db_cpu_us_per_run")}
    if any("wait_path" in r for r in rows):
        f["wait_runs_per_s"] = med(rows, "wait_path", "runs_per_s")
        f["wait_p50_ms"] = med(rows, "wait_path", "p50_ms")
        f["wait_server_cpu_us_per_run"] = med(rows, "wait_path", "server_cpu_us_per_run")
        f["wait_db_cpu_us_per_run"] = med(rows, "wait_path", "db_cpu_us_per_run")
    return f


SYSTEMS = ["celery", "pgqueuer", "sqlite", "pg1", "pg2"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--agentry", required=True)
    ap.add_argument("--loadgen", required=True)
    ap.add_argument("--celery-venv", required=True)
    ap.add_argument("--pgqueuer-venv", required=True)
    ap.add_argument("--pg-url", default="postgres://postgres@127.0.0.1:5432/test?sslmode=disable")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--threads", type=int, default=32)
    ap.add_argument("--wait-seconds", type=int, default=10, help="wrk duration on POST /v1/runs/wait (0: skip)")
    ap.add_argument("--only", default=",".join(SYSTEMS), help=f"comma-separated subset of {SYSTEMS}")
    ap.add_argument("--agentry-arg", action="append", default=[], help="extra flag for agentry serve")
    ap.add_argument("--baseline-agentry", help="an older agentry binary, run in every round too (A/B, SQLite)")
    a = ap.parse_args()
    only = [x for x in a.only.split(",") if x]
    unknown = set(only) - set(SYSTEMS)
    if unknown:
        ap.error(f"unknown systems {sorted(unknown)}")
    pg_pid = pg_postmaster_pid(a.pg_url) if {"pgqueuer", "pg1", "pg2"} & set(only) else None
    outdir = tempfile.mkdtemp(prefix="runs-bench-")
    rounds = []
    for r in range(1, a.rounds + 1):
        row = {}
        for system in only:
            if system == "celery":
                g = celery_round(a.celery_venv, a.n, a.threads, outdir, r)
            elif system == "pgqueuer":
                g = pgqueuer_round(a.pgqueuer_venv, a.pg_url, pg_pid, a.n, a.threads, outdir, r)
            elif system == "sqlite":
                g = agentry_round(a.agentry, a.loadgen, a.n, a.threads, outdir, f"sqlite.{r}", a.agentry_arg,
                                  wait_s=a.wait_seconds)
            else:
                nodes = 1 if system == "pg1" else 2
                g = agentry_round(a.agentry, a.loadgen, a.n, a.threads, outdir, f"{system}.{r}", a.agentry_arg,
                                  nodes=nodes, pg=(a.pg_url, "agentry_bench", pg_pid),
                                  wait_s=a.wait_seconds if system == "pg1" else 0)
            wp = g.get("wait_path")
            log(f"round {r} {system:8}: e2e {g['e2e_runs_per_s']}/s submit {g['submit_runs_per_s']}/s "
                f"enq->start p50 {g['enqueue_to_start_ms']['p50']} ms cpu {g['cpu_us_per_run']} us/run "
                f"(db {g.get('db_cpu_us_per_run')})"
                + (f" | wait path {wp['runs_per_s']}/s server cpu {wp['server_cpu_us_per_run']} us/run" if wp else "")
                + f" errors {g.get('errors', []) + (wp['errors'] if wp else [])}")
            row[system] = g
        if a.baseline_agentry:
            o = agentry_round(a.baseline_agentry, a.loadgen, a.n, a.threads, outdir, f"old.{r}", a.agentry_arg,
                              wait_s=a.wait_seconds)
            log(f"round {r} old     : e2e {o['e2e_runs_per_s']}/s cpu {o['cpu_us_per_run']} us/run")
            row["agentry_old"] = o
        rounds.append(row)
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    path = os.path.join(HERE, "results", time.strftime("runs-%Y%m%d-%H%M%S.json"))
    # The raw rounds first: a failure in the summary below loses nothing measured.
    with open(path, "w") as f:
        json.dump({"rounds": rounds}, f, indent=1)
    summary = {"n": a.n, "threads": a.threads, "rounds": a.rounds,
               "errors": [e for row in rounds for g in row.values()
                          for e in g.get("errors", []) + g.get("wait_path", {}).get("errors", [])]}
    for system in only + (["agentry_old"] if a.baseline_agentry else []):
        summary[system] = figures([row[system] for row in rounds])
    ratios = {}
    for mine in [x for x in ["sqlite", "pg1", "pg2"] if x in only]:
        for base in [x for x in ["celery", "pgqueuer"] if x in only]:
            m, b = summary[mine], summary[base]
            ratios[f"{mine}/{base}"] = {
                "e2e_throughput": round(m["e2e_runs_per_s"] / b["e2e_runs_per_s"], 2),
                "enqueue_to_start_p50": round(m["enqueue_to_start_p50_ms"] / b["enqueue_to_start_p50_ms"], 2),
                "cpu_per_run": round(m["cpu_us_per_run"] / b["cpu_us_per_run"], 2)}
    if "pg1" in only and "pg2" in only:
        ratios["pg2/pg1"] = {"e2e_throughput": round(summary["pg2"]["e2e_runs_per_s"] / summary["pg1"]["e2e_runs_per_s"], 2)}
    if a.baseline_agentry and "sqlite" in only:
        ratios["new/old"] = {k: round(summary["sqlite"][k] / summary["agentry_old"][k], 3)
                             for k in ["e2e_runs_per_s", "submit_runs_per_s", "enqueue_to_start_p50_ms", "cpu_us_per_run"]
                             if summary["agentry_old"].get(k)}
    summary["ratios"] = ratios
    with open(path, "w") as f:
        json.dump({"summary": summary, "rounds": rounds}, f, indent=1)
    names = {"celery": "Celery + Redis", "pgqueuer": "PgQueuer", "sqlite": "Agentry SQLite",
             "pg1": "Agentry PG, 1 node", "pg2": "Agentry PG, 2 nodes", "agentry_old": "Agentry SQLite (old)"}
    cols = [x for x in only + (["agentry_old"] if a.baseline_agentry else [])]
    fmt = lambda v, d=0: "" if v is None else (f"{v:,.{d}f}")
    lines = [f"| durable no-op runs (medians of {a.rounds}) | " + " | ".join(names[c] for c in cols) + " |",
             "|---" * (len(cols) + 1) + "|"]
    rows_spec = [("submit → all results, runs/s", "e2e_runs_per_s", 0), ("submit only, runs/s", "submit_runs_per_s", 0),
                 ("enqueue → start p50, ms (idle)", "enqueue_to_start_p50_ms", 2),
                 ("enqueue → start p99, ms (idle)", "enqueue_to_start_p99_ms", 2),
                 ("round trip p50, ms (idle)", "round_trip_p50_ms", 2),
                 ("CPU µs per run, all processes", "cpu_us_per_run", 0),
                 ("of which the database (PostgreSQL)", "db_cpu_us_per_run", 0),
                 ("create-and-wait (`wrk -c32`), runs/s", "wait_runs_per_s", 0),
                 ("create-and-wait p50, ms", "wait_p50_ms", 2),
                 ("create-and-wait: server CPU µs per run", "wait_server_cpu_us_per_run", 0),
                 ("create-and-wait: PostgreSQL CPU µs per run", "wait_db_cpu_us_per_run", 0)]
    for title, key, d in rows_spec:
        vals = [summary[c].get(key) for c in cols]
        if all(v is None for v in vals):
            continue
        lines.append(f"| {title} | " + " | ".join(fmt(v, d) for v in vals) + " |")
    print("\n".join(lines))
    print("\nratios (same run):")
    for k, v in ratios.items():
        print(f"  {k}: {v}")
    print(f"errors: {summary['errors']}\nfull results: {path}\nlogs: {outdir}")


if __name__ == "__main__":
    main()
