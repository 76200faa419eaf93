//! The container images, as far as they can be checked without a container build: their
//! binaries (`make static`, what the Dockerfile runs: `byok-operator` and the sidecar's
//! `byok-proxy`) are static, run as the images' non-root users with nothing around them, and
//! say the version the chart deploys; the Dockerfile builds them that way and runs them as
//! those users. `make test` runs these with `BYOK_STATIC_BINARY` and `BYOK_STATIC_PROXY` set.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;

use anyhow::Context as _;
use byok_e2e::manifests::repo;
use byok_e2e::oci::is_static_elf;

/// UID and GID of distroless's `nonroot`, which the Dockerfile and the chart both use.
const NONROOT: u32 = 65532;

/// `runAsUser` of the injected sidecar, and the sidecar image's default user.
const SIDECAR_UID: u32 = 15532;

fn binary() -> anyhow::Result<PathBuf> {
    std::env::var_os("BYOK_STATIC_BINARY")
        .map(PathBuf::from)
        .context("BYOK_STATIC_BINARY is not set: run `make static`, then these tests with it pointing at the binary (make test does)")
}

fn proxy_binary() -> anyhow::Result<PathBuf> {
    std::env::var_os("BYOK_STATIC_PROXY")
        .map(PathBuf::from)
        .context("BYOK_STATIC_PROXY is not set: run `make static`, then these tests with it pointing at byok-proxy (make test does)")
}

/// `binary --version`, run as `uid` with an empty environment from `/` when this test may
/// switch users (CI runs as root).
fn version_as(binary: &std::path::Path, uid: u32) -> anyhow::Result<String> {
    let mut version = Command::new(binary);
    version.arg("--version").env_clear().current_dir("/");
    if std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self")?) == 0 {
        version.uid(uid).gid(uid);
    }
    let out = version.output()?;
    anyhow::ensure!(out.status.success(), "--version failed: {out:?}");
    Ok(String::from_utf8(out.stdout)?.trim().to_owned())
}

fn chart_app_version() -> anyhow::Result<String> {
    let chart = std::fs::read_to_string(repo().join("charts/byok-operator/Chart.yaml"))?;
    let chart: serde_json::Value = serde_saphyr::from_str(&chart)?;
    Ok(chart["appVersion"]
        .as_str()
        .context("appVersion")?
        .to_string())
}

#[test]
#[ignore = "needs BYOK_STATIC_BINARY (make test)"]
fn image_binary_is_static_and_runs_as_nonroot_with_the_charts_version() -> anyhow::Result<()> {
    let binary = binary()?;
    assert!(
        is_static_elf(&std::fs::read(&binary)?)?,
        "{} needs a dynamic loader: distroless static has none",
        binary.display()
    );
    assert_eq!(
        version_as(&binary, NONROOT)?,
        format!("byok-operator {}", chart_app_version()?),
        "the binary's version is the chart's appVersion (the default image tag)"
    );
    // The shape earlier releases injected (`byok-operator proxy`) still runs.
    let proxy = Command::new(&binary)
        .args(["proxy", "--help"])
        .env_clear()
        .output()?;
    assert!(proxy.status.success(), "proxy --help failed: {proxy:?}");
    Ok(())
}

#[test]
#[ignore = "needs BYOK_STATIC_PROXY (make test)"]
fn image_sidecar_binary_is_static_and_runs_as_the_sidecars_user_with_the_charts_version()
-> anyhow::Result<()> {
    let binary = proxy_binary()?;
    assert!(
        is_static_elf(&std::fs::read(&binary)?)?,
        "{} needs a dynamic loader: the sidecar image (scratch) has none",
        binary.display()
    );
    assert_eq!(
        version_as(&binary, SIDECAR_UID)?,
        format!("byok-proxy {}", chart_app_version()?),
        "the sidecar's version is the chart's appVersion (sidecar.image's default tag)"
    );
    // It runs without a subcommand: the flags the webhook writes are its own.
    let help = Command::new(&binary).arg("--help").env_clear().output()?;
    let help = String::from_utf8(help.stdout)?;
    for flag in ["--broker-url", "--admin-addr", "--key"] {
        assert!(help.contains(flag), "{flag} missing from --help: {help}");
    }
    Ok(())
}

#[test]
#[ignore = "needs BYOK_STATIC_BINARY (make test)"]
fn image_dockerfile_builds_that_binary_and_runs_it_unprivileged() -> anyhow::Result<()> {
    let dockerfile = std::fs::read_to_string(repo().join("Dockerfile"))?;
    let makefile = std::fs::read_to_string(repo().join("Makefile"))?;
    let stages: Vec<&str> = dockerfile
        .lines()
        .filter(|l| l.starts_with("FROM "))
        .collect();
    assert_eq!(
        stages.len(),
        3,
        "a build stage, the sidecar's and the operator's (the default, last): {stages:?}"
    );
    assert!(
        stages[1].starts_with("FROM scratch AS proxy"),
        "the sidecar image holds nothing but its binary and a CA bundle: {}",
        stages[1]
    );
    assert!(
        stages[2].contains("distroless/static") && stages[2].ends_with("AS operator"),
        "the operator's runtime has no libc or shell: {}",
        stages[2]
    );
    let proxy_stage = &dockerfile[dockerfile.find("FROM scratch AS proxy").unwrap_or(0)
        ..dockerfile.find("AS operator").unwrap_or(dockerfile.len())];
    let copies: Vec<&str> = proxy_stage
        .lines()
        .filter(|l| l.starts_with("COPY "))
        .collect();
    assert_eq!(
        copies,
        [
            "COPY --from=build /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt",
            "COPY --from=build /byok-proxy /byok-proxy",
        ],
        "the sidecar image's contents"
    );
    assert!(proxy_stage.contains(&format!("USER {SIDECAR_UID}:{SIDECAR_UID}")));
    assert!(proxy_stage.contains(r#"ENTRYPOINT ["/byok-proxy"]"#));
    assert!(
        dockerfile.contains("RUN make static"),
        "the image builds with `make static`"
    );
    assert!(makefile.contains("STATIC_TARGET := x86_64-unknown-linux-musl"));
    assert!(dockerfile.contains("rustup target add x86_64-unknown-linux-musl"));
    assert!(dockerfile.contains(&format!("USER {NONROOT}:{NONROOT}")));
    assert!(dockerfile.contains(r#"ENTRYPOINT ["/byok-operator"]"#));
    let values =
        std::fs::read_to_string(repo().join("charts/byok-operator/templates/deployment.yaml"))?;
    assert!(
        values.contains(&format!("runAsUser: {NONROOT}")),
        "the chart runs the image as its own user"
    );
    Ok(())
}
