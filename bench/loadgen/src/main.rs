//! The durable-runs benchmark client. It drives `POST /v1/runs` with the load shape of the
//! Celery baseline's `bench.py` and prints one JSON object:
//!
//! 1. warm-up: `--warmup` no-op runs, each awaited;
//! 2. idle latency: `--lat-n` sequential `stamp(i, submitted_at)` runs after 20 unmeasured ones.
//!    enqueue→start = the agent's `time.time()` at the top of its body minus the client's clock
//!    just before the POST; round trip = until `GET /v1/runs/{id}/wait` answered it terminal;
//! 3. throughput: `--n` no-op runs `work(i)` submitted by `--threads` concurrent submitters
//!    (submitter k sends i = k, k+threads, …). When all have submitted, each fetches every
//!    result of its own with `GET /v1/runs/{id}/wait` and checks it is `{"i": i}`;
//! 4. CPU seconds of this client, of the servers with their workers (`--server-pid`, once per
//!    node) and of the database (`--db-pid`: PostgreSQL's postmaster, its backends included,
//!    the ended ones too) during phase 3, as CPU µs per run.
//!
//! With several `--url`s (nodes of one cluster), submitter k sends its runs to node k mod n
//! and fetches their results from the same node.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use clap::Parser;
use serde_json::{Value, json};

#[derive(Parser)]
struct Args {
    /// Server base URL; repeated for several nodes.
    #[arg(long, default_value = "http://127.0.0.1:8450")]
    url: Vec<String>,
    /// Agent id or name.
    #[arg(long, default_value = "runs_bench")]
    agent: String,
    #[arg(long, default_value_t = 10_000)]
    n: usize,
    #[arg(long, default_value_t = 32)]
    threads: usize,
    #[arg(long, default_value_t = 200)]
    lat_n: usize,
    #[arg(long, default_value_t = 200)]
    warmup: usize,
    /// A server's pid, to count its and its workers' CPU; repeated for several nodes.
    #[arg(long)]
    server_pid: Vec<i32>,
    /// The database server's pid (PostgreSQL's postmaster), to count its CPU.
    #[arg(long)]
    db_pid: Option<i32>,
    #[arg(long, default_value = "")]
    label: String,
}

fn now_s() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// utime+stime of `pid` and of every process whose parent it is, in seconds; with `reaped`,
/// also of the children `pid` has waited for (PostgreSQL's ended backends).
fn tree_cpu_s(pid: i32, reaped: bool) -> f64 {
    let tick = 100.0; // USER_HZ on Linux
    let mut total = 0.0;
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(p) = name.to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ppid: i32 = f.get(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        if p == pid || ppid == pid {
            let ut: f64 = f.get(11).and_then(|s| s.parse().ok()).unwrap_or(0.0);
            let st: f64 = f.get(12).and_then(|s| s.parse().ok()).unwrap_or(0.0);
            total += (ut + st) / tick;
            if reaped && p == pid {
                let cut: f64 = f.get(13).and_then(|s| s.parse().ok()).unwrap_or(0.0);
                let cst: f64 = f.get(14).and_then(|s| s.parse().ok()).unwrap_or(0.0);
                total += (cut + cst) / tick;
            }
        }
    }
    total
}

fn self_cpu_s() -> f64 {
    let u = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF);
    u.map(|u| {
        let t = |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 / 1e6;
        t(u.user_time()) + t(u.system_time())
    })
    .unwrap_or(0.0)
}

struct Client {
    http: reqwest::Client,
    url: String,
    agent: String,
}

impl Client {
    async fn submit(&self, entrypoint: &str, input: Value) -> anyhow::Result<String> {
        let body = json!({"agent": self.agent, "entrypoint": entrypoint, "input": input});
        let resp = self
            .http
            .post(format!("{}/v1/runs", self.url))
            .json(&body)
            .send()
            .await?;
        let status = resp.status();
        let v: Value = resp.json().await?;
        if status.as_u16() != 202 {
            bail!("POST /v1/runs answered {status}: {v}");
        }
        Ok(v["id"].as_str().context("no run id")?.to_string())
    }

    async fn wait(&self, id: &str) -> anyhow::Result<Value> {
        loop {
            let v: Value = self
                .http
                .get(format!("{}/v1/runs/{id}/wait?timeout_s=60", self.url))
                .send()
                .await?
                .json()
                .await?;
            match v["status"].as_str() {
                Some("succeeded") => return Ok(v["output"].clone()),
                Some("queued" | "running") => continue,
                _ => bail!("run {id} ended {v}"),
            }
        }
    }
}

fn summary_ms(mut xs: Vec<f64>) -> Value {
    xs.sort_by(f64::total_cmp);
    let pct = |p: f64| xs[((p * xs.len() as f64) as usize).min(xs.len() - 1)] * 1000.0;
    let mean = xs.iter().sum::<f64>() / xs.len() as f64 * 1000.0;
    let r = |x: f64| (x * 1000.0).round() / 1000.0;
    json!({"p50": r(pct(0.5)), "p90": r(pct(0.9)), "p99": r(pct(0.99)), "mean": r(mean), "max": r(xs[xs.len() - 1] * 1000.0)})
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // reqwest's TLS (for an https:// target) takes the process's crypto provider.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(args.threads * 2)
        .tcp_nodelay(true)
        .build()?;
    let nodes: Vec<Arc<Client>> = args
        .url
        .iter()
        .map(|url| {
            Arc::new(Client {
                http: http.clone(),
                url: url.trim_end_matches('/').to_string(),
                agent: args.agent.clone(),
            })
        })
        .collect();
    let client = Arc::clone(&nodes[0]);
    let servers_cpu = || {
        args.server_pid
            .iter()
            .map(|p| tree_cpu_s(*p, false))
            .sum::<f64>()
    };
    let db_cpu = || args.db_pid.map_or(0.0, |p| tree_cpu_s(p, true));

    // 1. warm-up
    let t = Instant::now();
    let first = client.submit("work", json!({"i": -1})).await?;
    client.wait(&first).await?;
    let first_s = t.elapsed().as_secs_f64();
    let warm: Vec<_> = (0..args.warmup)
        .map(|k| {
            let c = Arc::clone(&client);
            tokio::spawn(async move {
                let id = c.submit("work", json!({"i": -2 - k as i64})).await?;
                c.wait(&id).await
            })
        })
        .collect();
    for w in warm {
        w.await??;
    }

    // 2. idle latency
    let (mut enq_start, mut round_trip) = (Vec::new(), Vec::new());
    for k in 0..(20 + args.lat_n) {
        let t0 = now_s();
        let id = client
            .submit("stamp", json!({"i": k, "submitted_at": t0}))
            .await?;
        let out = client.wait(&id).await?;
        let t1 = now_s();
        if k >= 20 {
            enq_start.push(out["started_at"].as_f64().unwrap_or(0.0) - t0);
            round_trip.push(t1 - t0);
        }
    }

    // 3. throughput
    let cpu_client0 = self_cpu_s();
    let (cpu_server0, cpu_db0) = (servers_cpu(), db_cpu());
    let start = Instant::now();
    let barrier = Arc::new(tokio::sync::Barrier::new(args.threads));
    let tasks: Vec<_> = (0..args.threads)
        .map(|k| {
            let c = Arc::clone(&nodes[k % nodes.len()]);
            let barrier = Arc::clone(&barrier);
            let (n, threads) = (args.n, args.threads);
            tokio::spawn(async move {
                let idx: Vec<usize> = (k..n).step_by(threads).collect();
                let mut ids = Vec::with_capacity(idx.len());
                for i in &idx {
                    ids.push(c.submit("work", json!({"i": i})).await?);
                }
                let submitted = start.elapsed();
                barrier.wait().await;
                let mut bad = 0usize;
                for (i, id) in idx.iter().zip(&ids) {
                    if c.wait(id).await? != json!({"i": i}) {
                        bad += 1;
                    }
                }
                anyhow::Ok((submitted, start.elapsed(), bad))
            })
        })
        .collect();
    let mut submit_end = Duration::ZERO;
    let mut done_end = Duration::ZERO;
    let mut errors = Vec::new();
    for t in tasks {
        match t.await? {
            Ok((s, d, bad)) => {
                submit_end = submit_end.max(s);
                done_end = done_end.max(d);
                if bad > 0 {
                    errors.push(format!("{bad} wrong results"));
                }
            }
            Err(e) => errors.push(e.to_string()),
        }
    }
    let cpu_client = self_cpu_s() - cpu_client0;
    let cpu_server = servers_cpu() - cpu_server0;
    let cpu_db = db_cpu() - cpu_db0;
    let cpu_total = cpu_client + cpu_server + cpu_db;
    let r1 = |x: f64| (x * 10.0).round() / 10.0;
    let r2 = |x: f64| (x * 100.0).round() / 100.0;
    println!(
        "{}",
        json!({
            "label": args.label,
            "n": args.n,
            "threads": args.threads,
            "submit_runs_per_s": r1(args.n as f64 / submit_end.as_secs_f64()),
            "e2e_runs_per_s": r1(args.n as f64 / done_end.as_secs_f64()),
            "submit_s": submit_end.as_secs_f64(),
            "e2e_s": done_end.as_secs_f64(),
            "enqueue_to_start_ms": summary_ms(enq_start),
            "round_trip_ms": summary_ms(round_trip),
            "lat_n": args.lat_n,
            "nodes": nodes.len(),
            "cpu_s": {"client": r2(cpu_client), "server": r2(cpu_server), "database": r2(cpu_db)},
            "cpu_us_per_run": r1(cpu_total / args.n as f64 * 1e6),
            "db_cpu_us_per_run": r1(cpu_db / args.n as f64 * 1e6),
            "first_run_s": first_s,
            "errors": errors,
        })
    );
    Ok(())
}
