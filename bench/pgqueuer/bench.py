"""PgQueuer "durable no-op runs" benchmark client: the load shape of celery-baseline/bench.py and
bench/loadgen, on the same PostgreSQL as Agentry. Prints one JSON object.

usage: python bench.py --dsn DSN [--n 10000] [--threads 32] [--lat-n 200] [--warmup 200]
                       [--workers 2] [--pg-pid POSTMASTER_PID] [--label NAME]

It installs PgQueuer's tables afresh (durable: all tables logged), starts `--workers` worker
processes (worker.py), then:
  1. `--warmup` no-op jobs, each awaited;
  2. idle latency: `--lat-n` sequential `stamp` jobs after 20 unmeasured ones. enqueue->start =
     the job body's time.time() (sent back by UDP) minus the client's time.time() just before
     enqueue; round trip = until PgQueuer's CompletionWatcher saw the job terminal;
  3. throughput: `--n` no-op `work` jobs enqueued by `--threads` concurrent submitters (asyncio
     tasks, each on its own pooled connection, one enqueue at a time). When all have submitted,
     every job is awaited with CompletionWatcher.wait_for (PgQueuer's own result retrieval: it
     keeps no return value, so the result checked is the final status, `successful`);
  4. CPU seconds during phase 3 of this client, the workers, and PostgreSQL (the postmaster's
     tree, ended backends included), as CPU us per run.
"""
import argparse
import asyncio
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import time
from datetime import timedelta

import asyncpg
from pgqueuer.db import AsyncpgDriver, AsyncpgPoolDriver
from pgqueuer.queries import Queries
from pgqueuer.core.completion import CompletionWatcher

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from proc_cpu import tree_cpu_s  # noqa: E402


def summary_ms(xs):
    xs = sorted(x * 1000.0 for x in xs)
    pct = lambda p: xs[min(len(xs) - 1, int(p * len(xs)))]
    return {"p50": round(pct(0.5), 3), "p90": round(pct(0.9), 3), "p99": round(pct(0.99), 3),
            "mean": round(statistics.mean(xs), 3), "max": round(xs[-1], 3)}


def self_cpu_s():
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dsn", required=True)
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--threads", type=int, default=32)
    ap.add_argument("--lat-n", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--pg-pid", type=int)
    ap.add_argument("--label", default="pgqueuer")
    a = ap.parse_args()

    setup = await asyncpg.connect(a.dsn)
    q0 = Queries(AsyncpgDriver(setup))
    try:
        await q0.uninstall()
    except Exception:
        pass
    await q0.install()
    await setup.close()

    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    workers = [subprocess.Popen([sys.executable, os.path.join(HERE, "worker.py"), a.dsn], env=env)
               for _ in range(a.workers)]
    try:
        pool = await asyncpg.create_pool(a.dsn, min_size=a.threads, max_size=a.threads)
        q = Queries(AsyncpgPoolDriver(pool))
        listen = await asyncpg.connect(a.dsn)
        watch_q = Queries(AsyncpgDriver(listen))
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind(("127.0.0.1", 0))
        udp.setblocking(False)
        port = udp.getsockname()[1]
        loop = asyncio.get_running_loop()
        async with CompletionWatcher(watch_q.driver, queries=watch_q) as watcher:
            # 1. warm-up (also waits until the workers answer)
            ids = [(await q.enqueue("work", str(i).encode()))[0] for i in range(a.warmup)]
            for s in await asyncio.wait_for(asyncio.gather(*[watcher.wait_for(j) for j in ids]), 120):
                assert s == "successful", s
            # 2. idle latency
            enq_start, round_trip = [], []
            for k in range(20 + a.lat_n):
                t0 = time.time()
                jid = (await q.enqueue("stamp", f"{k} {port}".encode()))[0]
                status = await asyncio.wait_for(watcher.wait_for(jid), 30)
                t1 = time.time()
                assert status == "successful", status
                msg = await asyncio.wait_for(loop.sock_recv(udp, 256), 30)
                i, started_at = msg.decode().split()
                assert int(i) == k
                if k >= 20:
                    enq_start.append(float(started_at) - t0)
                    round_trip.append(t1 - t0)
            # 3. throughput
            cpu0 = (self_cpu_s(), sum(tree_cpu_s(w.pid) for w in workers),
                    tree_cpu_s(a.pg_pid, reaped=True) if a.pg_pid else 0.0)
            start = time.perf_counter()
            mine = [[] for _ in range(a.threads)]

            async def submitter(t):
                for i in range(t, a.n, a.threads):
                    mine[t].append((await q.enqueue("work", str(i).encode()))[0])
                return time.perf_counter()

            submit_end = max(await asyncio.gather(*[submitter(t) for t in range(a.threads)])) - start

            async def fetcher(t):
                statuses = await asyncio.gather(*[watcher.wait_for(j) for j in mine[t]])
                bad = [s for s in statuses if s != "successful"]
                if bad:
                    raise RuntimeError(f"{len(bad)} jobs ended {bad[:3]}")
                return len(statuses)

            fetched = sum(await asyncio.wait_for(asyncio.gather(*[fetcher(t) for t in range(a.threads)]), 300))
            done_end = time.perf_counter() - start
            cpu1 = (self_cpu_s(), sum(tree_cpu_s(w.pid) for w in workers),
                    tree_cpu_s(a.pg_pid, reaped=True) if a.pg_pid else 0.0)
        await listen.close()
        await pool.close()
    finally:
        for w in workers:
            w.terminate()
        for w in workers:
            try:
                w.wait(10)
            except subprocess.TimeoutExpired:
                w.kill()
    client_s, workers_s, pg_s = (cpu1[i] - cpu0[i] for i in range(3))
    assert fetched == a.n
    r1 = lambda x: round(x, 1)
    print(json.dumps({
        "label": a.label, "n": a.n, "threads": a.threads, "workers": a.workers,
        "submit_runs_per_s": r1(a.n / submit_end), "e2e_runs_per_s": r1(a.n / done_end),
        "lat_n": a.lat_n, "enqueue_to_start_ms": summary_ms(enq_start), "round_trip_ms": summary_ms(round_trip),
        "cpu_s": {"client": round(client_s, 3), "workers": round(workers_s, 3), "postgres": round(pg_s, 3)},
        "cpu_us_per_run": r1((client_s + workers_s + pg_s) / a.n * 1e6),
        "db_cpu_us_per_run": r1(pg_s / a.n * 1e6),
        "errors": [],
    }))


if __name__ == "__main__":
    asyncio.run(main())
