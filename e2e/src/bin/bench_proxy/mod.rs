//! Section 8, `proxy`: the one place the sidecar's speed figures come from.
//!
//! The sidecar (the shipped static binary, `make static`: musl, musl's malloc, profile
//! `sidecar`), started from an admitted pod's spec against the operator's broker, beside
//! nginx configured as the same header-adding TLS reverse proxy with upstream keep-alive,
//! beside `hop` (`e2e/src/bin/hop.rs`, the minimal hyper hop: what a Rust hop can do), and
//! beside calling the fake provider directly (the baseline). nginx, hop and byok-proxy run
//! 2 workers each; nginx and byok-proxy write one access line per request to a file; a
//! second byok-proxy runs with `--no-access-log` to price the log.
//!
//! Small JSON POSTs from `wrk -t1` at 1, 16 and 64 connections, `BENCH_PROXY_SECONDS` (10)
//! a cell, interleaved (direct nginx hop byok byok-no-log, 3 rounds per connection count) so
//! the drift of a shared machine hits every target alike; then `BENCH_PROXY_STREAMS` (256)
//! concurrent SSE streams from this process, 3 interleaved rounds. Every round is printed,
//! then per connection count the median and min–max of the ratios, CPU per request (utime +
//! stime from /proc), p99s and the aims with PASS/FAIL on the median. A missed aim is
//! printed, never an error; errors are non-2xx answers and failed runs.
//!
//! Then (unless `BENCH_PROXY_H2=0`) byok with its provider over HTTP/2 beside HTTP/1.1
//! ([`H2Run`]).
//!
//! `BENCH_PROXY_CALLGRIND=1` then runs byok-proxy and hop under valgrind's callgrind and
//! prints instructions per request (the profile figure; perf's counters are not available
//! in most VMs).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use byok_e2e::envtest::TestEnv;
use byok_e2e::fake_provider::FakeProvider;
use byok_e2e::operator::free_port;
use byok_e2e::serving::{opted_in_pod, pod_token};
use byok_e2e::sidecar::{Options, Sidecar};
use byok_operator::providers::ProviderKind;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::PostParams;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

const BODY: &str =
    r#"{"model":"claude-sonnet-4-5","max_tokens":16,"messages":[{"role":"user","content":"hi"}]}"#;

const CONNS: [u32; 3] = [1, 16, 64];
const ROUNDS: usize = 3;
const SSE_EVENTS: usize = 20;
const SSE_INTERVAL: Duration = Duration::from_millis(50);

/// The targets, in the order every round runs them.
const DIRECT: usize = 0;
const NGINX: usize = 1;
const HOP: usize = 2;
const BYOK: usize = 3;
const NOLOG: usize = 4;
const NAMES: [&str; 5] = ["direct", "nginx", "hop", "byok", "byok-no-log"];

/// One wrk run.
#[derive(Debug, Clone, Copy, Default)]
struct Load {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    requests: u64,
    errors: u64,
    /// CPU seconds the target's process(es) used during the run.
    cpu_s: f64,
}

impl Load {
    /// CPU per request, µs.
    fn cpu_us(&self) -> f64 {
        self.cpu_s / (self.requests.max(1) as f64) * 1e6
    }
}

/// Who answers: the fake provider itself, nginx, hop or byok-proxy.
struct Target {
    url: String,
    /// The real key (direct only; never printed).
    key: Option<String>,
    pids: Vec<u32>,
}

fn parse_ms(v: &str) -> Option<f64> {
    let v = v.trim();
    let (num, factor) = if let Some(n) = v.strip_suffix("us") {
        (n, 0.001)
    } else if let Some(n) = v.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1000.0)
    } else {
        (v, 1.0)
    };
    num.parse::<f64>().ok().map(|n| n * factor)
}

/// Parses wrk's `--latency` report.
fn parse_wrk(out: &str) -> Load {
    let mut load = Load::default();
    for line in out.lines() {
        let t = line.trim();
        let mut words = t.split_whitespace();
        match (words.next(), words.next()) {
            (Some("50%"), Some(v)) => load.p50_ms = parse_ms(v).unwrap_or(f64::NAN),
            (Some("99%"), Some(v)) => load.p99_ms = parse_ms(v).unwrap_or(f64::NAN),
            (Some("Requests/sec:"), Some(v)) => load.rps = v.parse().unwrap_or(0.0),
            _ => {}
        }
        if let Some((rest, _)) = t.split_once(" requests in ") {
            load.requests = rest.trim().parse().unwrap_or(0);
        }
        if t.starts_with("Non-2xx or 3xx responses:") {
            load.errors += t
                .rsplit(' ')
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
        }
        if t.starts_with("Socket errors:") {
            load.errors += t
                .split(',')
                .filter_map(|p| p.split_whitespace().last()?.parse::<u64>().ok())
                .sum::<u64>();
        }
    }
    load
}

/// utime + stime of the processes (all their threads), in seconds.
fn cpu_seconds(pids: &[u32]) -> f64 {
    pids.iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
        .filter_map(|stat| {
            let after = stat.rsplit_once(") ")?.1;
            let f: Vec<&str> = after.split_whitespace().collect();
            let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
            Some(ticks / 100.0)
        })
        .sum()
}

/// A `/proc/<pid>/status` field (`VmRSS`, `VmHWM`) summed over the processes, MiB.
fn status_mib(pids: &[u32], field: &str) -> f64 {
    pids.iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
        .filter_map(|s| {
            s.lines()
                .find(|l| l.strip_prefix(field).is_some_and(|r| r.starts_with(':')))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .sum::<f64>()
        / 1024.0
}

/// Resets the processes' VmHWM to their VmRSS (`clear_refs` 5); false if the kernel refused.
fn reset_hwm(pids: &[u32]) -> bool {
    pids.iter()
        .all(|pid| std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok())
}

fn wrk(target: &Target, conns: u32, seconds: u64, script: &Path) -> anyhow::Result<Load> {
    let cpu_before = cpu_seconds(&target.pids);
    let mut cmd = Command::new("wrk");
    cmd.args(["-t1", "-c", &conns.to_string()])
        .args(["-d", &format!("{seconds}s"), "--latency", "-s"])
        .arg(script)
        .arg(&target.url)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit());
    cmd.env("BENCH_KEY", target.key.as_deref().unwrap_or("byok-proxy"));
    let out = cmd.output().context("running wrk (apt-get install wrk)")?;
    anyhow::ensure!(
        out.status.success(),
        "wrk failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut load = parse_wrk(&String::from_utf8_lossy(&out.stdout));
    load.cpu_s = cpu_seconds(&target.pids) - cpu_before;
    Ok(load)
}

/// nginx as the same reverse proxy: TLS to the provider with upstream keepalive, the key
/// header set, client credentials cleared, buffering off (SSE), one access line a request.
fn nginx_conf(dir: &Path, port: u16, fake: &FakeProvider, key: &str) -> String {
    let d = dir.display();
    let upstream = fake.addr();
    format!(
        r#"daemon off;
worker_processes 2;
pid {d}/nginx.pid;
error_log {d}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log {d}/nginx-access.log combined buffer=64k;
  client_body_temp_path {d}/nginx-body;
  proxy_temp_path {d}/nginx-proxy;
  fastcgi_temp_path {d}/nginx-fastcgi;
  uwsgi_temp_path {d}/nginx-uwsgi;
  scgi_temp_path {d}/nginx-scgi;
  client_max_body_size 32m;
  upstream provider {{ server {upstream}; keepalive 128; }}
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location / {{
      proxy_pass https://provider/anthropic/;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host {upstream};
      proxy_set_header x-api-key "{key}";
      proxy_set_header authorization "";
      proxy_ssl_verify on;
      proxy_ssl_trusted_certificate {d}/ca.pem;
      # The fake's certificate names localhost (OpenSSL checks the name as a DNS name).
      proxy_ssl_name localhost;
      proxy_ssl_server_name on;
      proxy_ssl_session_reuse on;
      proxy_buffering off;
      proxy_request_buffering off;
    }}
  }}
}}
"#
    )
}

/// Times to the first SSE event and to the end of `streams` concurrent streams, sorted, ms.
async fn sse(
    client: &reqwest::Client,
    url: &str,
    key: &str,
    streams: usize,
) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    let body = r#"{"model":"claude-sonnet-4-5","max_tokens":16,"stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    let results: Vec<anyhow::Result<(f64, f64)>> = futures::stream::iter(0..streams)
        .map(|_| async move {
            let start = Instant::now();
            let mut res = client
                .post(url)
                .header("anthropic-version", "2023-06-01")
                .header("x-api-key", key)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await?;
            anyhow::ensure!(res.status() == 200, "status {}", res.status());
            let mut first = None;
            let mut seen = String::new();
            while let Some(chunk) = res.chunk().await? {
                seen.push_str(&String::from_utf8_lossy(&chunk));
                if first.is_none() && seen.contains("chunk-0") {
                    first = Some(start.elapsed());
                }
            }
            anyhow::ensure!(seen.contains("message_stop"), "incomplete stream");
            let first = first.context("no event")?;
            Ok((
                first.as_secs_f64() * 1000.0,
                start.elapsed().as_secs_f64() * 1000.0,
            ))
        })
        .buffer_unordered(streams)
        .collect()
        .await;
    let mut ttfe = Vec::new();
    let mut total = Vec::new();
    for r in results {
        let (a, b) = r?;
        ttfe.push(a);
        total.push(b);
    }
    ttfe.sort_by(f64::total_cmp);
    total.sort_by(f64::total_cmp);
    Ok((ttfe, total))
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Median, min and max.
fn spread(values: impl IntoIterator<Item = f64>) -> (f64, f64, f64) {
    let mut v: Vec<f64> = values.into_iter().collect();
    v.sort_by(f64::total_cmp);
    (pct(&v, 0.5), pct(&v, 0.0), pct(&v, 1.0))
}

fn verdict(pass: bool) -> &'static str {
    if pass { "PASS" } else { "FAIL" }
}

fn nginx_pids(master: u32) -> Vec<u32> {
    let mut pids = vec![master];
    if let Ok(out) = Command::new("pgrep")
        .args(["-P", &master.to_string()])
        .output()
    {
        pids.extend(
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter_map(|l| l.trim().parse::<u32>().ok()),
        );
    }
    pids
}

fn nginx_version() -> String {
    Command::new("nginx")
        .arg("-v")
        .output()
        .ok()
        .map(|o| {
            String::from_utf8_lossy(&o.stderr)
                .trim()
                .replace("nginx version: ", "")
        })
        .unwrap_or_else(|| "nginx".into())
}

async fn wait_listening(port: u16, what: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        anyhow::ensure!(Instant::now() < deadline, "{what} did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// A child process killed when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_nginx(dir: &Path, port: u16, fake: &FakeProvider, key: &str) -> anyhow::Result<Child> {
    std::fs::write(dir.join("nginx.conf"), nginx_conf(dir, port, fake, key))?;
    Command::new("nginx")
        .args(["-p"])
        .arg(dir)
        .arg("-c")
        .arg(dir.join("nginx.conf"))
        .arg("-e")
        .arg(dir.join("nginx-error.log"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting nginx (apt-get install nginx-light)")
}

/// The hop fixture, next to this binary (`cargo build --release -p byok-e2e --bin hop`).
fn hop_binary() -> anyhow::Result<PathBuf> {
    let hop = std::env::current_exe()?.with_file_name("hop");
    anyhow::ensure!(
        hop.exists(),
        "{} is missing: cargo build --release -p byok-e2e --bin hop",
        hop.display()
    );
    Ok(hop)
}

fn start_hop(
    wrapper: &[&str],
    port: u16,
    fake: &FakeProvider,
    key: &str,
    dir: &Path,
) -> anyhow::Result<Child> {
    let hop = hop_binary()?;
    let mut cmd = match wrapper.split_first() {
        Some((program, args)) => {
            let mut c = Command::new(program);
            c.args(args).arg(hop);
            c
        }
        None => Command::new(hop),
    };
    cmd.arg(format!("127.0.0.1:{port}"))
        .arg(fake.base_url(ProviderKind::Anthropic))
        .arg(dir.join("ca.pem"))
        .env("HOP_KEY", key)
        .env("HOP_WORKERS", "2")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(if wrapper.is_empty() {
            Stdio::inherit()
        } else {
            Stdio::null()
        })
        .spawn()
        .context("starting hop")
}

/// Everything measured, per connection count, round and target.
struct Measured {
    /// `loads[conns][round][target]`.
    loads: Vec<Vec<[Load; 5]>>,
    /// `sse[round][target]`: (time to first event, time to the last), sorted, ms; byok-no-log
    /// is not streamed (empty).
    sse: Vec<Vec<(Vec<f64>, Vec<f64>)>>,
}

/// The wrk cells: per connection count, 3 interleaved rounds of every target.
fn measure_load(
    targets: &[Target; 5],
    seconds: u64,
    script: &Path,
    fake: &FakeProvider,
    dir: &Path,
) -> anyhow::Result<Vec<Vec<[Load; 5]>>> {
    let mut loads = Vec::new();
    for &conns in &CONNS {
        for target in targets {
            wrk(target, conns, 1, script)?; // warm-up: connections, pools, caches
        }
        let mut rounds = Vec::new();
        for round in 1..=ROUNDS {
            let mut cells = [Load::default(); 5];
            for (i, target) in targets.iter().enumerate() {
                let dialled = fake.connections();
                let load = wrk(target, conns, seconds, script)?;
                println!(
                    "  round {round} {:<11} {conns:>2} connections: {:>7.0} req/s, p50 {:.3} ms, p99 {:.3} ms, {:>5.1} µs CPU/request, {} errors, {} new upstream connections",
                    NAMES[i],
                    load.rps,
                    load.p50_ms,
                    load.p99_ms,
                    load.cpu_us(),
                    load.errors,
                    fake.connections() - dialled
                );
                anyhow::ensure!(
                    load.errors == 0 && load.requests > 0,
                    "{} answered errors under load (see {})",
                    NAMES[i],
                    dir.display()
                );
                cells[i] = load;
            }
            rounds.push(cells);
        }
        loads.push(rounds);
    }
    Ok(loads)
}

/// The SSE rounds: every target but byok-no-log, interleaved.
async fn measure_sse(
    targets: &[Target; 5],
    streams: usize,
    dir: &Path,
) -> anyhow::Result<Vec<Vec<(Vec<f64>, Vec<f64>)>>> {
    let ca = std::fs::read(dir.join("ca.pem"))?;
    let direct_client = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(&ca)?])
        .pool_max_idle_per_host(streams)
        .build()?;
    let plain = reqwest::Client::builder()
        .pool_max_idle_per_host(streams)
        .build()?;
    for (i, target) in targets.iter().enumerate().take(NOLOG) {
        let client = if i == DIRECT { &direct_client } else { &plain };
        let k = target.key.as_deref().unwrap_or("byok-proxy");
        let _ = sse(client, &target.url, k, 8).await?; // warm-up
    }
    let mut rounds = Vec::new();
    for round in 1..=ROUNDS {
        let mut cells = Vec::new();
        for (i, target) in targets.iter().enumerate() {
            if i == NOLOG {
                cells.push((Vec::new(), Vec::new()));
                continue;
            }
            let client = if i == DIRECT { &direct_client } else { &plain };
            let k = target.key.as_deref().unwrap_or("byok-proxy");
            let (ttfe, total) = sse(client, &target.url, k, streams).await?;
            println!(
                "  round {round} {:<11} {streams} SSE streams: first event p50 {:.2} / p99 {:.2} ms, last event p50 {:.2} / p99 {:.2} ms",
                NAMES[i],
                pct(&ttfe, 0.5),
                pct(&ttfe, 0.99),
                pct(&total, 0.5),
                pct(&total, 0.99)
            );
            cells.push((ttfe, total));
        }
        rounds.push(cells);
    }
    Ok(rounds)
}

/// Memory figures, MiB.
#[derive(Default)]
struct Memory {
    byok_ready: f64,
    nginx_ready: f64,
    byok_sse_hwm: f64,
    nginx_sse_hwm: f64,
    /// The peak was reset before the SSE phase (else it is the peak since start).
    hwm_reset: bool,
}

#[allow(clippy::too_many_arguments)]
pub async fn run(
    env: &TestEnv,
    fake: &Arc<FakeProvider>,
    broker_url: &str,
    key_name: &str,
    key: &str,
    binary: &Path,
    dir: &Path,
) -> anyhow::Result<()> {
    let seconds: u64 = env_or("BENCH_PROXY_SECONDS", 10);
    let streams: usize = env_or("BENCH_PROXY_STREAMS", 256);
    let script = dir.join("post.lua");
    std::fs::write(
        &script,
        format!(
            "wrk.method = \"POST\"\nwrk.body = '{BODY}'\nwrk.headers[\"content-type\"] = \"application/json\"\nwrk.headers[\"anthropic-version\"] = \"2023-06-01\"\nwrk.headers[\"x-api-key\"] = os.getenv(\"BENCH_KEY\")\n"
        ),
    )?;

    // Our proxy, from an admitted pod's spec.
    let pod = env
        .api::<Pod>()
        .create(
            &PostParams::default(),
            &opted_in_pod("bench-proxy-", &[key_name]),
        )
        .await?;
    let token = pod_token(env, "default", &pod, byok_operator::names::TOKEN_AUDIENCE).await?;
    let trust = byok_e2e::sidecar::TrustBundleFile::mount(env).await?;
    let options = |log: &str, extra: &[&str]| Options {
        binary: Some(PathBuf::from(binary)),
        output_file: Some(dir.join(log)),
        extra_args: std::env::var("BENCH_PROXY_ARGS")
            .unwrap_or_default()
            .split_whitespace()
            .chain(extra.iter().copied())
            .map(str::to_owned)
            .collect(),
        env: vec![(
            "BYOK_BROKER_CA_FILE".into(),
            trust.path.display().to_string(),
        )],
    };
    if std::env::var("BENCH_PROXY_CALLGRIND").as_deref() == Ok("only") {
        return profile(
            broker_url,
            &pod,
            &token,
            (options("proxy-callgrind.log", &[]), &script),
            fake,
            key,
            dir,
        )
        .await;
    }
    // Start -> ready, five times (the pod is in the broker's cache after the first).
    let mut ready_ms = Vec::new();
    for _ in 0..6 {
        let started = Instant::now();
        let mut sidecar =
            Sidecar::launch(broker_url, &pod, &token, options("proxy-start.log", &[])).await?;
        sidecar.wait_ready(Duration::from_secs(60)).await?;
        ready_ms.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    let first_ready = ready_ms.remove(0);
    ready_ms.sort_by(f64::total_cmp);

    let mut memory = Memory::default();
    let mut ours = Sidecar::launch(broker_url, &pod, &token, options("proxy.log", &[])).await?;
    ours.wait_ready(Duration::from_secs(60)).await?;
    let ours_pid = ours.pid().context("the proxy exited")?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    memory.byok_ready = status_mib(&[ours_pid], "VmRSS");
    let mut nolog = Sidecar::launch(
        broker_url,
        &pod,
        &token,
        options("proxy-no-log.log", &["--no-access-log"]),
    )
    .await?;
    nolog.wait_ready(Duration::from_secs(60)).await?;
    let nolog_pid = nolog.pid().context("the proxy exited")?;

    let nginx_port = free_port()?;
    let nginx = Killed(start_nginx(dir, nginx_port, fake, key)?);
    wait_listening(nginx_port, "nginx").await?;
    let nginx_all = nginx_pids(nginx.0.id());
    tokio::time::sleep(Duration::from_millis(500)).await;
    memory.nginx_ready = status_mib(&nginx_all, "VmRSS");

    let hop_port = free_port()?;
    let hop = Killed(start_hop(&[], hop_port, fake, key, dir)?);
    wait_listening(hop_port, "hop").await?;

    let path = "/v1/messages";
    let targets = [
        Target {
            url: format!("{}{path}", fake.base_url(ProviderKind::Anthropic)),
            key: Some(key.to_owned()),
            pids: Vec::new(),
        },
        Target {
            url: format!("http://127.0.0.1:{nginx_port}{path}"),
            key: None,
            pids: nginx_all.clone(),
        },
        Target {
            url: format!("http://127.0.0.1:{hop_port}{path}"),
            key: None,
            pids: vec![hop.0.id()],
        },
        Target {
            url: format!("{}{path}", ours.url(key_name)),
            key: None,
            pids: vec![ours_pid],
        },
        Target {
            url: format!("{}{path}", nolog.url(key_name)),
            key: None,
            pids: vec![nolog_pid],
        },
    ];

    println!(
        "  byok-proxy {} (static musl build, profile sidecar, musl's malloc), pids {ours_pid} (access log) and {nolog_pid} (--no-access-log); nginx {} pids {nginx_all:?}; hop pid {}",
        binary.display(),
        nginx_version(),
        hop.0.id()
    );
    fake.set_recording(false);
    let measured = async {
        let loads = measure_load(&targets, seconds, &script, fake, dir)?;
        fake.set_stream_plan(SSE_EVENTS, SSE_INTERVAL);
        memory.hwm_reset = reset_hwm(&[ours_pid]) && reset_hwm(&nginx_all);
        let sse = measure_sse(&targets, streams, dir).await?;
        memory.byok_sse_hwm = status_mib(&[ours_pid], "VmHWM");
        memory.nginx_sse_hwm = status_mib(&nginx_all, "VmHWM");
        anyhow::Ok(Measured { loads, sse })
    }
    .await;
    fake.set_recording(true);
    fake.set_stream_plan(3, Duration::ZERO);
    let _ = Command::new("kill")
        .args(["-QUIT", &nginx.0.id().to_string()])
        .status();
    let measured = measured?;

    report(&measured, &memory, seconds, streams);
    if env_or("BENCH_PROXY_H2", 1u8) == 1 {
        let h2 = H2Run {
            env,
            fake,
            broker_url,
            key_name,
            options: options("proxy-h2.log", &[]),
        };
        h2.measure(&targets[BYOK], seconds, &script).await?;
    }
    println!(
        "  start → ready (spawn to /readyz 200, broker on loopback): p50 {:.1} ms, max {:.1} ms over {} starts (aim ≤ 200 ms); first start {first_ready:.0} ms (includes the broker's cache seeing the new pod)",
        pct(&ready_ms, 0.5),
        pct(&ready_ms, 1.0),
        ready_ms.len()
    );
    drop((ours, nolog, nginx, hop));

    if env_or("BENCH_PROXY_CALLGRIND", 0u8) == 1 {
        let run = |log: &str| (options(log, &[]), &script);
        profile(
            broker_url,
            &pod,
            &token,
            run("proxy-callgrind.log"),
            fake,
            key,
            dir,
        )
        .await?;
    }
    Ok(())
}

/// The same sidecar with its provider over HTTP/2: a second ProviderKey whose base URL is
/// the fake provider's h2 port ([`FakeProvider::listen_http2`]), against the first (HTTP/1.1,
/// as nginx's upstream), interleaved. The h2 port is a front in this process that passes
/// each request on to the fake over HTTP/1.1: it adds its own time to the h2 figures' req/s
/// and p99, not to byok's CPU per request, which is the comparison that holds.
struct H2Run<'a> {
    env: &'a TestEnv,
    fake: &'a Arc<FakeProvider>,
    broker_url: &'a str,
    key_name: &'a str,
    options: Options,
}

impl H2Run<'_> {
    async fn measure(self, h1: &Target, seconds: u64, script: &Path) -> anyhow::Result<()> {
        use byok_e2e::operator::{create_pk, is_condition, wait_pk};
        let addr = self.fake.listen_http2().await?;
        let name = format!("{}-h2", self.key_name);
        create_pk(
            self.env,
            &name,
            serde_json::json!({
                "provider": "anthropic",
                "secretRef": {"name": self.key_name},
                "baseURL": format!("https://{addr}/anthropic"),
            }),
        )
        .await?;
        wait_pk(self.env, &name, "Ready", |pk| {
            is_condition(pk, "Ready", "True", "Valid")
        })
        .await?;
        let pod = self
            .env
            .api::<Pod>()
            .create(&PostParams::default(), &opted_in_pod("bench-h2-", &[&name]))
            .await?;
        let token = pod_token(
            self.env,
            "default",
            &pod,
            byok_operator::names::TOKEN_AUDIENCE,
        )
        .await?;
        let mut sidecar = Sidecar::launch(self.broker_url, &pod, &token, self.options).await?;
        sidecar.wait_ready(Duration::from_secs(60)).await?;
        let h2 = Target {
            url: format!("{}/v1/messages", sidecar.url(&name)),
            key: None,
            pids: vec![sidecar.pid().context("the proxy exited")?],
        };
        println!(
            "  byok with its provider over HTTP/2 (h2) beside HTTP/1.1 (h1), {seconds} s a cell, {ROUNDS} interleaved rounds:"
        );
        for &conns in &CONNS {
            wrk(&h2, conns, 1, script)?;
            let mut cells: Vec<[Load; 2]> = Vec::new();
            let mut over_h2 = 0;
            for _ in 0..ROUNDS {
                let l1 = wrk(h1, conns, seconds, script)?;
                let before = self.fake.http2_requests();
                let l2 = wrk(&h2, conns, seconds, script)?;
                over_h2 += self.fake.http2_requests() - before;
                anyhow::ensure!(l1.errors == 0 && l2.errors == 0, "errors under load");
                cells.push([l1, l2]);
            }
            let each = |f: &dyn Fn(&[Load; 2]) -> f64| spread(cells.iter().map(f));
            let (rps1, rps2) = (each(&|c| c[0].rps), each(&|c| c[1].rps));
            let (cpu1, cpu2) = (each(&|c| c[0].cpu_us()), each(&|c| c[1].cpu_us()));
            let (p1, p2) = (each(&|c| c[0].p99_ms), each(&|c| c[1].p99_ms));
            let sent: u64 = cells.iter().map(|c| c[1].requests).sum();
            println!(
                "    {conns:>2} connections: req/s h1 {:.0}, h2 {:.0} ({:.2}× [{:.2}–{:.2}]); CPU per request h1 {:.1}, h2 {:.1} µs; p99 h1 {:.3}, h2 {:.3} ms; {over_h2} of {sent} h2 requests reached the provider over HTTP/2",
                rps1.0,
                rps2.0,
                each(&|c| c[1].rps / c[0].rps).0,
                each(&|c| c[1].rps / c[0].rps).1,
                each(&|c| c[1].rps / c[0].rps).2,
                cpu1.0,
                cpu2.0,
                p1.0,
                p2.0,
            );
        }
        Ok(())
    }
}

/// Per connection count: the ratios, CPU, p99s and their aims.
fn report_load(conns: u32, rounds: &[[Load; 5]]) {
    let each = |f: &dyn Fn(&[Load; 5]) -> f64| spread(rounds.iter().map(f));
    let ratio = |a: usize, b: usize| each(&|r: &[Load; 5]| r[a].rps / r[b].rps);
    let show = |(m, lo, hi): (f64, f64, f64)| format!("{m:.2} [{lo:.2}–{hi:.2}]");
    let rps: Vec<String> = (0..5)
        .map(|t| format!("{} {:.0}", NAMES[t], each(&|r| r[t].rps).0))
        .collect();
    println!("  {conns} connection(s), median [min–max] of {ROUNDS} rounds:");
    println!("    req/s: {}", rps.join(", "));
    let byok_nginx = ratio(BYOK, NGINX);
    let hop_nginx = ratio(HOP, NGINX);
    let nolog_byok = ratio(NOLOG, BYOK);
    println!(
        "    byok/nginx {}, hop/nginx {}, byok-no-log/byok {}",
        show(byok_nginx),
        show(hop_nginx),
        show(nolog_byok)
    );
    let cpu: Vec<String> = [NGINX, HOP, BYOK, NOLOG]
        .iter()
        .map(|&t| {
            let (m, lo, hi) = each(&|r| r[t].cpu_us());
            format!("{} {m:.1} [{lo:.1}–{hi:.1}]", NAMES[t])
        })
        .collect();
    println!("    CPU per request, µs: {}", cpu.join(", "));
    let p99: Vec<String> = (0..5)
        .map(|t| {
            let (m, lo, hi) = each(&|r| r[t].p99_ms);
            format!("{} {m:.3} [{lo:.3}–{hi:.3}]", NAMES[t])
        })
        .collect();
    println!("    p99, ms: {}", p99.join(", "));
    let rps_aim = if conns < 64 {
        let pass = byok_nginx.0 >= 1.0;
        format!(
            "req/s ≥ 1.0× nginx: {} ({:.2}×)",
            verdict(pass),
            byok_nginx.0
        )
    } else {
        let pass = byok_nginx.0 >= hop_nginx.0;
        format!(
            "req/s ≥ hop's ratio to nginx: {} ({:.2}× vs {:.2}×)",
            verdict(pass),
            byok_nginx.0,
            hop_nginx.0
        )
    };
    let (cpu_byok, cpu_nginx) = (
        each(&|r| r[BYOK].cpu_us()).0,
        each(&|r| r[NGINX].cpu_us()).0,
    );
    let (p99_byok, p99_nginx) = (each(&|r| r[BYOK].p99_ms).0, each(&|r| r[NGINX].p99_ms).0);
    let p99_aim = if conns < 64 {
        format!(
            "p99 ≤ nginx + 0.2 ms: {} ({:+.3} ms)",
            verdict(p99_byok <= p99_nginx + 0.2),
            p99_byok - p99_nginx
        )
    } else {
        format!(
            "p99 ≤ 1.2× nginx: {} ({:.2}×)",
            verdict(p99_byok <= 1.2 * p99_nginx),
            p99_byok / p99_nginx
        )
    };
    let log_cost = 1.0 - 1.0 / nolog_byok.0;
    println!(
        "    aims: {rps_aim}; CPU/request ≤ nginx: {} ({cpu_byok:.1} vs {cpu_nginx:.1} µs); {p99_aim}; access log ≤ 5 %: {} ({:.1} %)",
        verdict(cpu_byok <= cpu_nginx),
        verdict(log_cost <= 0.05),
        log_cost * 100.0
    );
}

/// SSE: time added to the direct call's (same round), median over rounds, and the aims.
fn report_sse(sse: &[Vec<(Vec<f64>, Vec<f64>)>], streams: usize) {
    // added[target][figure]: first p50, first p99, last p50, last p99.
    let added = |t: usize, figure: usize| {
        spread(sse.iter().map(|round| {
            let value = |i: usize| {
                let (first, last) = &round[i];
                match figure {
                    0 => pct(first, 0.5),
                    1 => pct(first, 0.99),
                    2 => pct(last, 0.5),
                    _ => pct(last, 0.99),
                }
            };
            value(t) - value(DIRECT)
        }))
        .0
    };
    let d = |figure| {
        spread(sse.iter().map(|r| {
            let (first, last) = &r[DIRECT];
            if figure == 0 {
                pct(first, 0.5)
            } else {
                pct(last, 0.5)
            }
        }))
        .0
    };
    println!(
        "  {streams} SSE streams ({SSE_EVENTS} events {} ms apart), median of {ROUNDS} rounds; direct: first event p50 {:.2} ms, last p50 {:.2} ms; added to direct:",
        SSE_INTERVAL.as_millis(),
        d(0),
        d(2)
    );
    for t in [NGINX, HOP, BYOK] {
        println!(
            "    {:<5} first event p50 {:+.2} / p99 {:+.2} ms, last event p50 {:+.2} / p99 {:+.2} ms",
            NAMES[t],
            added(t, 0),
            added(t, 1),
            added(t, 2),
            added(t, 3)
        );
    }
    let aim99 = |figure| 2f64.max(1.2 * added(NGINX, figure));
    println!(
        "    aims (byok): first p50 ≤ 1 ms: {}; last p50 ≤ 1 ms: {}; first p99 ≤ max(2 ms, 1.2× nginx) = {:.2} ms: {}; last p99 ≤ {:.2} ms: {}",
        verdict(added(BYOK, 0) <= 1.0),
        verdict(added(BYOK, 2) <= 1.0),
        aim99(1),
        verdict(added(BYOK, 1) <= aim99(1)),
        aim99(3),
        verdict(added(BYOK, 3) <= aim99(3)),
    );
}

fn report(m: &Measured, memory: &Memory, seconds: u64, streams: usize) {
    println!();
    println!(
        "byok-operator bench: proxy (POST /v1/messages, small JSON; the fake provider over TLS on loopback; wrk -t1, {seconds} s a cell, {ROUNDS} interleaved rounds per connection count; byok-proxy: static musl build, musl's malloc, 2 workers; nginx {}: worker_processes 2, access_log to a file (buffer=64k); byok's access log to stderr → a file; hop: hyper 1 + hyper-rustls, 2 workers, no log)",
        nginx_version()
    );
    for (i, &conns) in CONNS.iter().enumerate() {
        report_load(conns, &m.loads[i]);
    }
    report_sse(&m.sse, streams);
    println!(
        "  memory: byok VmRSS 500 ms after ready {:.1} MiB (aim ≤ 6: {}), VmHWM {} {:.1} MiB (aim ≤ 24: {}); nginx (master + 2 workers) VmRSS after start {:.1} MiB, VmHWM {:.1} MiB",
        memory.byok_ready,
        verdict(memory.byok_ready <= 6.0),
        if memory.hwm_reset {
            format!("across the {streams}-stream phase")
        } else {
            "since start (the peak could not be reset)".to_owned()
        },
        memory.byok_sse_hwm,
        verdict(memory.byok_sse_hwm <= 24.0),
        memory.nginx_ready,
        memory.nginx_sse_hwm
    );
}

/// The `totals:` (or `summary:`) of a callgrind dump.
fn callgrind_total(dump: &Path) -> anyhow::Result<u64> {
    let text = std::fs::read_to_string(dump)?;
    text.lines()
        .find_map(|l| {
            l.strip_prefix("totals:")
                .or_else(|| l.strip_prefix("summary:"))
        })
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no totals in {}", dump.display()))
}

/// Instructions per request of a process run under callgrind: counters zeroed after a
/// warm-up, dumped after a measured wrk run.
fn instructions_per_request(
    pid: u32,
    url: &str,
    script: &Path,
    conns: u32,
    out: &Path,
) -> anyhow::Result<f64> {
    let target = Target {
        url: url.to_owned(),
        key: None,
        pids: Vec::new(),
    };
    wrk(&target, conns, 2, script)?;
    let control = |arg: &str| {
        Command::new("callgrind_control")
            .args([arg, &pid.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
    };
    anyhow::ensure!(control("-z")?.success(), "callgrind_control -z failed");
    let load = wrk(&target, conns, 5, script)?;
    anyhow::ensure!(load.errors == 0, "errors under callgrind");
    anyhow::ensure!(control("-d")?.success(), "callgrind_control -d failed");
    // The newest dump of this process.
    let newest = std::fs::read_dir(out.parent().context("dir")?)?
        .filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(&*out.file_name().unwrap_or_default().to_string_lossy())
        })
        .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok())
        .context("no callgrind dump")?;
    Ok(callgrind_total(&newest.path())? as f64 / load.requests.max(1) as f64)
}

/// byok-proxy (with and without its access log) and hop under callgrind: instructions per
/// request at 1 and 16 connections.
async fn profile(
    broker_url: &str,
    pod: &Pod,
    token: &str,
    (options, script): (Options, &PathBuf),
    fake: &FakeProvider,
    key: &str,
    dir: &Path,
) -> anyhow::Result<()> {
    fake.set_recording(false);
    let mut lines = Vec::new();
    // BENCH_PROXY_CALLGRIND_BINARIES: other builds to compare, `:`-separated.
    let mut binaries: Vec<PathBuf> = options.binary.iter().cloned().collect();
    binaries.extend(
        std::env::var("BENCH_PROXY_CALLGRIND_BINARIES")
            .unwrap_or_default()
            .split(':')
            .filter(|b| !b.is_empty())
            .map(PathBuf::from),
    );
    for (binary, (name, extra)) in binaries
        .iter()
        .flat_map(|b| [("byok", None), ("byok-no-log", Some("--no-access-log"))].map(|n| (b, n)))
    {
        let name = &format!("{name} ({})", binary.display());
        let tag = lines.len();
        let out = dir.join(format!("callgrind.byok{tag}"));
        let wrapper = dir.join(format!("callgrind-byok{tag}.sh"));
        std::fs::write(
            &wrapper,
            format!(
                "#!/bin/sh\nexec /usr/bin/valgrind --tool=callgrind --callgrind-out-file={} {} \"$@\"\n",
                out.display(),
                binary.display()
            ),
        )?;
        std::fs::set_permissions(
            &wrapper,
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )?;
        let mut opts = options.clone();
        opts.binary = Some(wrapper);
        opts.extra_args.extend(extra.map(str::to_owned));
        let mut sidecar = Sidecar::launch(broker_url, pod, token, opts).await?;
        sidecar.wait_ready(Duration::from_secs(120)).await?;
        let pid = sidecar.pid().context("exited")?;
        let url = format!(
            "{}/v1/messages",
            sidecar.url(&sidecar.ports.keys().next().cloned().unwrap_or_default())
        );
        let mut figures = Vec::new();
        for conns in [1, 16] {
            let ir = instructions_per_request(pid, &url, script, conns, &out)?;
            figures.push(format!("{ir:.0}"));
        }
        lines.push(format!("{name}: {}", figures.join(" / ")));
    }
    let hop_port = free_port()?;
    let out = dir.join("callgrind.hop");
    let flag = format!("--callgrind-out-file={}", out.display());
    let hop = Killed(start_hop(
        &["valgrind", "--tool=callgrind", &flag],
        hop_port,
        fake,
        key,
        dir,
    )?);
    tokio::time::sleep(Duration::from_secs(2)).await;
    wait_listening(hop_port, "hop under callgrind").await?;
    let mut figures = Vec::new();
    for conns in [1, 16] {
        let ir = instructions_per_request(
            hop.0.id(),
            &format!("http://127.0.0.1:{hop_port}/v1/messages"),
            script,
            conns,
            &out,
        )?;
        figures.push(format!("{ir:.0}"));
    }
    lines.push(format!("hop: {}", figures.join(" / ")));
    drop(hop);
    fake.set_recording(true);
    println!("  callgrind, instructions per request at 1 and 16 connections:");
    for line in lines {
        println!("    {line}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_reports_parse() {
        let out = "Running 5s test @ http://127.0.0.1:1/v1/messages\n  2 threads and 16 connections\n  Latency Distribution\n     50%  431.00us\n     75%  600.00us\n     90%    1.00ms\n     99%    2.05ms\n  51234 requests in 5.00s, 10.00MB read\n  Non-2xx or 3xx responses: 3\nRequests/sec:  10246.80\n";
        let l = parse_wrk(out);
        assert!((l.p50_ms - 0.431).abs() < 1e-9);
        assert!((l.p99_ms - 2.05).abs() < 1e-9);
        assert_eq!(l.requests, 51234);
        assert_eq!(l.errors, 3);
        assert!((l.rps - 10246.8).abs() < 1e-9);
    }

    #[test]
    fn spread_is_median_min_max() {
        assert_eq!(spread([3.0, 1.0, 2.0]), (2.0, 1.0, 3.0));
    }
}
