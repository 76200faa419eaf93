//! Section 8, `proxy`: the sidecar proxy (release binary, started from an admitted pod's
//! spec against the operator's broker) beside nginx configured as the same header-injecting
//! TLS reverse proxy with upstream keepalive, and beside calling the fake provider directly.
//! Load from wrk (small JSON) and from this process (SSE streams). One table.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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

/// One wrk run.
#[derive(Debug, Clone, Copy, Default)]
struct Load {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    requests: u64,
    errors: u64,
    /// CPU seconds the proxy process(es) used during the run.
    cpu_s: f64,
}

/// Who answers: the fake provider itself, nginx, or our proxy.
struct Target {
    name: &'static str,
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
        if let Some(rest) = t.split(" requests in ").next()
            && t.contains(" requests in ")
        {
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

/// utime + stime of `pid` and its children threads, in seconds.
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

/// Resident set size of the processes, MiB.
fn rss_mib(pids: &[u32]) -> f64 {
    pids.iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
        .filter_map(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .sum::<f64>()
        / 1024.0
}

fn wrk(target: &Target, conns: u32, seconds: u64, script: &Path) -> anyhow::Result<Load> {
    let threads = conns.clamp(1, 2);
    let cpu_before = cpu_seconds(&target.pids);
    let mut cmd = Command::new("wrk");
    cmd.args(["-t", &threads.to_string(), "-c", &conns.to_string()])
        .args(["-d", &format!("{seconds}s"), "--latency", "-s"])
        .arg(script)
        .arg(&target.url)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit());
    match &target.key {
        Some(k) => cmd.env("BENCH_KEY", k),
        None => cmd.env("BENCH_KEY", "byok-proxy"),
    };
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
/// header set, client credentials cleared, buffering off (SSE).
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

/// Times to the first SSE event and to the end of `streams` concurrent streams.
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

/// Peak RSS of `pids` while `running` holds.
fn watch_rss(pids: Vec<u32>, running: Arc<AtomicBool>, peak_kib: Arc<AtomicU64>) {
    std::thread::spawn(move || {
        while running.load(Ordering::Relaxed) {
            let now = (rss_mib(&pids) * 1024.0) as u64;
            peak_kib.fetch_max(now, Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(20));
        }
    });
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
    let seconds: u64 = env_or("BENCH_PROXY_SECONDS", 5);
    let streams: usize = env_or("BENCH_PROXY_STREAMS", 256);
    let script = dir.join("post.lua");
    std::fs::write(
        &script,
        format!(
            "wrk.method = \"POST\"\nwrk.body = '{BODY}'\nwrk.headers[\"content-type\"] = \"application/json\"\nwrk.headers[\"anthropic-version\"] = \"2023-06-01\"\nwrk.headers[\"x-api-key\"] = os.getenv(\"BENCH_KEY\")\n"
        ),
    )?;

    // Our proxy, from an admitted pod's spec, the release binary.
    let pod = env
        .api::<Pod>()
        .create(
            &PostParams::default(),
            &opted_in_pod("bench-proxy-", &[key_name]),
        )
        .await?;
    let token = pod_token(env, "default", &pod, byok_operator::names::TOKEN_AUDIENCE).await?;
    let trust = byok_e2e::sidecar::TrustBundleFile::mount(env).await?;
    let options = Options {
        binary: Some(PathBuf::from(binary)),
        output_file: Some(dir.join("proxy.log")),
        // e.g. "--no-access-log --workers=1", to see what they cost.
        extra_args: std::env::var("BENCH_PROXY_ARGS")
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_owned)
            .collect(),
        env: vec![(
            "BYOK_BROKER_CA_FILE".into(),
            trust.path.display().to_string(),
        )],
    };
    // Start -> ready, five times (the pod is in the broker's cache after the first).
    let mut ready_ms = Vec::new();
    for _ in 0..6 {
        let started = Instant::now();
        let mut sidecar = Sidecar::launch(broker_url, &pod, &token, options.clone()).await?;
        sidecar.wait_ready(Duration::from_secs(60)).await?;
        ready_ms.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    // The first start waited for the broker's pod cache; the others are the figure.
    let first_ready = ready_ms.remove(0);
    ready_ms.sort_by(f64::total_cmp);
    let mut sidecar = Sidecar::launch(broker_url, &pod, &token, options.clone()).await?;
    sidecar.wait_ready(Duration::from_secs(60)).await?;
    let ours_pid = sidecar.pid().context("the proxy exited")?;
    println!("  byok-proxy pid {ours_pid}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let ours_idle = rss_mib(&[ours_pid]);

    // nginx.
    let nginx_port = free_port()?;
    std::fs::write(
        dir.join("nginx.conf"),
        nginx_conf(dir, nginx_port, fake, key),
    )?;
    let mut nginx = Command::new("nginx")
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
        .context("starting nginx (apt-get install nginx-light)")?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", nginx_port)).is_err() {
        anyhow::ensure!(Instant::now() < deadline, "nginx did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let nginx_all = nginx_pids(nginx.id());
    let nginx_idle = rss_mib(&nginx_all);

    let targets = [
        Target {
            name: "direct",
            url: format!("{}/v1/messages", fake.base_url(ProviderKind::Anthropic)),
            key: Some(key.to_owned()),
            pids: Vec::new(),
        },
        Target {
            name: "nginx",
            url: format!("http://127.0.0.1:{nginx_port}/v1/messages"),
            key: None,
            pids: nginx_all.clone(),
        },
        Target {
            name: "byok-proxy",
            url: format!("{}/v1/messages", sidecar.url(key_name)),
            key: None,
            pids: vec![ours_pid],
        },
    ];

    fake.set_recording(false);
    let result = measure(&targets, seconds, &script, streams, fake, key, dir).await;
    fake.set_recording(true);
    fake.set_stream_plan(3, Duration::ZERO);
    let _ = Command::new("kill")
        .args(["-QUIT", &nginx.id().to_string()])
        .status();
    let _ = nginx.wait();
    let measured = result?;

    let [direct, ngx, ours] = &measured.loads;
    println!();
    println!(
        "byok-operator bench: proxy (POST /v1/messages, small JSON; the fake provider over TLS on loopback; wrk {seconds} s per run; nginx {} with 2 workers, byok-proxy with 2 threads; both log each request)",
        nginx_version()
    );
    println!(
        "| connections | direct req/s | nginx req/s | byok req/s | byok/nginx (aim ≥ 0.9) | direct p50 / p99 | nginx added p50 / p99 | byok added p50 / p99 (aim ≤ 1.2× nginx, p99 < 1 ms) |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (i, conns) in CONNS.iter().enumerate() {
        let (d, n, o) = (direct[i], ngx[i], ours[i]);
        println!(
            "| {conns} | {:.0} | {:.0} | {:.0} | {:.2} | {:.3} / {:.3} ms | {:+.3} / {:+.3} ms | {:+.3} / {:+.3} ms{} |",
            d.rps,
            n.rps,
            o.rps,
            o.rps / n.rps,
            d.p50_ms,
            d.p99_ms,
            n.p50_ms - d.p50_ms,
            n.p99_ms - d.p99_ms,
            o.p50_ms - d.p50_ms,
            o.p99_ms - d.p99_ms,
            if n.errors + o.errors + d.errors > 0 {
                format!(
                    " (errors: direct {}, nginx {}, byok {})",
                    d.errors, n.errors, o.errors
                )
            } else {
                String::new()
            }
        );
    }
    let last = CONNS.len() - 1;
    let per_req = |l: &Load| l.cpu_s / (l.requests.max(1) as f64) * 1e6;
    println!(
        "| CPU per request at {} connections | | {:.1} µs | {:.1} µs | | | | |",
        CONNS[last],
        per_req(&ngx[last]),
        per_req(&ours[last])
    );
    let (d_ttfe, d_total) = &measured.sse[0];
    for (i, name) in ["nginx", "byok-proxy"].iter().enumerate() {
        let (ttfe, total) = &measured.sse[i + 1];
        println!(
            "| {streams} SSE streams ({} events, {} ms apart), {name} | time to first event added p50 / p99: {:+.1} / {:+.1} ms | all events delivered added p50 / p99: {:+.1} / {:+.1} ms | | | | | |",
            SSE_EVENTS,
            SSE_INTERVAL.as_millis(),
            pct(ttfe, 0.5) - pct(d_ttfe, 0.5),
            pct(ttfe, 0.99) - pct(d_ttfe, 0.99),
            pct(total, 0.5) - pct(d_total, 0.5),
            pct(total, 0.99) - pct(d_total, 0.99),
        );
    }
    println!(
        "| direct SSE baseline | time to first event p50 {:.1} ms | all events p50 {:.1} ms | | | | | |",
        pct(d_ttfe, 0.5),
        pct(d_total, 0.5)
    );
    println!(
        "| RSS | byok-proxy idle {ours_idle:.1} MiB (aim ≤ 10), peak under load {:.1} MiB, peak at {streams} streams {:.1} MiB (aim ≤ 32) | nginx (master + 2 workers) idle {nginx_idle:.1} MiB, peak {:.1} MiB | | | | | |",
        measured.ours_peak_load, measured.ours_peak_sse, measured.nginx_peak
    );
    println!(
        "| start → ready (spawn to /readyz 200, broker on loopback) | p50 {:.1} ms, max {:.1} ms over {} starts (aim ≤ 200 ms); first start {first_ready:.0} ms (includes the broker's cache seeing the new pod) | | | | | | |",
        pct(&ready_ms, 0.5),
        pct(&ready_ms, 1.0),
        ready_ms.len()
    );
    drop(sidecar);
    Ok(())
}

const CONNS: [u32; 3] = [1, 16, 64];
const SSE_EVENTS: usize = 20;
const SSE_INTERVAL: Duration = Duration::from_millis(50);

struct Measured {
    /// direct, nginx, ours; one per CONNS.
    loads: [Vec<Load>; 3],
    /// direct, nginx, ours: (time to first event, total), sorted, ms.
    sse: Vec<(Vec<f64>, Vec<f64>)>,
    ours_peak_load: f64,
    ours_peak_sse: f64,
    nginx_peak: f64,
}

async fn measure(
    targets: &[Target; 3],
    seconds: u64,
    script: &Path,
    streams: usize,
    fake: &FakeProvider,
    key: &str,
    dir: &Path,
) -> anyhow::Result<Measured> {
    let running = Arc::new(AtomicBool::new(true));
    let ours_peak = Arc::new(AtomicU64::new(0));
    let nginx_peak = Arc::new(AtomicU64::new(0));
    watch_rss(targets[2].pids.clone(), running.clone(), ours_peak.clone());
    watch_rss(targets[1].pids.clone(), running.clone(), nginx_peak.clone());

    let mut loads: [Vec<Load>; 3] = Default::default();
    for &conns in &CONNS {
        // Interleaved per connection count, so drift on a shared machine hits all three.
        for (i, target) in targets.iter().enumerate() {
            wrk(target, conns, 1, script)?; // warm-up: connections, pools, caches
            let dialled = fake.connections();
            let load = wrk(target, conns, seconds, script)?;
            println!(
                "  {:<10} {conns:>2} connections: {:>8.0} req/s, p50 {:.3} ms, p99 {:.3} ms, {} errors, {} new upstream connections",
                target.name,
                load.rps,
                load.p50_ms,
                load.p99_ms,
                load.errors,
                fake.connections() - dialled
            );
            anyhow::ensure!(
                load.errors == 0,
                "{} answered errors under load (see {})",
                target.name,
                dir.display()
            );
            loads[i].push(load);
        }
    }
    let ours_peak_load = ours_peak.swap(0, Ordering::Relaxed) as f64 / 1024.0;

    fake.set_stream_plan(SSE_EVENTS, SSE_INTERVAL);
    let ca = std::fs::read(dir.join("ca.pem"))?;
    let direct_client = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(&ca)?])
        .pool_max_idle_per_host(streams)
        .build()?;
    let plain = reqwest::Client::builder()
        .pool_max_idle_per_host(streams)
        .build()?;
    let mut sse_results = Vec::new();
    for (i, target) in targets.iter().enumerate() {
        let client = if i == 0 { &direct_client } else { &plain };
        let k = target.key.as_deref().unwrap_or("byok-proxy");
        let _ = sse(client, &target.url, k, 8).await?; // warm-up
        sse_results.push(sse(client, &target.url, k, streams).await?);
        println!("  {:<10} {streams} SSE streams done", target.name);
    }
    let _ = key;
    running.store(false, Ordering::Relaxed);
    Ok(Measured {
        loads,
        sse: sse_results,
        ours_peak_load,
        ours_peak_sse: ours_peak.load(Ordering::Relaxed) as f64 / 1024.0,
        nginx_peak: nginx_peak.load(Ordering::Relaxed) as f64 / 1024.0,
    })
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
}
