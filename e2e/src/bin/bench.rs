//! `make bench`: how fast a key goes from `kubectl apply` to Ready, and how much memory the
//! operator needs for many ProviderKeys. Runs the release `byok-operator` binary against the
//! local control plane and the fake provider; prints figures, asserts nothing about speed.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use byok_e2e::envtest::{TestEnv, shared};
use byok_e2e::fake_provider::{FakeProvider, FakeProviderConfig};
use byok_e2e::operator::*;
use byok_operator::crd::ProviderKey;
use byok_operator::providers::ProviderKind;
use kube::api::ListParams;

fn rss_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let count: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1000);
    let binary = std::env::args()
        .nth(2)
        .unwrap_or_else(|| "target/release/byok-operator".into());
    // Secrets that are not key sources, in the watched namespace before the operator starts:
    // the operator must neither watch nor cache them.
    let unrelated: usize = std::env::var("BENCH_UNRELATED_SECRETS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let env = TestEnv::new("bench").await?;
    install_crds(&env.client).await?;
    let filler = "x".repeat(4096);
    for i in 0..unrelated {
        put_secret_labelled(&env, &format!("unrelated-{i}"), &[("data", &filler)], &[]).await?;
    }
    let fake = FakeProvider::start(FakeProviderConfig::default()).await?;
    let dir = std::env::temp_dir().join(format!("byok-bench-{}", env.namespace));
    std::fs::create_dir_all(&dir)?;
    shared().write_kubeconfig(&dir.join("kubeconfig"))?;
    std::fs::write(dir.join("ca.pem"), fake.ca_pem())?;
    let mut operator = Command::new(&binary)
        .args([
            "controller",
            "--namespace",
            &env.namespace,
            "--operator-namespace",
            &env.namespace,
        ])
        .args(["--insecure-allow-private-base-urls", "--extra-ca-file"])
        .arg(dir.join("ca.pem"))
        .args([
            "--provider-endpoint",
            &format!("openai={}", fake.base_url(ProviderKind::OpenAI)),
        ])
        .env("KUBECONFIG", dir.join("kubeconfig"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {binary} (make bench builds it)"))?;
    let pid = operator.id();

    // 1. Latency: one key at a time, from create to Ready=True.
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
    let idle_rss = rss_kib(pid, "VmRSS:");

    // 2. Memory with `count` ProviderKeys, all verified.
    let started = Instant::now();
    for i in 0..count {
        let key = random_key("sk-proj-");
        fake.add_valid_key(ProviderKind::OpenAI, &key);
        put_secret(&env, &format!("k-{i}"), &[("api-key", &key)]).await?;
        create_pk(
            &env,
            &format!("k-{i}"),
            serde_json::json!({"provider": "openai", "secretRef": {"name": format!("k-{i}")}}),
        )
        .await?;
    }
    let created = started.elapsed();
    let api = env.api::<ProviderKey>();
    let deadline = Instant::now() + Duration::from_secs(900);
    loop {
        let ready = api
            .list(&ListParams::default())
            .await?
            .items
            .iter()
            .filter(|pk| is_condition(pk, "Ready", "True", "Valid"))
            .count();
        if ready >= count + latencies.len() {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {ready} of {count} Ready after 15 minutes"
        );
        tokio::time::sleep(Duration::from_millis(500)).await; // polling interval
    }
    let all_ready = started.elapsed();
    let rss = rss_kib(pid, "VmRSS:");
    let peak = rss_kib(pid, "VmHWM:");
    let _ = operator.kill();
    let _ = operator.wait();

    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "apply -> Ready, {} keys one at a time: median {:.0} ms, min {:.0} ms, max {:.0} ms",
        latencies.len(),
        ms(latencies[latencies.len() / 2]),
        ms(latencies[0]),
        ms(latencies[latencies.len() - 1])
    );
    println!(
        "{count} ProviderKeys: created in {:.1} s, all Ready after {:.1} s",
        created.as_secs_f64(),
        all_ready.as_secs_f64()
    );
    println!(
        "operator memory: {} MiB RSS with {} ProviderKeys (peak {} MiB); {} MiB after the first 15, \
         with {unrelated} unrelated 4 KiB Secrets in the namespace",
        rss / 1024,
        count + latencies.len(),
        peak / 1024,
        idle_rss / 1024
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
