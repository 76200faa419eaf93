//! Issue 20 item 5: restarts and faults, with an application calling through a sidecar the
//! whole time and a short key lease (30 s), each run at least two leases long, so a pass
//! cannot hide behind the lease. Each prints the failed requests and the recovery time.
//!
//! A test binary of its own: the API server restart is seen by every test of the binary, so
//! the tests here take turns ([`SERIAL`]).

use std::time::{Duration, Instant};

use byok_e2e::envtest::{TestEnv, shared};
use byok_e2e::fake_provider::{FakeProvider, FakeProviderConfig};
use byok_e2e::operator::{create_pk, is_condition, put_secret, random_key, wait_pk};
use byok_e2e::serving::{ServingOperator, opted_in_pod, ready_anthropic};
use byok_e2e::sidecar::{AppCalls, Sidecar};
use byok_operator::providers::ProviderKind;
use k8s_openapi::api::core::v1::Pod;
use kube::api::PostParams;

const LEASE: Duration = Duration::from_secs(30);

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The operator with a 30 s lease; at `broker` (address, URL) when given (a restart).
async fn operator(
    env: &TestEnv,
    fake: &FakeProvider,
    broker: Option<(std::net::SocketAddr, String)>,
) -> anyhow::Result<ServingOperator> {
    ServingOperator::start_with(env, fake, move |config| {
        if let Some(serve) = config.serving.as_mut() {
            serve.key_lease = LEASE;
            if let Some((addr, url)) = broker {
                serve.broker_addr = addr;
                serve.broker_url = url;
            }
        }
    })
    .await
}

/// Broker answers that are neither a grant nor a confirmation, by result.
fn other_answers(op: &ServingOperator) -> Vec<String> {
    op.metrics
        .encode()
        .lines()
        .filter(|l| l.starts_with("byok_broker_answers_total{"))
        .filter(|l| !l.contains("\"granted\"") && !l.contains("\"not_modified\""))
        .filter(|l| l.rsplit(' ').next().is_some_and(|n| n != "0"))
        .map(str::to_owned)
        .collect()
}

/// The API server restarted (etcd kept), as an upgrade of the control plane does: no
/// application request fails, the broker answers the running sidecar only with grants and
/// confirmations, the controller resumes (a new ProviderKey becomes Ready), and the provider
/// sees no verification beyond those due (none within this test).
#[tokio::test]
async fn an_api_server_restart_fails_no_request() -> anyhow::Result<()> {
    let _turn = SERIAL.lock().await;
    let env = TestEnv::new("fault-apiserver").await?;
    let fake = FakeProvider::start(FakeProviderConfig::default()).await?;
    let op = operator(&env, &fake, None).await?;
    let key = random_key("sk-ant-");
    ready_anthropic(&env, &fake, "claude", &key, serde_json::json!({})).await?;
    let pod = env
        .api::<Pod>()
        .create(&PostParams::default(), &opted_in_pod("fault-", &["claude"]))
        .await?;
    let mut sidecar = Sidecar::start(&env, &op, &pod, "default").await?;
    sidecar.wait_ready(Duration::from_secs(30)).await?;
    let verifications = || {
        fake.requests_log()
            .into_iter()
            .filter(|r| {
                r.provider == Some(ProviderKind::Anthropic) && r.path.ends_with("/v1/models")
            })
            .count()
    };
    let verified_before = verifications();
    let calls = AppCalls::start(&sidecar.url("claude"));
    let started = Instant::now();

    tokio::time::sleep(Duration::from_secs(5)).await; // calls before the restart
    let down = Instant::now();
    tokio::task::spawn_blocking(|| shared().restart_apiserver()).await??;
    let outage = down.elapsed();

    // The controller resumes: a ProviderKey made after the restart becomes Ready.
    let resumed = Instant::now();
    let second = random_key("sk-ant-");
    fake.add_valid_key(ProviderKind::Anthropic, &second);
    put_secret(&env, "after-raw", &[("api-key", &second)]).await?;
    create_pk(
        &env,
        "after",
        serde_json::json!({"provider": "anthropic", "secretRef": {"name": "after-raw"}}),
    )
    .await?;
    wait_pk(&env, "after", "Ready", |pk| {
        is_condition(pk, "Ready", "True", "Valid")
    })
    .await?;
    let controller_back = resumed.elapsed();

    // Two leases in all, so a sidecar cut off from the broker would have failed by now.
    let until = started + 2 * LEASE + Duration::from_secs(5);
    tokio::time::sleep(until.saturating_duration_since(Instant::now())).await;
    let (ok, failed) = calls.finish().await?;
    let others = other_answers(&op);
    let verified_after = verifications() - verified_before;
    println!(
        "API server restart: down {:.1} s; {ok} app requests, {} failed; broker answers other than 200/304: {others:?}; controller Ready again {:.1} s after; verification calls {verified_after} (1 due: the new key)",
        outage.as_secs_f64(),
        failed.len(),
        controller_back.as_secs_f64()
    );
    assert!(failed.is_empty(), "failed requests: {failed:?}");
    assert!(others.is_empty(), "the broker answered {others:?}");
    assert_eq!(verified_after, 1, "only the new key is verified");
    Ok(())
}

/// The operator down for longer than the lease: as `docs/operations.md` says, the sidecar
/// serves its key until the lease ends, then answers 503 until the broker is back; once it is,
/// the key is served again within one poll.
#[tokio::test]
async fn an_operator_down_past_the_lease_fails_closed_then_recovers_within_a_poll()
-> anyhow::Result<()> {
    let _turn = SERIAL.lock().await;
    let env = TestEnv::new("fault-down").await?;
    let fake = FakeProvider::start(FakeProviderConfig::default()).await?;
    let op = operator(&env, &fake, None).await?;
    ready_anthropic(
        &env,
        &fake,
        "claude",
        &random_key("sk-ant-"),
        serde_json::json!({}),
    )
    .await?;
    let pod = env
        .api::<Pod>()
        .create(&PostParams::default(), &opted_in_pod("down-", &["claude"]))
        .await?;
    let mut sidecar = Sidecar::start(&env, &op, &pod, "default").await?;
    sidecar.wait_ready(Duration::from_secs(30)).await?;
    let http = reqwest::Client::new();
    let url = format!("{}/v1/messages", sidecar.url("claude"));
    let call = || async {
        let res = http
            .post(&url)
            .header("anthropic-version", "2023-06-01")
            .json(
                &serde_json::json!({"model": "claude-sonnet-4-5", "max_tokens": 8,
                "messages": [{"role": "user", "content": "hi"}]}),
            )
            .send()
            .await?;
        let status = res.status().as_u16();
        anyhow::Ok((status, res.text().await?))
    };
    anyhow::ensure!(call().await?.0 == 200);

    let broker = (op.config.broker_addr, op.config.broker_url.clone());
    op.stop().await?;
    let down = Instant::now();
    let (mut served, mut refused) = (0u32, 0u32);
    let mut first_refusal = None;
    // Down for the lease and 15 s more.
    while down.elapsed() < LEASE + Duration::from_secs(15) {
        let (status, body) = call().await?;
        match status {
            200 => {
                anyhow::ensure!(first_refusal.is_none(), "served again after failing closed");
                served += 1;
            }
            503 => {
                anyhow::ensure!(body.contains("lease"), "{body}");
                first_refusal.get_or_insert(down.elapsed());
                refused += 1;
            }
            other => anyhow::bail!("unexpected {other}: {body}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let failed_closed_at = first_refusal.ok_or_else(|| anyhow::anyhow!("never failed closed"))?;
    let op = operator(&env, &fake, Some(broker)).await?;
    let back = Instant::now();
    loop {
        if call().await?.0 == 200 {
            break;
        }
        anyhow::ensure!(
            back.elapsed() < Duration::from_secs(10),
            "the key did not come back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let recovered = back.elapsed();
    println!(
        "operator down {:.0} s (lease {} s): {served} requests served, then 503 from {:.1} s on ({refused} refused); served again {:.1} s after the operator was back (ready)",
        (LEASE + Duration::from_secs(15)).as_secs_f64(),
        LEASE.as_secs(),
        failed_closed_at.as_secs_f64(),
        recovered.as_secs_f64()
    );
    // The lease ran from the last answer before the stop (at most one poll, 5 s, earlier).
    assert!(
        failed_closed_at >= LEASE - Duration::from_secs(7),
        "{failed_closed_at:?}"
    );
    assert!(
        failed_closed_at <= LEASE + Duration::from_secs(2),
        "{failed_closed_at:?}"
    );
    // One poll (5 s, ±20 %) and the request.
    assert!(recovered <= Duration::from_secs(7), "{recovered:?}");
    drop(op);
    Ok(())
}
