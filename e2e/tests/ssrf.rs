//! Base URL policy (SSRF): hosts that are, or resolve to, loopback, private or metadata
//! addresses get `BaseURLRejected` and no connection is attempted.
//!
//! This test can only send packets to loopback even if the code under test is wrong: it
//! re-runs itself in a new network namespace that has nothing but `lo` (`unshare --net`), and
//! the names it uses resolve through an injected resolver, never through DNS.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use byok_e2e::envtest::TestEnv;
use byok_e2e::fake_provider::{FakeProvider, FakeProviderConfig};
use byok_e2e::operator::*;
use byok_operator::providers::ProviderKind;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};

const NETNS_ENV: &str = "BYOK_NETNS_ONLY";

/// True when this process runs in a network namespace whose only interface is loopback.
fn in_loopback_only_netns() -> bool {
    let Ok(dev) = std::fs::read_to_string("/proc/self/net/dev") else {
        return false;
    };
    let interfaces: Vec<&str> = dev
        .lines()
        .skip(2)
        .filter_map(|l| l.split(':').next())
        .map(str::trim)
        .collect();
    std::env::var_os(NETNS_ENV).is_some() && interfaces == ["lo"]
}

/// Re-runs `test` of this binary inside `unshare --net` and asserts it passed there.
fn rerun_in_netns(test: &str) {
    let exe = std::env::current_exe().expect("own path");
    let status = std::process::Command::new("unshare")
        .args(["--net", "--", "sh", "-c", "ip link set lo up && exec \"$0\" \"$@\""])
        .arg(&exe)
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(NETNS_ENV, "1")
        .status()
        .expect("unshare --net (util-linux) must be available; tests run as root or with user namespaces");
    assert!(
        status.success(),
        "{test} failed inside the loopback-only network namespace"
    );
}

/// A resolver that knows a fixed table and nothing else.
struct StaticResolver(HashMap<&'static str, IpAddr>);

impl Resolve for StaticResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let found = self.0.get(name.as_str()).copied();
        Box::pin(async move {
            let ip = found.ok_or_else(|| -> Box<dyn std::error::Error + Send + Sync> {
                "no such host".into()
            })?;
            let addrs: Addrs = Box::new(std::iter::once(SocketAddr::new(ip, 443)));
            Ok(addrs)
        })
    }
}

#[tokio::test]
async fn base_urls_that_reach_private_or_metadata_addresses_are_rejected_without_a_connection()
-> anyhow::Result<()> {
    if !in_loopback_only_netns() {
        rerun_in_netns(
            "base_urls_that_reach_private_or_metadata_addresses_are_rejected_without_a_connection",
        );
        return Ok(());
    }
    let env = TestEnv::new("ssrf").await?;
    let fake = FakeProvider::start(FakeProviderConfig::default()).await?;
    let mut config = dev_config(&env, &fake)?;
    config.egress.allow_private = false; // the production default
    config.egress.resolver = Some(Arc::new(StaticResolver(HashMap::from([
        ("internal.example", "10.0.0.1".parse()?),
        ("metadata.example", "169.254.169.254".parse()?),
        ("loopback.example", "127.0.0.1".parse()?),
        ("mapped.example", "::ffff:10.0.0.1".parse()?),
    ]))));
    let _controller = RunningController::start(&env, config).await?;

    let port = fake.addr().port();
    let cases = [
        ("internal", "https://internal.example/v1".to_string()),
        ("metadata", "https://metadata.example/v1".to_string()),
        ("loopback", "https://loopback.example/v1".to_string()),
        ("mapped", "https://mapped.example/v1".to_string()),
        // These two point straight at the fake provider: it must see nothing.
        ("rawip", fake.base_url(ProviderKind::OpenAICompatible)),
        ("localhost", format!("https://localhost:{port}/compat/v1")),
    ];
    let key = random_key("sk-");
    fake.add_valid_key(ProviderKind::OpenAICompatible, &key);
    put_secret(&env, "raw", &[("api-key", &key)]).await?;
    for (name, url) in &cases {
        create_pk(
            &env,
            name,
            serde_json::json!({"provider": "openai-compatible", "secretRef": {"name": "raw"}, "baseURL": url}),
        )
        .await?;
    }
    for (name, url) in &cases {
        let pk = wait_pk(&env, name, "BaseURLRejected", |pk| {
            is_condition(pk, "Verified", "False", "BaseURLRejected")
        })
        .await?;
        assert!(
            is_condition(&pk, "Ready", "False", "BaseURLRejected"),
            "{name} ({url})"
        );
    }
    assert_eq!(
        fake.connections(),
        0,
        "no connection reached the fake provider"
    );
    assert_eq!(fake.total_requests(), 0);
    Ok(())
}
