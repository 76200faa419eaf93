//! `byok-operator verify`: one live verification from the command line, through the same code
//! path as the controller. It prints reason, fingerprint and masked key, never the key.

use std::process::Command;

use byok_e2e::fake_provider::{FakeProvider, FakeProviderConfig};
use byok_e2e::operator::{operator_binary, random_key};
use byok_operator::providers::ProviderKind;

fn verify(
    binary: &std::path::Path,
    fake: &FakeProvider,
    key: &str,
    dir: &std::path::Path,
) -> anyhow::Result<(i32, String)> {
    let key_file = dir.join("key.txt");
    std::fs::write(&key_file, format!("{key}\n"))?;
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, fake.ca_pem())?;
    let out = Command::new(binary)
        .args(["verify", "--provider", "openai", "--key-file"])
        .arg(&key_file)
        .args(["--insecure-allow-private-base-urls", "--extra-ca-file"])
        .arg(&ca)
        .args([
            "--provider-endpoint",
            &format!("openai={}", fake.base_url(ProviderKind::OpenAI)),
        ])
        .output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status.code().unwrap_or(-1), text))
}

#[tokio::test]
async fn verify_prints_the_reason_fingerprint_and_mask_and_exits_zero_only_when_valid()
-> anyhow::Result<()> {
    let binary = operator_binary()?;
    let fake = FakeProvider::start(FakeProviderConfig::default()).await?;
    let dir = std::env::temp_dir().join(format!("byok-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let (good, bad) = (random_key("sk-proj-"), random_key("sk-proj-"));
    fake.add_valid_key(ProviderKind::OpenAI, &good);

    let (code, text) = verify(&binary, &fake, &good, &dir)?;
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("reason:      Valid"), "{text}");
    let digest = <sha2::Sha256 as sha2::Digest>::digest(good.as_bytes());
    assert!(
        text.contains(&format!("sha256:{}", &hex::encode(digest)[..16])),
        "{text}"
    );
    assert!(
        text.contains(&format!("sk-proj-...{}", &good[good.len() - 4..])),
        "{text}"
    );
    assert!(!text.contains(&good[8..]), "the key is never printed");

    let (code, text) = verify(&binary, &fake, &bad, &dir)?;
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("reason:      InvalidKey"), "{text}");
    assert!(
        !text.contains(&bad[8..]) && !text.contains(&bad[bad.len() - 8..]),
        "the key is never printed"
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
