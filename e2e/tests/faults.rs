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
use byok_e2e::serving::ServingOperator;
use byok_e2e::sidecar::{AppCalls, anthropic_call, serving_claude};
use byok_operator::providers::ProviderKind;

const LEASE: Duration = Duration::from_secs(30);

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The operator with a 30 s lease; at `broker` (address, URL) when given (a restart).
async fn operator(
    env: &TestEnv,
    fake: &FakeProvider,
    broker: Option<(std::net::SocketAddr, String)>,
) -> anyhow::Result<ServingOperator> {
    ServingOperator::start_leased(env, fake, LEASE, broker).await
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
    let sidecar = serving_claude(&env, &fake, &op, "fault-").await?;
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
    let sidecar = serving_claude(&env, &fake, &op, "down-").await?;
    let http = reqwest::Client::new();
    let base_url = sidecar.url("claude");
    let call = || anthropic_call(&http, &base_url);
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

/// The `byok-operator controller` binary watching `env`'s namespace, its keyring in `op_ns`,
/// as a ServiceAccount with the chart's RBAC, verifying against the fake provider.
fn spawn_operator(
    env: &TestEnv,
    op_ns: &TestEnv,
    fake: &FakeProvider,
    kubeconfig: &std::path::Path,
    log: &std::path::Path,
) -> anyhow::Result<byok_e2e::operator::OperatorProcess> {
    let ca = log.with_extension("ca.pem");
    std::fs::write(&ca, fake.ca_pem())?;
    let broker_port = byok_e2e::operator::free_port()?;
    let mut cmd = std::process::Command::new(byok_e2e::operator::operator_binary()?);
    cmd.args(["controller", "--namespace", &env.namespace])
        .args(["--operator-namespace", &op_ns.namespace])
        .arg("--insecure-allow-private-base-urls")
        .arg("--extra-ca-file")
        .arg(&ca)
        .args([
            "--verify-rate-per-host",
            "200",
            "--verify-concurrency-per-host",
            "16",
        ])
        .args([
            "--webhook-addr",
            &format!("127.0.0.1:{}", byok_e2e::operator::free_port()?),
            "--broker-addr",
            &format!("127.0.0.1:{broker_port}"),
            "--broker-url",
            &format!("https://127.0.0.1:{broker_port}"),
            "--admin-addr",
            &format!("127.0.0.1:{}", byok_e2e::operator::free_port()?),
            "--provider-endpoint",
            &format!(
                "{}={}",
                ProviderKind::OpenAI,
                fake.base_url(ProviderKind::OpenAI)
            ),
        ])
        .env("KUBECONFIG", kubeconfig)
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::null())
        .stderr(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)?,
        );
    Ok(byok_e2e::operator::OperatorProcess(cmd.spawn()?))
}

/// Issue 20 item 5: the operator SIGKILLed while a keyring rotation re-encrypts 200 managed
/// Secrets, when 10–90 % show the new key: nothing is left half-written (every managed Secret
/// opens, with the old key or the new), and after the restart the rotation finishes, with no
/// provider call.
#[tokio::test]
async fn a_kill_during_a_keyring_rotation_leaves_nothing_half_written() -> anyhow::Result<()> {
    use byok_operator::controller::keyring;
    use byok_operator::crd::ProviderKey;
    use k8s_openapi::api::core::v1::Secret;

    const KEYS: usize = 200;
    let _turn = SERIAL.lock().await;
    let env = TestEnv::new("fault-kill").await?;
    let op_ns = TestEnv::new("fault-kill-op").await?;
    byok_e2e::operator::install_crds(&env.client).await?;
    let fake = FakeProvider::start(FakeProviderConfig::default()).await?;
    let dir = std::env::temp_dir().join(format!("byok-kill-{}", env.namespace));
    std::fs::create_dir_all(&dir)?;
    let kubeconfig = dir.join("kubeconfig");
    let token = byok_e2e::operator::operator_service_account_token(&op_ns, &env.namespace).await?;
    byok_e2e::envtest::write_kubeconfig(&shared().kubeconfig_for_token(&token), &kubeconfig)?;
    let log = dir.join("operator.log");
    let mut operator = spawn_operator(&env, &op_ns, &fake, &kubeconfig, &log)?;

    let mut keys = Vec::new();
    for i in 0..KEYS {
        let key = random_key("sk-proj-");
        fake.add_valid_key(ProviderKind::OpenAI, &key);
        put_secret(&env, &format!("raw-{i}"), &[("api-key", &key)]).await?;
        create_pk(
            &env,
            &format!("k{i}"),
            serde_json::json!({"provider": "openai", "secretRef": {"name": format!("raw-{i}")}}),
        )
        .await?;
        keys.push(key);
    }
    let pks = env.api::<ProviderKey>();
    let with_key_id = |id: &'static str| {
        let pks = pks.clone();
        async move {
            let list = pks.list(&Default::default()).await?;
            anyhow::Ok(
                list.items
                    .iter()
                    .filter(|pk| {
                        pk.status
                            .as_ref()
                            .and_then(|s| s.encryption_key_id.as_deref())
                            == Some(id)
                    })
                    .count(),
            )
        }
    };
    let deadline = Instant::now() + Duration::from_secs(180);
    while with_key_id("k1").await? < KEYS {
        anyhow::ensure!(Instant::now() < deadline, "the keys never became Ready");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let verifications = fake.total_requests();

    // Rotate, and kill the operator when 10–90 % carry the new key.
    let keyring_api = op_ns.api::<Secret>();
    anyhow::ensure!(keyring::rotate(&keyring_api, keyring::DEFAULT_KEYRING_SECRET).await? == "k2");
    let rotated_at = Instant::now();
    let killed_at = loop {
        let done = with_key_id("k2").await?;
        if done * 10 >= KEYS {
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(operator.0.id() as i32),
                nix::sys::signal::Signal::SIGKILL,
            )?;
            let _ = operator.0.wait();
            break done;
        }
        anyhow::ensure!(
            rotated_at.elapsed() < Duration::from_secs(60),
            "no re-encryption"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let done_at_kill = with_key_id("k2").await?;
    anyhow::ensure!(
        done_at_kill * 10 <= KEYS * 9,
        "the kill landed too late ({done_at_kill} of {KEYS} done)"
    );

    // Nothing half-written: every managed Secret opens with the keyring, to its own key.
    let keyring = keyring::from_secret(&keyring_api.get(keyring::DEFAULT_KEYRING_SECRET).await?)?;
    let secrets = env.api::<Secret>();
    let opens = |keyring: &byok_operator::crypto::Keyring| {
        let secrets = secrets.clone();
        let keys = keys.clone();
        let namespace = env.namespace.clone();
        let keyring = keyring.clone();
        async move {
            let mut by_id = std::collections::BTreeMap::<String, usize>::new();
            for (i, key) in keys.iter().enumerate() {
                let name = format!("k{i}");
                let managed = secrets
                    .get(&byok_operator::names::managed_secret_name(&name))
                    .await?;
                let envelope = managed
                    .data
                    .and_then(|d| d.get(byok_operator::names::ENVELOPE_KEY).cloned())
                    .ok_or_else(|| anyhow::anyhow!("{name}: no envelope"))?;
                *by_id
                    .entry(byok_operator::crypto::envelope_key_id(&envelope.0)?.to_owned())
                    .or_default() += 1;
                let plain = keyring.decrypt(&namespace, &name, &envelope.0)?;
                let (_, opened) = byok_operator::crypto::open_payload(
                    secrecy::ExposeSecret::expose_secret(&plain),
                );
                anyhow::ensure!(opened == key.as_bytes(), "{name} opens to another key");
            }
            anyhow::Ok(by_id)
        }
    };
    let at_kill = opens(&keyring).await?;

    // Restarted, it finishes the rotation.
    let restarted = Instant::now();
    let _operator = spawn_operator(&env, &op_ns, &fake, &kubeconfig, &log)?;
    let deadline = Instant::now() + Duration::from_secs(120);
    while with_key_id("k2").await? < KEYS {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the rotation did not finish after the restart"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let finished = restarted.elapsed();
    let after = opens(&keyring).await?;
    println!(
        "keyring rotation: SIGKILL with {killed_at} of {KEYS} ProviderKeys re-encrypted (envelopes then: {at_kill:?}); after the restart all {KEYS} on k2 in {:.1} s (envelopes: {after:?}); provider calls during it: {}",
        finished.as_secs_f64(),
        fake.total_requests() - verifications
    );
    anyhow::ensure!(after.get("k2") == Some(&KEYS), "envelopes after: {after:?}");
    assert_eq!(
        fake.total_requests(),
        verifications,
        "re-encryption needs no provider call"
    );
    Ok(())
}
