//! `make bench`: the release `byok-operator` binary against the local control plane and the
//! fake provider, side by side with the aims. Prints figures; asserts nothing about speed (the
//! machines are shared and noisy).
//!
//! Sections (names for `BENCH_SECTIONS`):
//! 1. `latency`: apply -> Ready, one key at a time;
//! 2. `scale`: `BENCH_KEYS` ProviderKeys (default 10,000) across 100 namespaces: time to all
//!    Ready, peak verification calls per second against the per-host limit, calls per new
//!    key, operator memory at rest and peak;
//! 3. `steady`: API requests per reconcile when nothing changed;
//! 4. `spec`: spec change -> status, p50/p99;
//! 5. `restart`: a restart: verification calls in the first minute, API requests it cost;
//! 6. `webhook`: a second operator process serving its webhook (registered by `url` for a
//!    namespace of its own, one anthropic ProviderKey Ready); `BENCH_PODS` opted-in pod
//!    creations beside as many identical pods without the inject label (8 in flight,
//!    interleaved), p50/p99 as the API server client sees them, and the handler's own time
//!    from `byok_webhook_admission_duration_seconds`;
//! 8. `proxy`: the sidecar proxy (see `bench_proxy/mod.rs`): requests per second, CPU per
//!    request and p99 at 1, 16 and 64 connections beside nginx, a minimal hop and a direct
//!    call, 3 interleaved rounds, with its aims; SSE at `BENCH_PROXY_STREAMS` (256) streams,
//!    memory, start to ready; needs `wrk` and `nginx` (Debian: wrk, nginx-light);
//!    `BENCH_PROXY_SECONDS` (10) per run;
//!    `BENCH_PROXY_ARGS` adds proxy flags (e.g. `--no-access-log`); `BENCH_KEEP_DIR=1` keeps
//!    its logs and callgrind dumps.
//! 9. `pods` (run by `make bench` under `hack/node-ns.sh`, see `e2e/tests/pods.rs`): pod
//!    create → the app's first call through the sidecar on a real kubelet, p50 over 20 pods,
//!    and the sidecar's RSS in a pod, the image made from the release binary.
//! 7. `broker`: one admitted pod with a token bound to it; `GET /v1/keys/...` from
//!    `BENCH_BROKER_CONCURRENCY` tasks for `BENCH_BROKER_SECONDS`, full answers (200), then
//!    as long again with `If-None-Match` (304): requests per second, p50/p99, and the API
//!    requests the operator made meanwhile.
//! 10. `forged`: a reviewed sidecar's p99 (`If-None-Match`, `BENCH_BROKER_CONCURRENCY`
//!     callers) quiet, then during a flood of `BENCH_FORGED` (2,000) distinct forged tokens
//!     (a real pod's token with the signature replaced) from another process,
//!     `BENCH_FORGED_CONCURRENCY` (64) requests in flight, both for
//!     `BENCH_BROKER_SECONDS`; the TokenReviews the flood cost (aim: none; p99 aim: at most
//!     twice the quiet one).
//!
//! `BENCH_SECTIONS` (comma list, default all) picks sections by name; `steady`, `spec` and
//! `restart` measure the keys `scale` creates, so any of them runs `scale` too. Sections 1-5
//! share one operator process, 6-7 another.
//!
//! Environment: `BENCH_KEYS`, `BENCH_NAMESPACES` (100), `BENCH_VERIFY_RATE` (100 calls/s per
//! host), `BENCH_VERIFY_CONCURRENCY` (16), `BENCH_UNRELATED_SECRETS` (1000 Secrets of 4 KiB
//! that are not key sources), `BENCH_RESTART_WINDOW` (60 s), `BENCH_PODS` (300),
//! `BENCH_BROKER_SECONDS` (10), `BENCH_BROKER_CONCURRENCY` (16), `BENCH_FORGED` (2000),
//! `BENCH_FORGED_CONCURRENCY` (64), `BENCH_SECTIONS`.

#[path = "bench_proxy/mod.rs"]
mod bench_proxy;

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
use byok_e2e::serving::{has_sidecar, opted_in_pod, pod_token, webhook_configuration};
use byok_operator::crd::ProviderKey;
use byok_operator::names;
use byok_operator::providers::ProviderKind;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret};
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams};

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
        extra_args: &[String],
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
            .args(extra_args)
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

    fn stop(self) {
        drop(self);
    }
}

impl Drop for Operator {
    /// Also on an early return with an error: no operator outlives the bench.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Loopback ports of their own for the webhook and the broker, which every replica serves
/// (the defaults, 0.0.0.0:9443 and :9444, may be taken on a shared machine).
fn serve_ports() -> anyhow::Result<Vec<String>> {
    Ok(vec![
        "--webhook-addr".into(),
        format!("127.0.0.1:{}", free_port()?),
        "--broker-addr".into(),
        format!("127.0.0.1:{}", free_port()?),
    ])
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
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("flood") {
        return flood_main(&args[2..]).await;
    }
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
    let sections = Sections::from_env()?;
    let scale_on = ["scale", "steady", "spec", "restart"]
        .iter()
        .any(|s| sections.on(s));
    let first_operator = scale_on || sections.on("latency");

    let env = TestEnv::new("bench").await?;
    install_crds(&env.client).await?;
    let fake = Arc::new(FakeProvider::start(FakeProviderConfig::default()).await?);
    let dir: PathBuf = std::env::temp_dir().join(format!("byok-bench-{}", env.namespace));
    std::fs::create_dir_all(&dir)?;
    shared().write_kubeconfig(&dir.join("kubeconfig"))?;
    std::fs::write(dir.join("ca.pem"), fake.ca_pem())?;
    if first_operator {
        sections_1_to_5(
            &env,
            &fake,
            &dir,
            &binary,
            &sections,
            Knobs {
                count: if scale_on { count } else { 0 },
                namespaces,
                unrelated,
                restart_window,
                rate,
            },
        )
        .await?;
    }
    if ["webhook", "broker", "forged", "proxy"]
        .iter()
        .any(|s| sections.on(s))
    {
        serving_sections(&fake, &dir, &binary, &sections).await?;
    }
    // BENCH_KEEP_DIR=1 keeps the logs and callgrind dumps for a closer look.
    if std::env::var_os("BENCH_KEEP_DIR").is_some() {
        println!("kept {}", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(())
}

/// `BENCH_SECTIONS`: which sections run (all when unset or empty).
struct Sections(Option<Vec<String>>);

impl Sections {
    /// `pods` runs from the Makefile (under `hack/node-ns.sh`), not in this binary.
    const NAMES: [&str; 10] = [
        "latency", "scale", "steady", "spec", "restart", "webhook", "broker", "forged", "proxy",
        "pods",
    ];

    fn from_env() -> anyhow::Result<Self> {
        let list: Vec<String> = std::env::var("BENCH_SECTIONS")
            .unwrap_or_default()
            .split(',')
            .map(|s| s.trim().to_lowercase())
            .filter(|s| !s.is_empty())
            .collect();
        for name in &list {
            anyhow::ensure!(
                Self::NAMES.contains(&name.as_str()),
                "BENCH_SECTIONS: unknown section {name:?}; sections: {}",
                Self::NAMES.join(",")
            );
        }
        Ok(Sections((!list.is_empty()).then_some(list)))
    }

    fn on(&self, name: &str) -> bool {
        self.0.as_ref().is_none_or(|l| l.iter().any(|s| s == name))
    }
}

struct Knobs {
    count: usize,
    namespaces: usize,
    unrelated: usize,
    restart_window: Duration,
    rate: f64,
}

/// Sections 1-5, on one operator process watching every namespace.
async fn sections_1_to_5(
    env: &TestEnv,
    fake: &Arc<FakeProvider>,
    dir: &Path,
    binary: &str,
    sections: &Sections,
    knobs: Knobs,
) -> anyhow::Result<()> {
    let Knobs {
        count,
        namespaces,
        unrelated,
        restart_window,
        rate,
    } = knobs;
    let scale_on = count > 0;
    let filler = "x".repeat(4096);
    futures::stream::iter(0..unrelated)
        .map(|i| {
            let filler = &filler;
            async move {
                put_secret_labelled(env, &format!("unrelated-{i}"), &[("data", filler)], &[]).await
            }
        })
        .buffer_unordered(BENCH_CONCURRENCY)
        .try_collect::<Vec<_>>()
        .await?;
    let operator = Operator::start(binary, dir, &env.namespace, fake, &serve_ports()?)?;

    // 1. apply -> Ready, one key at a time.
    let mut latencies = Vec::new();
    for i in 0..if sections.on("latency") { 15 } else { 0 } {
        let key = random_key("sk-proj-");
        fake.add_valid_key(ProviderKind::OpenAI, &key);
        put_secret(env, &format!("lat-{i}"), &[("api-key", &key)]).await?;
        let started = Instant::now();
        create_pk(
            env,
            &format!("lat-{i}"),
            serde_json::json!({"provider": "openai", "secretRef": {"name": format!("lat-{i}")}}),
        )
        .await?;
        wait_pk(env, &format!("lat-{i}"), "Ready", |pk| {
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
    for ns in ns_names.iter().filter(|_| scale_on) {
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
    let sampler = CallRate::start(fake);
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
    let relabel = if sections.on("steady") {
        count.min(1000)
    } else {
        0
    };
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
    let changes = if sections.on("spec") {
        count.min(200)
    } else {
        0
    };
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
    let mut restart = None;
    if sections.on("restart") {
        let calls_at_restart = fake.total_requests();
        let restarted = Instant::now();
        let operator = Operator::start(binary, dir, &env.namespace, fake, &serve_ports()?)?;
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
        restart = Some((
            restart_calls,
            reconciled_all,
            restart_api,
            restart_rss,
            restart_peak,
        ));
    }

    let p = |d: &[Duration], q| ms(percentile(d, q));
    println!(
        "byok-operator bench: {total} ProviderKeys, {namespaces} namespaces, {unrelated} unrelated 4 KiB Secrets"
    );
    if sections.on("latency") {
        println!(
            "  apply -> Ready, one key at a time ({}): median {:.0} ms, min {:.0} ms, max {:.0} ms",
            latencies.len(),
            p(&latencies, 0.5),
            p(&latencies, 0.0),
            p(&latencies, 1.0)
        );
    }
    if scale_on {
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
            "  operator memory: {} MiB RSS at rest with {total} keys (aim <= 64), peak {} MiB; {} MiB with {} keys",
            rest_rss / 1024,
            peak_rss / 1024,
            idle_rss / 1024,
            latencies.len()
        );
    }
    if sections.on("steady") {
        println!(
            "  steady state: {:.0} reconciles after relabelling {relabel} keys: {:.3} API requests per reconcile (aim 0), {steady_calls} verification calls",
            steady_recs,
            steady_api / steady_recs.max(1.0)
        );
    }
    if sections.on("spec") {
        println!(
            "  spec change -> status ({changes} changes, one verification each, {provider_ms:.1} ms of it at the provider on average): p50 {:.0} ms, p99 {:.0} ms (aim p99 <= 1000 ms), max {:.0} ms",
            p(&spec_latencies, 0.5),
            p(&spec_latencies, 0.99),
            p(&spec_latencies, 1.0)
        );
    }
    if let Some((restart_calls, reconciled_all, restart_api, restart_rss, restart_peak)) = restart {
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
    }
    Ok(())
}

/// A Prometheus histogram read from `/metrics`: cumulative bucket counts by upper bound.
#[derive(Debug, Default, Clone)]
struct Histogram {
    buckets: Vec<(f64, f64)>,
    sum: f64,
    count: f64,
}

impl Histogram {
    fn parse(metrics: &str, name: &str) -> Self {
        let value = |l: &str| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok());
        let mut h = Histogram::default();
        for line in metrics.lines().filter(|l| !l.starts_with('#')) {
            if let Some(rest) = line.strip_prefix(&format!("{name}_bucket{{")) {
                let le = rest
                    .split("le=\"")
                    .nth(1)
                    .and_then(|v| v.split('"').next())
                    .map(|v| match v {
                        "+Inf" => Some(f64::INFINITY),
                        v => v.parse().ok(),
                    });
                if let (Some(Some(le)), Some(n)) = (le, value(line)) {
                    h.buckets.push((le, n));
                }
            } else if line.starts_with(&format!("{name}_sum ")) {
                h.sum = value(line).unwrap_or(0.0);
            } else if line.starts_with(&format!("{name}_count ")) {
                h.count = value(line).unwrap_or(0.0);
            }
        }
        h.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        h
    }

    /// What was observed after `before`.
    fn since(&self, before: &Histogram) -> Histogram {
        Histogram {
            buckets: self
                .buckets
                .iter()
                .map(|(le, n)| {
                    let was = before
                        .buckets
                        .iter()
                        .find(|(l, _)| l == le)
                        .map_or(0.0, |b| b.1);
                    (*le, n - was)
                })
                .collect(),
            sum: self.sum - before.sum,
            count: self.count - before.count,
        }
    }

    /// The quantile `q`: (estimate by linear interpolation inside its bucket, the bucket's
    /// upper bound), in seconds.
    fn quantile(&self, q: f64) -> (f64, f64) {
        let target = q * self.count;
        let (mut lower, mut below) = (0.0, 0.0);
        for &(le, n) in &self.buckets {
            if n >= target && n > 0.0 {
                if le.is_infinite() {
                    return (lower, le);
                }
                let within = if n > below {
                    (target - below) / (n - below)
                } else {
                    1.0
                };
                return (lower + (le - lower) * within.clamp(0.0, 1.0), le);
            }
            (lower, below) = (le, n);
        }
        (0.0, 0.0)
    }
}

/// `byok_kube_api_requests_total` by series (verb and resource).
fn api_series(metrics: &str) -> std::collections::BTreeMap<String, f64> {
    metrics
        .lines()
        .filter(|l| l.starts_with("byok_kube_api_requests_total{"))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let labels = series.strip_prefix("byok_kube_api_requests_total")?;
            Some((labels.to_string(), value.parse().ok()?))
        })
        .collect()
}

/// The API requests between two scrapes: the total and the series that moved.
fn api_delta(before: &str, after: &str) -> (f64, String) {
    let (before, after) = (api_series(before), api_series(after));
    let mut total = 0.0;
    let mut moved = Vec::new();
    for (series, n) in &after {
        let d = n - before.get(series).copied().unwrap_or(0.0);
        if d > 0.0 {
            total += d;
            moved.push(format!("{series} {d}"));
        }
    }
    (total, moved.join(", "))
}

/// What many concurrent callers of the broker saw.
struct Hammered {
    latencies: Vec<Duration>,
    elapsed: Duration,
    unexpected: usize,
    first_unexpected: Option<String>,
    version: Option<reqwest::Version>,
}

impl Hammered {
    fn rps(&self) -> f64 {
        self.latencies.len() as f64 / self.elapsed.as_secs_f64().max(0.001)
    }
}

/// `concurrency` tasks asking `url` back to back for `duration`; answers other than
/// `expect` are counted apart.
async fn hammer(
    http: &reqwest::Client,
    url: &str,
    token: &str,
    if_none_match: Option<&str>,
    expect: reqwest::StatusCode,
    duration: Duration,
    concurrency: usize,
) -> Hammered {
    let started = Instant::now();
    let until = started + duration;
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let (http, url, token) = (http.clone(), url.to_string(), token.to_string());
            let if_none_match = if_none_match.map(str::to_string);
            tokio::spawn(async move {
                let mut seen = Hammered {
                    latencies: Vec::new(),
                    elapsed: Duration::ZERO,
                    unexpected: 0,
                    first_unexpected: None,
                    version: None,
                };
                while Instant::now() < until {
                    let mut request = http.get(&url).bearer_auth(&token);
                    if let Some(etag) = &if_none_match {
                        request = request.header(reqwest::header::IF_NONE_MATCH, etag);
                    }
                    let sent = Instant::now();
                    let answer = match request.send().await {
                        Ok(r) => {
                            let (status, version) = (r.status(), r.version());
                            r.bytes().await.map(|_| (status, version))
                        }
                        Err(e) => Err(e),
                    };
                    let took = sent.elapsed();
                    match answer {
                        Ok((status, version)) if status == expect => {
                            seen.latencies.push(took);
                            seen.version = Some(version);
                        }
                        other => {
                            seen.unexpected += 1;
                            if seen.first_unexpected.is_none() {
                                seen.first_unexpected = Some(match other {
                                    Ok((status, _)) => status.to_string(),
                                    Err(e) => e.to_string(),
                                });
                            }
                        }
                    }
                }
                seen
            })
        })
        .collect();
    let mut all = Hammered {
        latencies: Vec::new(),
        elapsed: Duration::ZERO,
        unexpected: 0,
        first_unexpected: None,
        version: None,
    };
    for task in futures::future::join_all(tasks).await {
        match task {
            Ok(seen) => {
                all.latencies.extend(seen.latencies);
                all.unexpected += seen.unexpected;
                all.first_unexpected = all.first_unexpected.or(seen.first_unexpected);
                all.version = all.version.or(seen.version);
            }
            Err(e) => {
                all.unexpected += 1;
                all.first_unexpected.get_or_insert(e.to_string());
            }
        }
    }
    all.elapsed = started.elapsed();
    all.latencies.sort();
    all
}

/// A pod of the serving sections: `opted_in_pod`, with the inject label or without it (the
/// ServiceAccount token automounted, as by default).
fn bench_pod(generate_name: &str, key: &str, opted_in: bool) -> Pod {
    let mut pod = opted_in_pod(generate_name, &[key]);
    if !opted_in {
        pod.metadata.labels = None;
    }
    pod
}

/// Pod creations the webhook section keeps in flight.
const POD_CONCURRENCY: usize = 8;

/// Sections 6 and 7: a second operator process that serves its webhook (registered by
/// `url`, for a namespace of its own) and its key broker on loopback ports.
async fn serving_sections(
    fake: &Arc<FakeProvider>,
    dir: &Path,
    binary: &str,
    sections: &Sections,
) -> anyhow::Result<()> {
    let env = TestEnv::new("bench-serve").await?;
    let webhook_port = free_port()?;
    let broker_port = free_port()?;
    let broker_url = format!("https://127.0.0.1:{broker_port}");
    let mwc_name = format!("byok-{}", env.namespace);
    let mwcs: Api<MutatingWebhookConfiguration> = Api::all(env.client.clone());
    mwcs.create(
        &PostParams::default(),
        &webhook_configuration(
            &mwc_name,
            &env.namespace,
            &format!("https://127.0.0.1:{webhook_port}/mutate"),
        )?,
    )
    .await?;
    let args: Vec<String> = vec![
        "--namespace".into(),
        env.namespace.clone(),
        "--no-leader-election".into(),
        "--webhook-addr".into(),
        format!("127.0.0.1:{webhook_port}"),
        "--broker-addr".into(),
        format!("127.0.0.1:{broker_port}"),
        "--broker-url".into(),
        broker_url.clone(),
        "--webhook-configuration".into(),
        mwc_name.clone(),
        "--provider-endpoint".into(),
        format!("anthropic={}", fake.base_url(ProviderKind::Anthropic)),
    ];
    let operator = Operator::start(binary, dir, &env.namespace, fake, &args)?;
    let measured = measure_serving(&env, fake, &operator, &broker_url, sections, binary, dir).await;
    let measured = match measured {
        Ok(()) if sections.on("webhook") => {
            let path = byok_e2e::serving::webhook_path(
                &env,
                byok_operator::serving::certs::DEFAULT_SECRET_NAME,
            )
            .await?;
            hostile_reviews(
                &env,
                &operator,
                &format!("https://127.0.0.1:{webhook_port}{path}"),
            )
            .await
        }
        other => other,
    };
    operator.stop();
    // The webhook fails closed: leave no configuration that calls a stopped operator.
    let _ = mwcs.delete(&mwc_name, &DeleteParams::default()).await;
    measured
}

async fn measure_serving(
    env: &TestEnv,
    fake: &Arc<FakeProvider>,
    operator: &Operator,
    broker_url: &str,
    sections: &Sections,
    binary: &str,
    dir: &Path,
) -> anyhow::Result<()> {
    const KEY: &str = "bench-key";
    let key = random_key("sk-ant-api03-");
    fake.add_valid_key(ProviderKind::Anthropic, &key);
    put_secret(env, KEY, &[("api-key", &key)]).await?;
    create_pk(
        env,
        KEY,
        serde_json::json!({"provider": "anthropic", "secretRef": {"name": KEY}}),
    )
    .await?;
    wait_pk(env, KEY, "Ready", |pk| {
        is_condition(pk, "Ready", "True", "Valid")
    })
    .await?;
    // The operator sets the caBundle after it starts: dry runs until the API server gets
    // through to the webhook (and the webhook's cache has the key Ready).
    let pods = env.api::<Pod>();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let dry = PostParams {
            dry_run: true,
            ..Default::default()
        };
        let last = match pods.create(&dry, &bench_pod("probe-", KEY, true)).await {
            Ok(created) if has_sidecar(&created) => break,
            Ok(_) => "admitted without a sidecar".to_string(),
            Err(e) => e.to_string(),
        };
        anyhow::ensure!(
            Instant::now() < deadline,
            "the API server never reached the webhook: {last}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await; // polling interval
    }
    println!(
        "byok-operator bench: serving (webhook and key broker), namespace {}",
        env.namespace
    );

    // 6. Webhook: opted-in pods beside identical pods the webhook is not called for.
    if sections.on("webhook") {
        let count: usize = env_or("BENCH_PODS", 300);
        let before = operator.metrics().await;
        let timed: Vec<(bool, Duration)> =
            futures::stream::iter((0..2 * count).map(|i| i % 2 == 0))
                .map(|opted_in| {
                    let pods = &pods;
                    async move {
                        let pod = if opted_in {
                            bench_pod("bench-in-", KEY, true)
                        } else {
                            bench_pod("bench-plain-", KEY, false)
                        };
                        let started = Instant::now();
                        let created = pods.create(&PostParams::default(), &pod).await?;
                        let took = started.elapsed();
                        anyhow::ensure!(
                            has_sidecar(&created) == opted_in,
                            "pod {:?}: opted in {opted_in}, sidecar {}",
                            created.metadata.name,
                            has_sidecar(&created)
                        );
                        Ok((opted_in, took))
                    }
                })
                .buffer_unordered(POD_CONCURRENCY)
                .try_collect()
                .await?;
        let after = operator.metrics().await;
        let split = |want: bool| {
            let mut d: Vec<Duration> = timed
                .iter()
                .filter(|(o, _)| *o == want)
                .map(|(_, d)| *d)
                .collect();
            d.sort();
            d
        };
        let (with, without) = (split(true), split(false));
        let handler = Histogram::parse(&after, "byok_webhook_admission_duration_seconds").since(
            &Histogram::parse(&before, "byok_webhook_admission_duration_seconds"),
        );
        let p = |d: &[Duration], q| ms(percentile(d, q));
        let (h50, h50_le) = handler.quantile(0.5);
        let (h99, h99_le) = handler.quantile(0.99);
        println!(
            "  webhook: {count} opted-in pod creations beside {count} without the inject label ({POD_CONCURRENCY} in flight, interleaved), as the API server client sees them:"
        );
        println!(
            "    opted in: p50 {:.1} ms, p99 {:.1} ms (aim p99 < 25 ms), max {:.1} ms",
            p(&with, 0.5),
            p(&with, 0.99),
            p(&with, 1.0)
        );
        println!(
            "    not opted in: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; the webhook's cost: p50 +{:.1} ms, p99 +{:.1} ms",
            p(&without, 0.5),
            p(&without, 0.99),
            p(&without, 1.0),
            p(&with, 0.5) - p(&without, 0.5),
            p(&with, 0.99) - p(&without, 0.99)
        );
        println!(
            "    handler ({} admissions, from byok_webhook_admission_duration_seconds): mean {:.3} ms, p50 ~{:.3} ms (bucket <= {:.1} ms), p99 ~{:.3} ms (bucket <= {:.1} ms) (aim p99 < 2 ms)",
            handler.count,
            handler.sum * 1000.0 / handler.count.max(1.0),
            h50 * 1000.0,
            h50_le * 1000.0,
            h99 * 1000.0,
            h99_le * 1000.0
        );
        // Pods on no node go at once, without a kubelet.
        pods.delete_collection(&DeleteParams::default(), &ListParams::default())
            .await?;
    }

    // 7. Broker: one admitted pod, a token bound to it, many callers.
    if sections.on("broker") {
        let seconds = Duration::from_secs(env_or("BENCH_BROKER_SECONDS", 10));
        let concurrency: usize = env_or("BENCH_BROKER_CONCURRENCY", 16).max(1);
        let pod = pods
            .create(
                &PostParams::default(),
                &bench_pod("bench-broker-", KEY, true),
            )
            .await?;
        anyhow::ensure!(has_sidecar(&pod), "the broker's pod was not injected");
        let token = pod_token(env, "default", &pod, names::TOKEN_AUDIENCE).await?;
        let ca = byok_e2e::serving::serving_ca_pem(env).await?;
        let http = reqwest::Client::builder()
            .tls_certs_only([reqwest::Certificate::from_pem(ca.as_bytes())?])
            .pool_max_idle_per_host(concurrency)
            .build()?;
        let url = format!("{broker_url}/v1/keys/{}/{KEY}", env.namespace);
        // Until the pod cache has the pod: this also warms the TokenReview cache.
        let deadline = Instant::now() + Duration::from_secs(60);
        let etag = loop {
            let r = http.get(&url).bearer_auth(&token).send().await?;
            let (status, etag) = (
                r.status(),
                r.headers()
                    .get(reqwest::header::ETAG)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string),
            );
            let body = r.text().await.unwrap_or_default();
            if status == reqwest::StatusCode::OK {
                break etag.context("a 200 without an ETag")?;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the broker never served the key: {status} {body}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await; // polling interval
        };
        let m0 = operator.metrics().await;
        let full = hammer(
            &http,
            &url,
            &token,
            None,
            reqwest::StatusCode::OK,
            seconds,
            concurrency,
        )
        .await;
        let m1 = operator.metrics().await;
        let conditional = hammer(
            &http,
            &url,
            &token,
            Some(&etag),
            reqwest::StatusCode::NOT_MODIFIED,
            seconds,
            concurrency,
        )
        .await;
        let m2 = operator.metrics().await;
        println!(
            "  broker: one pod, one token (TokenReview cache warm), {concurrency} callers, {} s each (the callers share the machine with the operator and the API server):",
            seconds.as_secs()
        );
        for (what, run, (api, moved)) in [
            ("full answers (200)", &full, api_delta(&m0, &m1)),
            ("If-None-Match (304)", &conditional, api_delta(&m1, &m2)),
        ] {
            println!(
                "    {what}: {:.0} requests/s over {:?}, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; {} other answers{}; API requests by the operator meanwhile: {api} ({:.5} per request, aim ~0){}",
                run.rps(),
                run.version.unwrap_or_default(),
                ms(percentile(&run.latencies, 0.5)),
                ms(percentile(&run.latencies, 0.99)),
                ms(percentile(&run.latencies, 1.0)),
                run.unexpected,
                run.first_unexpected
                    .as_ref()
                    .map_or(String::new(), |e| format!(" (first: {e})")),
                api / run.latencies.len().max(1) as f64,
                if moved.is_empty() {
                    String::new()
                } else {
                    format!(": {moved}")
                }
            );
        }
        pods.delete_collection(&DeleteParams::default(), &ListParams::default())
            .await?;
    }
    if sections.on("forged") {
        forged_flood(env, operator, broker_url, KEY).await?;
        pods.delete_collection(&DeleteParams::default(), &ListParams::default())
            .await?;
    }
    if sections.on("proxy") {
        // The sidecar's shipped binary (make bench passes `make static`'s).
        let proxy = std::env::args().nth(3).map_or_else(
            || Path::new(binary).with_file_name("byok-proxy"),
            PathBuf::from,
        );
        bench_proxy::run(env, fake, broker_url, KEY, &key, &proxy, dir).await?;
    }
    Ok(())
}

/// A review of a pod as the API server sends it.
fn review_of(namespace: &str, pod: serde_json::Value) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "00000000-0000-0000-0000-000000000019",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "name": "", "namespace": namespace, "operation": "CREATE",
            "userInfo": {"username": "bench"}, "object": pod, "dryRun": false
        }
    }))
    .unwrap_or_default()
}

/// An opted-in pod for `keys` keys with `containers` containers of `per` variables each.
fn hostile_pod(keys: usize, containers: usize, per: usize) -> serde_json::Value {
    let names: Vec<String> = (0..keys).map(|i| format!("key-{i}")).collect();
    let containers: Vec<serde_json::Value> = (0..containers)
        .map(|c| {
            let env: Vec<serde_json::Value> = (0..per)
                .map(|i| serde_json::json!({"name": format!("V{i}"), "value": "x".repeat(24)}))
                .collect();
            serde_json::json!({"name": format!("c{c}"), "image": "busybox", "env": env})
        })
        .collect();
    serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"generateName": "hostile-",
            "labels": {names::INJECT_LABEL: names::INJECT_VALUE},
            "annotations": {names::PROVIDER_KEYS_ANNOTATION: names.join(",")}},
        "spec": {"containers": containers}
    })
}

/// CPU time of `pid` so far (user + system), from /proc (clock ticks of 10 ms).
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|i| fields.get(*i)?.parse::<u64>().ok())
        .sum();
    Duration::from_millis(ticks * 10)
}

/// Resets the process's peak RSS (`VmHWM`) to its current RSS.
fn reset_peak(pid: u32) {
    let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
}

/// Issue 19, item 2: what reviews anyone can send cost the operator (memory, CPU), with
/// many in flight, and the handler's time for an ordinary 3-container, 4-key pod.
async fn hostile_reviews(env: &TestEnv, operator: &Operator, url: &str) -> anyhow::Result<()> {
    let ca = byok_e2e::serving::serving_ca_pem(env).await?;
    let http = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(ca.as_bytes())?)
        .build()?;
    let pid = operator.pid();
    let ns = &env.namespace;
    let max = byok_operator::webhook::handler::MAX_REVIEW_BYTES;
    let volumes = |n: usize| {
        let mut pod = hostile_pod(1, 1, 0);
        pod["spec"]["volumes"] = (0..n).map(|_| serde_json::json!({"name": ""})).collect();
        review_of(ns, pod)
    };
    let shapes: Vec<(&str, Vec<u8>)> = vec![
        (
            "3,000 containers x 16 keys (refused)",
            review_of(ns, hostile_pod(16, 3000, 0)),
        ),
        (
            "1 container, 3 MiB of env, 1 key (refused: values)",
            review_of(ns, hostile_pod(1, 1, (max - 128 * 1024) / 60)),
        ),
        ("250,000 empty volumes (refused)", volumes(250_000)),
        (
            "1 container, 9,500 env vars, 1 key (the largest admitted)",
            review_of(ns, hostile_pod(1, 1, 9_500)),
        ),
        (
            "32 containers, 290 env vars each, 16 keys",
            review_of(ns, hostile_pod(16, 32, 290)),
        ),
    ];
    println!(
        "  webhook, reviews anyone can send (posted to the webhook port; aims: peak RSS growth <= 16 MiB, CPU <= 50 ms a review):"
    );
    for (what, body) in &shapes {
        const ROUNDS: u32 = 10;
        let rss = proc_kib(pid, "VmRSS");
        reset_peak(pid);
        let cpu = cpu_time(pid);
        let mut answer = 0;
        for _ in 0..ROUNDS {
            let res = http.post(url).body(body.clone()).send().await?;
            anyhow::ensure!(res.status() == 200, "{what}: {}", res.status());
            answer = res.bytes().await?.len();
        }
        let cpu = (cpu_time(pid) - cpu) / ROUNDS;
        let peak = proc_kib(pid, "VmHWM");
        println!(
            "    {what}: review {} KiB, answer {} KiB, peak RSS growth {:.1} MiB (from {:.1} MiB), CPU {:.1} ms a review",
            body.len() / 1024,
            answer / 1024,
            peak.saturating_sub(rss) as f64 / 1024.0,
            rss as f64 / 1024.0,
            cpu.as_secs_f64() * 1000.0
        );
    }

    // Many at once: 4 of the largest in flight (2 x the serving workers), repeatedly, while 50
    // more trickle in; an ordinary pod created meanwhile through the API server.
    reset_peak(pid);
    let stop = Arc::new(AtomicBool::new(false));
    let mut load = Vec::new();
    for _ in 0..4 {
        let (http, url, body, stop) = (
            http.clone(),
            url.to_owned(),
            shapes[4].1.clone(),
            stop.clone(),
        );
        load.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let _ = http.post(&url).body(body.clone()).send().await;
            }
        }));
    }
    for _ in 0..50 {
        let (http, url, prefix) = (
            http.clone(),
            url.to_owned(),
            shapes[1].1[..256 * 1024].to_vec(),
        );
        load.push(tokio::spawn(async move {
            let (mut tx, rx) = futures::channel::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(1);
            let feed = async move {
                use futures::SinkExt;
                let _ = tx.send(Ok(prefix)).await;
                std::future::pending::<()>().await;
            };
            tokio::select! { _ = http.post(&url).body(reqwest::Body::wrap_stream(rx)).send() => {}, () = feed => {} }
        }));
    }
    let pods = env.api::<Pod>();
    let mut admitted = Vec::new();
    for i in 0..5 {
        let mut pod = hostile_pod(1, 3, 0);
        pod["metadata"]["annotations"][names::PROVIDER_KEYS_ANNOTATION] = "bench-key".into();
        pod["metadata"]["generateName"] = format!("busy-{i}-").into();
        let pod: Pod = serde_json::from_value(pod)?;
        let started = Instant::now();
        let created = pods.create(&PostParams::default(), &pod).await;
        admitted.push((
            started.elapsed(),
            created.map(|p| has_sidecar(&p)).unwrap_or(false),
        ));
    }
    stop.store(true, Ordering::Relaxed);
    for task in load {
        task.abort();
    }
    let peak = proc_kib(pid, "VmHWM");
    println!(
        "    4 of the largest reviews in flight and 50 trickling: operator peak RSS {:.1} MiB (aim < 128 MiB); a 3-container pod admitted in {} (aim <= 1 s each)",
        peak as f64 / 1024.0,
        admitted
            .iter()
            .map(|(d, ok)| format!(
                "{:.0} ms{}",
                ms(*d),
                if *ok { "" } else { " (NOT injected)" }
            ))
            .collect::<Vec<_>>()
            .join(", ")
    );

    // The handler's time for an ordinary pod: 3 containers, 4 keys.
    let mut pod = hostile_pod(4, 3, 0);
    pod["metadata"]["annotations"][names::PROVIDER_KEYS_ANNOTATION] =
        "bench-key,other-a,other-b,other-c".into();
    let body = review_of(ns, pod);
    // The trickled bodies end at the webhook's read deadline (3 s): let them, so their time
    // is not counted below.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let before = operator.metrics().await;
    let mut took = Vec::new();
    for _ in 0..500 {
        let started = Instant::now();
        let res = http.post(url).body(body.clone()).send().await?;
        anyhow::ensure!(res.status() == 200, "{}", res.status());
        res.bytes().await?;
        took.push(started.elapsed());
    }
    took.sort();
    let after = operator.metrics().await;
    let handler = Histogram::parse(&after, "byok_webhook_admission_duration_seconds").since(
        &Histogram::parse(&before, "byok_webhook_admission_duration_seconds"),
    );
    let (h99, h99_le) = handler.quantile(0.99);
    println!(
        "    3 containers, 4 keys, 500 reviews: handler p99 ~{:.3} ms (bucket <= {:.1} ms; aim <= 2 ms), mean {:.3} ms; client over loopback TLS p50 {:.2} ms, p99 {:.2} ms",
        h99 * 1000.0,
        h99_le * 1000.0,
        handler.sum * 1000.0 / handler.count.max(1.0),
        ms(percentile(&took, 0.5)),
        ms(percentile(&took, 0.99))
    );
    Ok(())
}

/// Section 10: a reviewed sidecar's latency, quiet and during a flood of forged tokens.
async fn forged_flood(
    env: &TestEnv,
    operator: &Operator,
    broker_url: &str,
    key: &str,
) -> anyhow::Result<()> {
    let seconds = Duration::from_secs(env_or("BENCH_BROKER_SECONDS", 10));
    let concurrency: usize = env_or("BENCH_BROKER_CONCURRENCY", 16).max(1);
    let count: usize = env_or("BENCH_FORGED", 2000).max(1);
    let flooders: usize = env_or("BENCH_FORGED_CONCURRENCY", 64).max(1);
    let pod = env
        .api::<Pod>()
        .create(
            &PostParams::default(),
            &bench_pod("bench-forged-", key, true),
        )
        .await?;
    anyhow::ensure!(has_sidecar(&pod), "the pod was not injected");
    let token = pod_token(env, "default", &pod, names::TOKEN_AUDIENCE).await?;
    let ca = byok_e2e::serving::serving_ca_pem(env).await?;
    let client = || {
        reqwest::Client::builder()
            .tls_certs_only([reqwest::Certificate::from_pem(ca.as_bytes())?])
            .pool_max_idle_per_host(concurrency)
            .build()
    };
    let http = client()?;
    let url = format!("{broker_url}/v1/keys/{}/{key}", env.namespace);
    let deadline = Instant::now() + Duration::from_secs(60);
    let etag = loop {
        let r = http.get(&url).bearer_auth(&token).send().await?;
        let status = r.status();
        let etag = r
            .headers()
            .get(reqwest::header::ETAG)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        if status == reqwest::StatusCode::OK {
            break etag.context("a 200 without an ETag")?;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the broker never served the key: {status}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await; // polling interval
    };
    let reviews = || operator.counter("byok_broker_token_reviews_total", |_| true);
    let conditional = |http| {
        let (url, token, etag) = (url.clone(), token.clone(), etag.clone());
        async move {
            hammer(
                &http,
                &url,
                &token,
                Some(&etag),
                reqwest::StatusCode::NOT_MODIFIED,
                seconds,
                concurrency,
            )
            .await
        }
    };
    let quiet = conditional(http.clone()).await;

    // The flood comes from another process (this binary, `bench flood ...`): its client work
    // does not slow the measuring tasks' runtime.
    let forged = byok_e2e::forged::forged_tokens(&token, count)?;
    let dir = std::env::temp_dir().join(format!("byok-bench-forged-{}", env.namespace));
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("ca.pem"), &ca)?;
    std::fs::write(dir.join("tokens"), forged.join("\n"))?;
    let reviews_before = reviews().await;
    let mut flooder = tokio::process::Command::new(std::env::current_exe()?)
        .arg("flood")
        .arg(&url)
        .arg(dir.join("ca.pem"))
        .arg(dir.join("tokens"))
        .arg(flooders.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut out = tokio::io::BufReader::new(flooder.stdout.take().context("no stdout")?);
    let mut line = String::new();
    // "flooding" once its first answers are in.
    tokio::io::AsyncBufReadExt::read_line(&mut out, &mut line).await?;
    anyhow::ensure!(line.trim() == "flooding", "the flooder said {line:?}");
    let flooded = conditional(http.clone()).await;
    // Closing its stdin stops it; it prints how many requests it sent.
    drop(flooder.stdin.take());
    line.clear();
    tokio::io::AsyncBufReadExt::read_line(&mut out, &mut line).await?;
    flooder.wait().await?;
    let _ = std::fs::remove_dir_all(&dir);
    let forged_sent: usize = line.trim().parse().unwrap_or(0);
    let reviews = reviews().await - reviews_before;
    let p99 = |h: &Hammered| ms(percentile(&h.latencies, 0.99));
    println!(
        "  forged tokens: a reviewed sidecar ({concurrency} callers, If-None-Match), {} s quiet then {} s beside {flooders} requests in flight sending {count} distinct forged tokens (only the signature wrong):",
        seconds.as_secs(),
        seconds.as_secs()
    );
    for (what, run) in [("quiet", &quiet), ("during the flood", &flooded)] {
        println!(
            "    {what}: {:.0} requests/s, p50 {:.2} ms, p99 {:.2} ms; {} other answers{}",
            run.rps(),
            ms(percentile(&run.latencies, 0.5)),
            p99(run),
            run.unexpected,
            run.first_unexpected
                .as_ref()
                .map_or(String::new(), |e| format!(" (first: {e})"))
        );
    }
    println!(
        "    p99 during the flood / quiet: {:.2} (aim <= 2); forged requests: {forged_sent} ({:.0}/s, from another process); TokenReviews they cost: {reviews} (aim 0, at most 1 %)",
        p99(&flooded) / p99(&quiet).max(0.001),
        forged_sent as f64 / seconds.as_secs_f64().max(0.001)
    );
    Ok(())
}

/// `bench flood URL CA_PEM TOKENS CONCURRENCY`: sends the tokens (one a line) to `URL` from
/// `CONCURRENCY` tasks, round and round, until its stdin closes; prints `flooding` once the
/// first answers are in, and at the end how many requests it sent.
async fn flood_main(args: &[String]) -> anyhow::Result<()> {
    let [url, ca, tokens, concurrency] = args else {
        anyhow::bail!("usage: bench flood URL CA_PEM TOKENS CONCURRENCY");
    };
    let http = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(&std::fs::read(ca)?)?])
        .build()?;
    let tokens: Arc<Vec<String>> = Arc::new(
        std::fs::read_to_string(tokens)?
            .lines()
            .map(str::to_string)
            .collect(),
    );
    anyhow::ensure!(!tokens.is_empty(), "no tokens");
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let tasks: Vec<_> = (0..concurrency.parse::<usize>()?.max(1))
        .map(|_| {
            let (http, url, tokens, stop, sent) = (
                http.clone(),
                url.clone(),
                tokens.clone(),
                stop.clone(),
                sent.clone(),
            );
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let i = sent.fetch_add(1, Ordering::Relaxed);
                    if let Ok(r) = http
                        .get(&url)
                        .bearer_auth(&tokens[i % tokens.len()])
                        .send()
                        .await
                    {
                        let _ = r.bytes().await;
                    }
                }
            })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    while sent.load(Ordering::Relaxed) < 2 * tasks.len() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await; // polling interval
    }
    println!("flooding");
    let _ = tokio::task::spawn_blocking(|| {
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut Vec::new())
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    futures::future::join_all(tasks).await;
    println!("{}", sent.load(Ordering::Relaxed));
    Ok(())
}
