//! The chart and the kustomize manifests as users get them: rendered by the real helm, applied
//! by the real kubectl (both built by `e2e/k8s-testbins/build.sh`), read back as plain objects.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use anyhow::Context as _;
use serde_json::Value;

use crate::envtest::{Binaries, TestEnv, shared};

/// The Kubernetes version the chart is rendered for: the local control plane's.
pub const KUBE_VERSION: &str = "1.37.2";

/// The repository root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub fn chart_dir() -> PathBuf {
    repo().join("charts/byok-operator")
}

/// The directory of the test binaries: helm, kubectl, and `crds/` of cert-manager and the
/// Prometheus operator as published.
pub fn tools_dir() -> anyhow::Result<PathBuf> {
    static DIR: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    DIR.get_or_init(|| {
        Binaries::locate()
            .map(|b| b.dir)
            .map_err(|e| format!("{e:#}"))
    })
    .clone()
    .map_err(|e| anyhow::anyhow!(e))
}

/// Runs a tool and returns its standard output; fails with its standard error.
pub fn run(program: &Path, args: &[&str], stdin: Option<&str>) -> anyhow::Result<String> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {}", program.display()))?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    anyhow::ensure!(
        out.status.success(),
        "{} {} failed ({}):\n{}{}",
        program.display(),
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr),
        stdout
    );
    Ok(stdout)
}

pub fn helm(args: &[&str]) -> anyhow::Result<String> {
    run(&tools_dir()?.join("helm"), args, None)
}

/// `helm template` of the chart as release `release` in `namespace`, with `--set` values.
pub fn render_chart(release: &str, namespace: &str, sets: &[String]) -> anyhow::Result<String> {
    let chart = chart_dir();
    let mut args = vec![
        "template".to_string(),
        release.to_string(),
        chart.display().to_string(),
        "--namespace".into(),
        namespace.into(),
        "--kube-version".into(),
        KUBE_VERSION.into(),
    ];
    for set in sets {
        args.extend(["--set".to_string(), set.clone()]);
    }
    helm(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

/// Every object of a multi-document YAML stream (empty documents left out).
pub fn objects(yaml: &str) -> anyhow::Result<Vec<Value>> {
    let docs: Vec<Value> = serde_saphyr::from_multiple(yaml)?;
    Ok(docs.into_iter().filter(|d| !d.is_null()).collect())
}

/// The objects of `kind`.
pub fn of_kind<'a>(objects: &'a [Value], kind: &str) -> Vec<&'a Value> {
    objects.iter().filter(|o| o["kind"] == kind).collect()
}

/// The one object of `kind`.
pub fn one<'a>(objects: &'a [Value], kind: &str) -> anyhow::Result<&'a Value> {
    match of_kind(objects, kind).as_slice() {
        [one] => Ok(one),
        other => anyhow::bail!("expected one {kind}, found {}", other.len()),
    }
}

/// An admin kubeconfig for the shared control plane, written once per test binary.
pub fn admin_kubeconfig() -> anyhow::Result<PathBuf> {
    static PATH: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    PATH.get_or_init(|| {
        let path = std::env::temp_dir().join(format!("byok-e2e-kubeconfig-{}", std::process::id()));
        shared()
            .write_kubeconfig(&path)
            .map(|()| path)
            .map_err(|e| format!("{e:#}"))
    })
    .clone()
    .map_err(|e| anyhow::anyhow!(e))
}

/// `kubectl apply --server-side` of `yaml` as the admin, as a user installing it would: the
/// API server validates every object (schema, CEL rules, RBAC escalation checks).
pub fn kubectl_apply(yaml: &str) -> anyhow::Result<String> {
    let kubeconfig = admin_kubeconfig()?;
    run(
        &tools_dir()?.join("kubectl"),
        &[
            "--kubeconfig",
            &kubeconfig.display().to_string(),
            "apply",
            "--server-side",
            "--field-manager=byok-e2e",
            "-f",
            "-",
        ],
        Some(yaml),
    )
}

/// The chart's ServiceAccount and RBAC (nothing else), rendered for `release` in the test's
/// namespace and applied; returns a token of that ServiceAccount and every rendered object.
/// An operator using the token has exactly the chart's rights.
pub async fn chart_service_account_token(
    env: &TestEnv,
    release: &str,
    sets: &[String],
) -> anyhow::Result<(String, Vec<Value>)> {
    use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
    use k8s_openapi::api::core::v1::ServiceAccount;
    use kube::api::PostParams;

    let rendered = objects(&render_chart(release, &env.namespace, sets)?)?;
    let rbac: Vec<&Value> = rendered
        .iter()
        .filter(|o| {
            matches!(
                o["kind"].as_str(),
                Some(
                    "ServiceAccount"
                        | "ClusterRole"
                        | "ClusterRoleBinding"
                        | "Role"
                        | "RoleBinding"
                )
            )
        })
        .collect();
    let yaml = rbac
        .iter()
        .map(serde_json::to_string)
        .collect::<Result<Vec<_>, _>>()?
        .join("\n---\n");
    kubectl_apply(&yaml)?;
    let sa = one(&rendered, "ServiceAccount")?["metadata"]["name"]
        .as_str()
        .context("ServiceAccount name")?
        .to_string();
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            expiration_seconds: Some(3600),
            ..Default::default()
        }),
        ..Default::default()
    };
    let issued = env
        .api::<ServiceAccount>()
        .create_token_request(&sa, &PostParams::default(), &request)
        .await?;
    let token = issued
        .status
        .and_then(|s| s.token)
        .context("TokenRequest returned no token")?;
    Ok((token, rendered))
}
