"""Serving benchmark: Agentry against the FastAPI baseline (and RunAgent itself when installed),
same agent, same clients, same load, one run, on loopback. Prints ratios; writes the figures to
bench/results/serving-<time>.json and .md.

usage: python bench/run.py --agentry target/release/agentry --venv VENV [--rounds 3] [--no-runagent]
                          [--baseline-agentry OLD_BINARY]
With --baseline-agentry, an older build is measured too, in the same rounds (`agentry_old`), and
the new/old ratios are printed: the A/B for a change that must not move the figures.
VENV must hold runagent==0.1.49 (which brings fastapi, uvicorn and websockets). wrk must be on PATH.

The machine is noisy: every load figure is measured in `rounds` interleaved rounds (one server
after the other, round after round) and the median is reported; ratios compare medians of the
same run.
"""
import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
KIT = os.path.join(HERE, "baseline")
AGENT_ID = "11111111-2222-3333-4444-555555555555"
RUN_PATH = f"/api/v1/agents/{AGENT_ID}/run"
STREAM_PATH = f"/api/v1/agents/{AGENT_ID}/run-stream"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_health(port, proc, limit=60):
    end = time.time() + limit
    while time.time() < end:
        if proc.poll() is not None:
            raise SystemExit(f"server on {port} exited early ({proc.returncode})")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/health", timeout=1) as r:
                if r.status == 200:
                    return
        except urllib.error.HTTPError as e:
            if e.code == 401:  # up, and asking for the key it is meant to ask for
                return
        except OSError:
            pass
        time.sleep(0.02)
    raise SystemExit(f"server on {port} did not become healthy")


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def wrk(port, conns, seconds, script=None):
    out = subprocess.run(
        ["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--timeout", "10s", "--latency",
         "-s", script or os.path.join(KIT, "post_echo.lua"), f"http://127.0.0.1:{port}{RUN_PATH}"],
        capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))

    def pct(p):
        m = re.search(rf"\s{p}%\s+([\d.]+)(us|ms|s)", out)
        value, unit = float(m.group(1)), m.group(2)
        return value * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors:
        raise SystemExit(f"wrk saw {errors.group(1)} error responses on port {port}:\n{out}")
    return {"rps": rps, "p50_ms": pct(50), "p99_ms": pct(99)}


def ws_stream(python, port, chunks, repeats, query=""):
    out = subprocess.run([python, os.path.join(KIT, "ws_stream_bench.py"), f"ws://127.0.0.1:{port}{STREAM_PATH}{query}",
                          str(chunks), str(repeats)], capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def startup(python, cmd, port, repeats):
    out = subprocess.run([python, os.path.join(KIT, "startup_time.py"), str(port), str(repeats), "--", *cmd],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def health_during_slow_stream(python, port, agent_id):
    """Worst /api/v1/health latency while a slow sync generator streams (RunAgent blocks here)."""
    out = subprocess.run([python, os.path.join(KIT, "blocking_probe.py"), str(port), agent_id, "slow_stream"],
                         capture_output=True, text=True, check=True).stdout
    return float(re.search(r"(\d+) ms", out).group(1))


class Server:
    def __init__(self, name, cmd, port, env=None, wrk_script=None, ws_query=""):
        self.name, self.port = name, port
        self.wrk_script, self.ws_query = wrk_script, ws_query
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     env=env, start_new_session=True)
        wait_health(port, self.proc)

    def stop(self):
        try:
            os.killpg(self.proc.pid, signal.SIGINT)
            self.proc.wait(15)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def median(values):
    return statistics.median(values) if values else float("nan")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--agentry", default=os.path.join(HERE, "..", "target", "release", "agentry"))
    ap.add_argument("--venv", required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--no-runagent", action="store_true", help="skip RunAgent itself (it is slow)")
    ap.add_argument("--baseline-agentry", help="an older agentry binary, measured alongside (A/B)")
    args = ap.parse_args()
    python = os.path.join(args.venv, "bin", "python")
    runagent = os.path.join(args.venv, "bin", "runagent")
    with_runagent = os.path.exists(runagent) and not args.no_runagent
    if not shutil.which("wrk"):
        raise SystemExit("wrk is required (apt-get install -y wrk)")

    work = tempfile.mkdtemp(prefix="agentry-bench-")
    cache = os.path.join(work, "runagent-cache")
    os.makedirs(cache)
    env = dict(os.environ, RUNAGENT_CACHE_DIR=cache)
    agent = os.path.join(work, "agent")
    shutil.copytree(os.path.join(KIT, "agent"), agent)
    slow_agent = os.path.join(work, "agent_slow")
    shutil.copytree(os.path.join(KIT, "agent_slow"), slow_agent)
    # Each server its own state directory: one state directory has one owner (a second server
    # on it is refused).
    ours_cmd = lambda port, *extra: [args.agentry, "serve", agent, "--port", str(port), "--workers",
                                     str(args.workers), "--state-dir", os.path.join(work, f"state-{port}"),
                                     *extra]
    results = {"machine": {"cores": os.cpu_count(), "python": sys.version.split()[0]}, "rounds": args.rounds}

    print("== start-up: spawn to first 200 on /api/v1/health (workers warm for Agentry)", flush=True)
    p = free_port()
    results["startup"] = {
        "agentry": startup(python, ours_cmd(p), p, 5),
        "fastapi": startup(python, [python, os.path.join(KIT, "fastapi_echo.py"), str(p)], p, 5),
    }
    old_cmd = lambda port, *extra: [args.baseline_agentry, "serve", agent, "--port", str(port), "--workers",
                                    str(args.workers), "--state-dir", os.path.join(work, "state-old"), *extra]
    if args.baseline_agentry:
        results["startup"]["agentry_old"] = startup(python, old_cmd(p), p, 5)
    if with_runagent:
        subprocess.run([runagent, "config", "--register-agent", agent], env=env, capture_output=True, check=True)
        results["startup"]["runagent"] = startup(python, [runagent, "serve", "--no-animation", "--port", str(p),
                                                          "--host", "127.0.0.1", agent], p, 3)

    servers = {}
    port = free_port()
    servers["agentry"] = Server("agentry", ours_cmd(port), port, env)
    if args.baseline_agentry:
        port = free_port()
        servers["agentry_old"] = Server("agentry_old", old_cmd(port), port, env)
    port = free_port()
    servers["agentry_no_history"] = Server("agentry_no_history", ours_cmd(port, "--no-runagent-db"), port, env)
    # The same server with authentication on (an `invoke` key on every request) and a rate limit
    # far above the load, to show what the gateway costs.
    auth_state = os.path.join(work, "state-auth")
    made = subprocess.run([args.agentry, "keys", "create", "--scope", "invoke", "--state-dir", auth_state],
                          capture_output=True, text=True, check=True).stdout
    key = json.loads(made)["key"]
    auth_lua = os.path.join(work, "post_echo_auth.lua")
    with open(os.path.join(KIT, "post_echo.lua")) as f, open(auth_lua, "w") as g:
        g.write(f.read() + f'\nwrk.headers["Authorization"] = "Bearer {key}"\n')
    port = free_port()
    servers["agentry_auth"] = Server(
        "agentry_auth",
        [args.agentry, "serve", agent, "--port", str(port), "--workers", str(args.workers), "--state-dir", auth_state,
         "--rate-limit", "invoke=1000000:1000000"],
        port, env, wrk_script=auth_lua, ws_query=f"?token={key}")
    port = free_port()
    servers["fastapi"] = Server("fastapi", [python, os.path.join(KIT, "fastapi_echo.py"), str(port)], port, env)
    if with_runagent:
        port = free_port()
        servers["runagent"] = Server("runagent", [runagent, "serve", "--no-animation", "--port", str(port), "--host",
                                                  "127.0.0.1", agent], port, env)
    try:
        time.sleep(2)
        results["rss_idle_mib"] = {name: round(rss_mib(s.proc.pid), 1) for name, s in servers.items()}
        print(f"== idle RSS (server process only): {results['rss_idle_mib']}", flush=True)
        for s in servers.values():  # warm-up
            wrk(s.port, 8, 1, s.wrk_script)
        samples = {name: {"c1": [], "c64": [], "ws": []} for name in servers}
        for r in range(args.rounds):
            print(f"== round {r + 1}/{args.rounds}", flush=True)
            for name, s in servers.items():
                slow = name == "runagent"
                samples[name]["c1"].append(wrk(s.port, 1, 2 if slow else 3, s.wrk_script))
                samples[name]["c64"].append(wrk(s.port, 64, 2 if slow else args.seconds, s.wrk_script))
                samples[name]["ws"].append(ws_stream(python, s.port, 1000, 5 if slow else 20, s.ws_query))
                print(f"   {name:<20} c1 p50 {samples[name]['c1'][-1]['p50_ms']:.3f} ms   "
                      f"c64 {samples[name]['c64'][-1]['rps']:>9.0f} req/s   "
                      f"stream ttfc {samples[name]['ws'][-1]['ttfc_ms_from_request']:.3f} ms, "
                      f"{samples[name]['ws'][-1]['chunks_per_s']:.0f} chunks/s", flush=True)
        results["load"] = {
            name: {
                "c1_p50_ms": median([x["p50_ms"] for x in v["c1"]]),
                "c1_rps": median([x["rps"] for x in v["c1"]]),
                "c64_rps": median([x["rps"] for x in v["c64"]]),
                "c64_p99_ms": median([x["p99_ms"] for x in v["c64"]]),
                "ttfc_ms": median([x["ttfc_ms_from_request"] for x in v["ws"]]),
                "chunks_per_s": median([x["chunks_per_s"] for x in v["ws"]]),
                "samples": v,
            }
            for name, v in samples.items()
        }
        results["rss_after_load_mib"] = {name: round(rss_mib(s.proc.pid), 1) for name, s in servers.items()}
    finally:
        for s in servers.values():
            s.stop()

    # One slow sync generator streaming; how slow does /api/v1/health get meanwhile?
    port = free_port()
    slow = Server("agentry_slow", [args.agentry, "serve", slow_agent, "--port", str(port), "--state-dir",
                                   os.path.join(work, "state"), "--no-runagent-db"], port, env)
    try:
        results["health_during_slow_stream_ms"] = {"agentry": health_during_slow_stream(python, port, "33333333-2222-3333-4444-555555555555")}
    finally:
        slow.stop()

    load, base = results["load"], results["load"]["fastapi"]
    ours, ours_nh = load["agentry"], load["agentry_no_history"]
    ratios = {
        "c64_rps_vs_fastapi": ours["c64_rps"] / base["c64_rps"],
        "c64_rps_no_history_vs_fastapi": ours_nh["c64_rps"] / base["c64_rps"],
        "c1_p50_vs_fastapi": ours["c1_p50_ms"] / base["c1_p50_ms"],
        "ttfc_vs_fastapi": ours["ttfc_ms"] / base["ttfc_ms"],
        "chunks_per_s_vs_fastapi": ours["chunks_per_s"] / base["chunks_per_s"],
        "startup_vs_fastapi": results["startup"]["agentry"]["startup_s_median"] / results["startup"]["fastapi"]["startup_s_median"],
    }
    auth = load["agentry_auth"]
    ratios["c64_rps_auth_vs_off"] = auth["c64_rps"] / ours["c64_rps"]
    ratios["c1_rps_auth_vs_off"] = auth["c1_rps"] / ours["c1_rps"]
    if "runagent" in load:
        ratios["c64_rps_vs_runagent"] = ours["c64_rps"] / load["runagent"]["c64_rps"]
    if "agentry_old" in load:
        old = load["agentry_old"]
        ratios["new_vs_old_c64_rps"] = ours["c64_rps"] / old["c64_rps"]
        ratios["new_vs_old_c1_rps"] = ours["c1_rps"] / old["c1_rps"]
        ratios["new_vs_old_c1_p50"] = ours["c1_p50_ms"] / old["c1_p50_ms"]
        ratios["new_vs_old_ttfc"] = ours["ttfc_ms"] / old["ttfc_ms"]
        ratios["new_vs_old_chunks_per_s"] = ours["chunks_per_s"] / old["chunks_per_s"]
        ratios["new_vs_old_startup"] = (results["startup"]["agentry"]["startup_s_median"]
                                        / results["startup"]["agentry_old"]["startup_s_median"])
    results["ratios"] = ratios

    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    with open(os.path.join(HERE, "results", f"serving-{stamp}.json"), "w") as f:
        json.dump(results, f, indent=1)
    table = render(results)
    with open(os.path.join(HERE, "results", f"serving-{stamp}.md"), "w") as f:
        f.write(table)
    print(table)
    shutil.rmtree(work, ignore_errors=True)


def render(r):
    load, st = r["load"], r["startup"]
    names = [n for n in ["agentry", "agentry_old", "agentry_no_history", "agentry_auth", "fastapi", "runagent"]
             if n in load]
    rows = [
        ("start-up to first 200 (s)", lambda n: st.get(n if n == "agentry_old" else n.replace("_no_history", "").replace("_auth", ""), {}).get("startup_s_median")),
        ("RSS idle, server process (MiB)", lambda n: r["rss_idle_mib"].get(n)),
        ("wrk c=1 p50 (ms)", lambda n: load[n]["c1_p50_ms"]),
        ("wrk c=1 req/s", lambda n: load[n]["c1_rps"]),
        ("wrk c=64 req/s", lambda n: load[n]["c64_rps"]),
        ("wrk c=64 p99 (ms)", lambda n: load[n]["c64_p99_ms"]),
        ("1,000-chunk stream: first chunk (ms)", lambda n: load[n]["ttfc_ms"]),
        ("1,000-chunk stream: chunks/s", lambda n: load[n]["chunks_per_s"]),
        ("RSS after load (MiB)", lambda n: r["rss_after_load_mib"].get(n)),
    ]

    def fmt(v):
        if v is None:
            return "–"
        return f"{v:,.0f}" if v >= 100 else f"{v:.3f}" if v < 10 else f"{v:.1f}"
    out = ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for label, get in rows:
        out.append(f"| {label} | " + " | ".join(fmt(get(n)) for n in names) + " |")
    out.append("")
    out.append("| ratio (same run) | value | target |")
    out.append("|---|---|---|")
    targets = {
        "c64_rps_vs_fastapi": "≥ 6", "c64_rps_no_history_vs_fastapi": "(info)", "c1_p50_vs_fastapi": "≤ 0.25",
        "ttfc_vs_fastapi": "≤ 0.5", "chunks_per_s_vs_fastapi": "≥ 1", "startup_vs_fastapi": "≤ 0.5",
        "c64_rps_vs_runagent": "≥ 500", "c64_rps_auth_vs_off": "≥ 0.9", "c1_rps_auth_vs_off": "≥ 0.9",
        "new_vs_old_c64_rps": "≈ 1", "new_vs_old_c1_rps": "≈ 1", "new_vs_old_c1_p50": "≈ 1",
        "new_vs_old_ttfc": "≈ 1", "new_vs_old_chunks_per_s": "≈ 1", "new_vs_old_startup": "≈ 1",
    }
    for k, v in r["ratios"].items():
        out.append(f"| {k} | {v:.2f} | {targets.get(k, '')} |")
    out.append(f"| health latency while a slow sync generator streams (Agentry) | "
               f"{r['health_during_slow_stream_ms']['agentry']:.0f} ms | (RunAgent: 1,720 ms) |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
