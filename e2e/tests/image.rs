//! The container image, as far as it can be checked without a container build: its binary
//! (`make static`, what the Dockerfile runs) is static, runs as the image's non-root user with
//! nothing around it, and says the version the chart deploys; the Dockerfile builds it that way
//! and runs it as that user. `make test` runs these with `BYOK_STATIC_BINARY` set.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;

use anyhow::Context as _;
use byok_e2e::manifests::repo;
use byok_e2e::oci::is_static_elf;

/// UID and GID of distroless's `nonroot`, which the Dockerfile and the chart both use.
const NONROOT: u32 = 65532;

fn binary() -> anyhow::Result<PathBuf> {
    std::env::var_os("BYOK_STATIC_BINARY")
        .map(PathBuf::from)
        .context("BYOK_STATIC_BINARY is not set: run `make static`, then these tests with it pointing at the binary (make test does)")
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
    let mut version = Command::new(&binary);
    version.arg("--version").env_clear().current_dir("/");
    // As the image's user when this test may switch users (CI runs as root).
    if std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self")?) == 0 {
        version.uid(NONROOT).gid(NONROOT);
    }
    let out = version.output()?;
    assert!(out.status.success(), "--version failed: {out:?}");
    let printed = String::from_utf8(out.stdout)?;
    assert_eq!(
        printed.trim(),
        format!("byok-operator {}", chart_app_version()?),
        "the binary's version is the chart's appVersion (the default image tag)"
    );
    // The sidecar's subcommand is in the same binary.
    let proxy = Command::new(&binary)
        .args(["proxy", "--help"])
        .env_clear()
        .output()?;
    assert!(proxy.status.success(), "proxy --help failed: {proxy:?}");
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
        2,
        "a build stage and a runtime stage: {stages:?}"
    );
    assert!(
        stages[1].contains("distroless/static"),
        "the runtime has no libc or shell: {}",
        stages[1]
    );
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
