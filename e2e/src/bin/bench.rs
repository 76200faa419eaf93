//! `make bench`: the release `byok-operator` binary against the local control plane and the
//! fake provider, side by side with the aims. Prints figures; asserts nothing about speed (the
//! machines are shared and noisy).
//!
//! Sections:
//! 1. apply -> Ready, one key at a time;
//! 2. scale: `BENCH_KEYS` ProviderKeys (default 10,000) across 100 namespaces: time to all
//!    Ready, peak verification calls per second against the per-host limit, calls per new
//!    key, operator memory at rest and peak;
//! 3. steady state: API requests per reconcile when nothing changed;
//! 4. spec change -> status, p50/p99;
//! 5. a restart: verification calls in the first minute, API requests it cost.
//!
//! Environment: `BENCH_KEYS`, `BENCH_NAMESPACES` (100), `BENCH_VERIFY_RATE` (100 calls/s per
//! host), `BENCH_VERIFY_CONCURRENCY` (16), `BENCH_UNRELATED_SECRETS` (1000 Secrets of 4 KiB
//! that are not key sources), `BENCH_RESTART_WINDOW` (60 s).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use byok_e2e::envtest::{TestEnv, shared};
use byok_e2e::fake_provider::{FakeProvider, FakeProviderConfig};
use byok_e2e::operator::*;
use byok_operator::crd::ProviderKey;
use byok_operator::names;
use byok_operator::providers::ProviderKind;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::{Api, ListParams, ObjectMeta, Patch, PatchParams, PostParams};

/// Requests the bench itself keeps in flight. kube-rs has no client-side QPS limit, so what
/// bounds the figures is the API server (and etcd) on this machine, not the bench.
const BENCH_CONCURRENCY: usize = 64;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn proc_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The operator under test, as a child process with its admin server on `admin`.
struct Operator {
    child: Child,
    admin: SocketAddr,
    http: reqwest::Client,
}

impl Operator {
    fn start(
        binary: &str,
        dir: &Path,
        operator_ns: &str,
        fake: &FakeProvider,
    ) -> anyhow::Result<Self> {
        let admin: SocketAddr = ([127, 0, 0, 1], free_port()?).into();
        let rate: f64 = env_or("BENCH_VERIFY_RATE", 100.0);
        let concurrency: usize = env_or("BENCH_VERIFY_CONCURRENCY", 16);
        let child = Command::new(binary)
            .args(["controller", "--operator-namespace", operator_ns])
            .args(["--admin-addr", &admin.to_string()])
            .args(["--verify-rate-per-host", &rate.to_string()])
            .args(["--verify-concurrency-per-host", &concurrency.to_string()])
            .args(["--insecure-allow-private-base-urls", "--extra-ca-file"])
            .arg(dir.join("ca.pem"))
            .args([
                "--provider-endpoint",
                &format!("openai={}", fake.base_url(ProviderKind::OpenAI)),
            ])
            .env("KUBECONFIG", dir.join("kubeconfig"))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {binary} (make bench builds it)"))?;
        Ok(Operator {
            child,
            admin,
            http: reqwest::Client::new(),
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    async fn metrics(&self) -> String {
        let url = format!("http://{}/metrics", self.admin);
        match self.http.get(url).send().await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        }
    }

    /// Sum of a counter's series whose labels pass `keep`.
    async fn counter(&self, name: &str, keep: impl Fn(&str) -> bool) -> f64 {
        self.metrics()
            .await
            .lines()
            .filter(|l| l.starts_with(name) && !l.starts_with('#'))
            .filter(|l| keep(l))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    async fn reconciliations(&self) -> f64 {
        self.counter("byok_reconciliations_total", |_| true).await
    }

    /// API requests except watches (a watch is one long request, not a per-object cost) and
    /// the leader Lease's renewals (a clock, not a per-object cost).
    async fn api_requests(&self) -> f64 {
        self.counter("byok_kube_api_requests_total", |l| {
            !l.contains("verb=\"watch\"") && !l.contains("resource=\"leases\"")
        })
        .await
    }

    /// Waits until the reconciliation counter has stood still for `quiet` (the controller
    /// has nothing left to do), with a deadline.
    async fn settle(&self, quiet: Duration, deadline: Duration) -> f64 {
        let until = Instant::now() + deadline;
        let mut last = (self.reconciliations().await, Instant::now());
        while Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(250)).await; // polling interval
            let now = self.reconciliations().await;
            if now != last.0 {
                last = (now, Instant::now());
            } else if last.1.elapsed() >= quiet {
                break;
            }
        }
        last.0
    }

    fn stop(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Samples the fake provider's request counter; the peak number of calls in any one-second
/// window.
struct CallRate {
    samples: Arc<std::sync::Mutex<Vec<(Instant, u64)>>>,
    stop: Arc<AtomicBool>,
}

impl CallRate {
    fn start(fake: &Arc<FakeProvider>) -> Self {
        let samples = Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st, f) = (samples.clone(), stop.clone(), fake.clone());
        tokio::spawn(async move {
            while !st.load(Ordering::Relaxed) {
                s.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((Instant::now(), f.total_requests()));
                tokio::time::sleep(Duration::from_millis(100)).await; // sampling interval
            }
        });
        CallRate { samples, stop }
    }

    fn peak_per_second(&self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let samples = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        let mut peak = 0;
        let mut from = 0;
        for (to, (t, n)) in samples.iter().enumerate() {
            while from < to && t.duration_since(samples[from].0) > Duration::from_secs(1) {
                from += 1;
            }
            peak = peak.max(n - samples[from].1);
        }
        peak
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn key_secret(name: &str, key: &str) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(
                [(
                    names::KEY_SOURCE_LABEL.to_string(),
                    names::KEY_SOURCE_VALUE.to_string(),
                )]
                .into(),
            ),
            ..Default::default()
        },
        data: Some([("api-key".to_string(), ByteString(key.as_bytes().to_vec()))].into()),
        ..Default::default()
    }
}

fn providerkey(name: &str, secret: &str) -> anyhow::Result<ProviderKey> {
    Ok(serde_json::from_value(serde_json::json!({
        "apiVersion": "byok.dev/v1alpha1",
        "kind": "ProviderKey",
        "metadata": {"name": name},
        "spec": {"provider": "openai", "secretRef": {"name": secret}},
    }))?)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let count: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(10_000);
    let binary = std::env::args()
        .nth(2)
        .unwrap_or_else(|| "target/release/byok-operator".into());
    let namespaces: usize = env_or("BENCH_NAMESPACES", 100).max(1);
    let unrelated: usize = env_or("BENCH_UNRELATED_SECRETS", 1000);
    let restart_window = Duration::from_secs(env_or("BENCH_RESTART_WINDOW", 60));
    let rate: f64 = env_or("BENCH_VERIFY_RATE", 100.0);

    let env = TestEnv::new("bench").await?;
    install_crds(&env.client).await?;
    let filler = "x".repeat(4096);
    futures::stream::iter(0..unrelated)
        .map(|i| {
            let (env, filler) = (&env, &filler);
            async move {
                put_secret_labelled(env, &format!("unrelated-{i}"), &[("data", filler)], &[]).await
            }
        })
        .buffer_unordered(BENCH_CONCURRENCY)
        .try_collect::<Vec<_>>()
        .await?;
    let fake = Arc::new(FakeProvider::start(FakeProviderConfig::default()).await?);
    let dir: PathBuf = std::env::temp_dir().join(format!("byok-bench-{}", env.namespace));
    std::fs::create_dir_all(&dir)?;
    shared().write_kubeconfig(&dir.join("kubeconfig"))?;
    std::fs::write(dir.join("ca.pem"), fake.ca_pem())?;
    let operator = Operator::start(&binary, &dir, &env.namespace, &fake)?;

    // 1. apply -> Ready, one key at a time.
    let mut latencies = Vec::new();
    for i in 0..15 {
        let key = random_key("sk-proj-");
        fake.add_valid_key(ProviderKind::OpenAI, &key);
        put_secret(&env, &format!("lat-{i}"), &[("api-key", &key)]).await?;
        let started = Instant::now();
        create_pk(
            &env,
            &format!("lat-{i}"),
            serde_json::json!({"provider": "openai", "secretRef": {"name": format!("lat-{i}")}}),
        )
        .await?;
        wait_pk(&env, &format!("lat-{i}"), "Ready", |pk| {
            is_condition(pk, "Ready", "True", "Valid")
        })
        .await?;
        latencies.push(started.elapsed());
    }
    latencies.sort();
    let idle_rss = proc_kib(operator.pid(), "VmRSS:");

    // 2. Scale: `count` keys across `namespaces` namespaces, created as fast as the API server
    //    takes them.
    let ns_names: Vec<String> = (0..namespaces)
        .map(|i| format!("{}-s{i}", env.namespace))
        .collect();
    let ns_api: Api<Namespace> = Api::all(env.client.clone());
    for ns in &ns_names {
        let obj = Namespace {
            metadata: ObjectMeta {
                name: Some(ns.clone()),
                ..Default::default()
            },
            ..Default::default()
        };
        ns_api.create(&PostParams::default(), &obj).await?;
    }
    let keys: Vec<(String, String)> = (0..count)
        .map(|i| (ns_names[i % namespaces].clone(), format!("k-{i}")))
        .collect();
    let calls_before = fake.total_requests();
    let api_before = operator.api_requests().await;
    let rec_before = operator.reconciliations().await;
    let sampler = CallRate::start(&fake);
    let started = Instant::now();
    futures::stream::iter(keys.iter())
        .map(|(ns, name)| {
            let (client, fake) = (env.client.clone(), fake.clone());
            async move {
                let key = random_key("sk-proj-");
                fake.add_valid_key(ProviderKind::OpenAI, &key);
                Api::<Secret>::namespaced(client.clone(), ns)
                    .create(&PostParams::default(), &key_secret(name, &key))
                    .await?;
                Api::<ProviderKey>::namespaced(client, ns)
                    .create(&PostParams::default(), &providerkey(name, name)?)
                    .await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(BENCH_CONCURRENCY)
        .try_collect::<Vec<_>>()
        .await?;
    let created = started.elapsed();
    let all_pks: Api<ProviderKey> = Api::all(env.client.clone());
    let total = count + latencies.len();
    let deadline = Instant::now() + Duration::from_secs(3600);
    loop {
        // Cheap signal first (the operator's own counter), then one list to confirm.
        let valid = operator
            .counter("byok_verifications_total", |l| {
                l.contains("reason=\"Valid\"")
            })
            .await as usize;
        if valid >= total {
            let ready = all_pks
                .list(&ListParams::default())
                .await?
                .items
                .iter()
                .filter(|pk| is_condition(pk, "Ready", "True", "Valid"))
                .count();
            if ready >= total {
                break;
            }
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {valid} of {total} verified after an hour"
        );
        tokio::time::sleep(Duration::from_millis(200)).await; // polling interval
    }
    let all_ready = started.elapsed();
    let peak_calls = sampler.peak_per_second();
    let new_key_calls = fake.total_requests() - calls_before;
    operator
        .settle(Duration::from_secs(3), Duration::from_secs(120))
        .await;
    let scale_api = operator.api_requests().await - api_before;
    let scale_recs = operator.reconciliations().await - rec_before;
    let rest_rss = proc_kib(operator.pid(), "VmRSS:");
    let peak_rss = proc_kib(operator.pid(), "VmHWM:");

    // 3. Steady state: a change that asks nothing of the operator (a label) on up to 1,000
    //    keys; every reconcile it causes should be answered from the caches.
    let relabel = count.min(1000);
    let api0 = operator.api_requests().await;
    let rec0 = operator.reconciliations().await;
    let calls0 = fake.total_requests();
    futures::stream::iter(keys.iter().take(relabel))
        .map(|(ns, name)| {
            let client = env.client.clone();
            async move {
                Api::<ProviderKey>::namespaced(client, ns)
                    .patch(
                        name,
                        &PatchParams::default(),
                        &Patch::Merge(
                            serde_json::json!({"metadata": {"labels": {"bench": "steady"}}}),
                        ),
                    )
                    .await
            }
        })
        .buffer_unordered(BENCH_CONCURRENCY)
        .try_collect::<Vec<_>>()
        .await?;
    let steady_deadline = Instant::now() + Duration::from_secs(120);
    while operator.reconciliations().await < rec0 + relabel as f64
        && Instant::now() < steady_deadline
    {
        tokio::time::sleep(Duration::from_millis(100)).await; // polling interval
    }
    let rec1 = operator
        .settle(Duration::from_secs(2), Duration::from_secs(60))
        .await;
    let steady_api = operator.api_requests().await - api0;
    let steady_recs = rec1 - rec0;
    let steady_calls = fake.total_requests() - calls0;

    // 4. Spec change -> status: one key at a time, time until the status reports the new
    //    generation (includes one verification call to the local fake provider).
    let changes = count.min(200);
    let mut spec_latencies = Vec::new();
    let verify_seconds_before = operator
        .counter("byok_verification_duration_seconds_sum", |_| true)
        .await;
    for (i, (ns, name)) in keys.iter().take(changes).enumerate() {
        let api = Api::<ProviderKey>::namespaced(env.client.clone(), ns);
        let interval = format!("{}h", 20 + i % 4);
        let started = Instant::now();
        let patched = api
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(
                    serde_json::json!({"spec": {"verification": {"interval": interval}}}),
                ),
            )
            .await?;
        let generation = patched.metadata.generation;
        let until = Instant::now() + Duration::from_secs(60);
        loop {
            let pk = api.get(name).await?;
            if pk.status.as_ref().and_then(|s| s.observed_generation) == generation {
                break;
            }
            anyhow::ensure!(
                Instant::now() < until,
                "{ns}/{name}: spec change not reported"
            );
            tokio::time::sleep(Duration::from_millis(2)).await; // polling interval
        }
        spec_latencies.push(started.elapsed());
    }
    spec_latencies.sort();
    let provider_ms = (operator
        .counter("byok_verification_duration_seconds_sum", |_| true)
        .await
        - verify_seconds_before)
        * 1000.0
        / changes.max(1) as f64;

    // 5. Restart: a new process with every key Ready and none due.
    operator.stop();
    let calls_at_restart = fake.total_requests();
    let restarted = Instant::now();
    let operator = Operator::start(&binary, &dir, &env.namespace, &fake)?;
    let mut reconciled_all = None;
    while restarted.elapsed() < restart_window {
        if reconciled_all.is_none() && operator.reconciliations().await >= total as f64 {
            reconciled_all = Some(restarted.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(250)).await; // polling interval
    }
    let restart_calls = fake.total_requests() - calls_at_restart;
    let restart_api = operator.api_requests().await;
    let restart_rss = proc_kib(operator.pid(), "VmRSS:");
    let restart_peak = proc_kib(operator.pid(), "VmHWM:");
    operator.stop();

    let p = |d: &[Duration], q| ms(percentile(d, q));
    println!(
        "byok-operator bench: {total} ProviderKeys, {namespaces} namespaces, {unrelated} unrelated 4 KiB Secrets"
    );
    println!(
        "  apply -> Ready, one key at a time ({}): median {:.0} ms, min {:.0} ms, max {:.0} ms",
        latencies.len(),
        p(&latencies, 0.5),
        p(&latencies, 0.0),
        p(&latencies, 1.0)
    );
    println!(
        "  scale: {count} keys created in {:.1} s ({:.0}/s, {BENCH_CONCURRENCY} requests in flight, no client-side QPS limit); all Ready after {:.1} s",
        created.as_secs_f64(),
        count as f64 / created.as_secs_f64().max(0.001),
        all_ready.as_secs_f64()
    );
    println!(
        "  verification calls: {:.2} per new key (aim 1); peak {peak_calls}/s seen by the provider, limit {rate} calls per host in any one-second window",
        new_key_calls as f64 / count.max(1) as f64
    );
    println!(
        "  while applying: {:.1} API requests per new key, {:.1} reconciles per new key",
        scale_api / count.max(1) as f64,
        scale_recs / count.max(1) as f64
    );
    println!(
        "  operator memory: {} MiB RSS at rest with {total} keys (aim <= 64), peak {} MiB; {} MiB with 15 keys",
        rest_rss / 1024,
        peak_rss / 1024,
        idle_rss / 1024
    );
    println!(
        "  steady state: {:.0} reconciles after relabelling {relabel} keys: {:.3} API requests per reconcile (aim 0), {steady_calls} verification calls",
        steady_recs,
        steady_api / steady_recs.max(1.0)
    );
    println!(
        "  spec change -> status ({changes} changes, one verification each, {provider_ms:.1} ms of it at the provider on average): p50 {:.0} ms, p99 {:.0} ms (aim p99 <= 1000 ms), max {:.0} ms",
        p(&spec_latencies, 0.5),
        p(&spec_latencies, 0.99),
        p(&spec_latencies, 1.0)
    );
    println!(
        "  restart: {restart_calls} verification calls in the first {} s (aim 0); every key reconciled after {}; {:.0} API requests ({:.2} per key: one GET of each managed Secret to open its envelope, plus lists and the keyring); {} MiB RSS, peak {} MiB",
        restart_window.as_secs(),
        reconciled_all.map_or("(not within the window)".to_string(), |d| format!(
            "{:.1} s",
            d.as_secs_f64()
        )),
        restart_api,
        restart_api / total.max(1) as f64,
        restart_rss / 1024,
        restart_peak / 1024
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
