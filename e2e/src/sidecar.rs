//! The real sidecar binary (`byok-proxy`; `byok-operator proxy` for earlier releases' shape), started exactly as the webhook's sidecar container
//! says: its args and env from the admitted pod, with only the addresses a test process
//! must change (the broker URL, the admin and key ports, the token file) replaced. The
//! kubelet's part is played here too: the pod's token and its mounted trust bundle
//! ([`TrustBundleFile`]) are files in a temporary directory.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use k8s_openapi::api::core::v1::{Container, Pod};
use tokio::io::AsyncReadExt;
use tokio::process::{Child, Command};

use crate::envtest::TestEnv;
use crate::operator::{free_port, operator_binary, proxy_binary};
use crate::serving::{ServingOperator, pod_token};

/// How to start a sidecar beyond what its pod says.
#[derive(Debug, Default, Clone)]
pub struct Options {
    /// The binary (default: the debug build next to the tests).
    pub binary: Option<std::path::PathBuf>,
    /// Send stdout and stderr to this file instead of memory.
    pub output_file: Option<std::path::PathBuf>,
    pub extra_args: Vec<String>,
    /// Environment set after the pod's (e.g. another `BYOK_BROKER_CA`).
    pub env: Vec<(String, String)>,
}

/// The namespace's trust-bundle ConfigMap as the kubelet mounts it: a file, written again on
/// [`TrustBundleFile::sync`] (the kubelet's refresh), swapped in by a rename as the kubelet
/// does.
#[derive(Debug, Clone)]
pub struct TrustBundleFile {
    pub path: std::path::PathBuf,
    namespace: String,
}

impl TrustBundleFile {
    /// Waits (up to 30 s) for the bundle of `env`'s namespace and writes it to a new file.
    pub async fn mount(env: &TestEnv) -> anyhow::Result<Self> {
        let file = Self {
            path: std::env::temp_dir().join(format!(
                "byok-trust-{}-{}",
                std::process::id(),
                crate::operator::random_key("b")
            )),
            namespace: env.namespace.clone(),
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            match file.sync(env).await {
                Ok(_) => return Ok(file),
                Err(e) if std::time::Instant::now() > deadline => {
                    return Err(e.context("the namespace's trust bundle never appeared"));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// Copies the ConfigMap's bundle to the file now; returns the PEM.
    pub async fn sync(&self, env: &TestEnv) -> anyhow::Result<String> {
        let api: kube::Api<k8s_openapi::api::core::v1::ConfigMap> =
            kube::Api::namespaced(env.client.clone(), &self.namespace);
        let cm = api
            .get_opt(byok_operator::names::TRUST_BUNDLE_CONFIGMAP)
            .await?
            .context("no trust bundle ConfigMap")?;
        let pem = cm
            .data
            .as_ref()
            .and_then(|d| d.get(byok_operator::names::TRUST_BUNDLE_KEY))
            .cloned()
            .context("the trust bundle ConfigMap holds no ca.crt")?;
        let tmp = self.path.with_extension("new");
        std::fs::write(&tmp, &pem)?;
        std::fs::rename(&tmp, &self.path)?;
        Ok(pem)
    }
}

impl Drop for TrustBundleFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Whether the sidecar container mounts the namespace's trust bundle (this release on)
/// rather than holding its CA in env.
pub fn mounts_trust_bundle(container: &Container) -> bool {
    container
        .volume_mounts
        .iter()
        .flatten()
        .any(|m| m.mount_path.trim_end_matches('/') == byok_operator::names::TRUST_BUNDLE_DIR)
}

/// A running sidecar proxy process.
pub struct Sidecar {
    child: Child,
    /// Key name -> loopback port.
    pub ports: BTreeMap<String, u16>,
    pub admin_port: u16,
    output: Arc<Mutex<Vec<u8>>>,
    output_file: Option<std::path::PathBuf>,
    token_file: std::path::PathBuf,
    /// The mounted trust bundle, when [`Sidecar::start`] played the kubelet for it.
    pub trust_bundle: Option<TrustBundleFile>,
}

/// The injected sidecar container of an admitted pod.
pub fn sidecar_container(pod: &Pod) -> anyhow::Result<Container> {
    pod.spec
        .as_ref()
        .and_then(|s| s.init_containers.as_ref())
        .and_then(|c| {
            c.iter()
                .find(|c| c.name == byok_operator::webhook::patch::SIDECAR_NAME)
        })
        .cloned()
        .context("the pod has no byok-proxy sidecar")
}

impl Sidecar {
    /// Starts the sidecar of `pod` (admitted through `op`'s webhook), with a real
    /// TokenRequest token for `service_account` bound to the pod, audience byok.dev.
    pub async fn start(
        env: &TestEnv,
        op: &ServingOperator,
        pod: &Pod,
        service_account: &str,
    ) -> anyhow::Result<Sidecar> {
        Self::start_with(env, op, pod, service_account, Options::default()).await
    }

    /// [`Sidecar::start`] with `options` (extra args and environment, a log file).
    pub async fn start_with(
        env: &TestEnv,
        op: &ServingOperator,
        pod: &Pod,
        service_account: &str,
        mut options: Options,
    ) -> anyhow::Result<Sidecar> {
        let token = pod_token(
            env,
            service_account,
            pod,
            byok_operator::names::TOKEN_AUDIENCE,
        )
        .await?;
        let trust = if mounts_trust_bundle(&sidecar_container(pod)?) {
            let file = TrustBundleFile::mount(env).await?;
            options.env.push((
                "BYOK_BROKER_CA_FILE".into(),
                file.path.display().to_string(),
            ));
            Some(file)
        } else {
            None
        };
        let mut sidecar = Self::launch(op.broker_url(), pod, &token, options).await?;
        sidecar.trust_bundle = trust;
        Ok(sidecar)
    }

    /// Starts the sidecar of `pod` against the broker at `broker_url` with `token`.
    pub async fn launch(
        broker_url: &str,
        pod: &Pod,
        token: &str,
        options: Options,
    ) -> anyhow::Result<Sidecar> {
        let container = sidecar_container(pod)?;
        let token_file = std::env::temp_dir().join(format!(
            "byok-token-{}-{}",
            std::process::id(),
            crate::operator::random_key("t")
        ));
        std::fs::write(&token_file, token)?;

        let mut ports = BTreeMap::new();
        let admin_port = free_port()?;
        let mut args = Vec::new();
        for arg in container.args.iter().flatten() {
            if let Some(key) = arg.strip_prefix("--key=") {
                let (name, _) = key.split_once('=').context("--key without a port")?;
                let port = free_port()?;
                ports.insert(name.to_owned(), port);
                args.push(format!("--key={name}={port}"));
            } else if arg.starts_with("--broker-url=") {
                args.push(format!("--broker-url={broker_url}"));
            } else if arg.starts_with("--admin-addr=") {
                args.push(format!("--admin-addr=127.0.0.1:{admin_port}"));
            } else {
                args.push(arg.clone());
            }
        }
        args.extend(options.extra_args.iter().cloned());
        // The program the container's image runs: `byok-proxy`, or the operator's binary for
        // the shape of releases before the byok-proxy image (`byok-operator proxy ...`).
        let binary = match &options.binary {
            Some(b) => b.clone(),
            None if args.first().map(String::as_str) == Some("proxy") => operator_binary()?,
            None => proxy_binary()?,
        };
        let mut cmd = Command::new(binary);
        cmd.args(&args)
            .env_clear()
            .env("BYOK_TOKEN_FILE", &token_file)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        match &options.output_file {
            Some(path) => {
                let file = std::fs::File::create(path)?;
                cmd.stdout(file.try_clone()?).stderr(file);
            }
            None => {
                cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
            }
        }
        let meta = &pod.metadata;
        for var in container.env.iter().flatten() {
            let value = match (&var.value, &var.value_from) {
                (Some(v), _) => v.clone(),
                (None, Some(from)) => {
                    match from.field_ref.as_ref().map(|f| f.field_path.as_str()) {
                        Some("metadata.name") => meta.name.clone().unwrap_or_default(),
                        Some("metadata.namespace") => meta.namespace.clone().unwrap_or_default(),
                        other => anyhow::bail!("the sidecar env {} reads {other:?}", var.name),
                    }
                }
                (None, None) => String::new(),
            };
            cmd.env(&var.name, value);
        }
        for (name, value) in &options.env {
            cmd.env(name, value);
        }
        let mut child = cmd.spawn().context("starting byok-operator proxy")?;
        let output = Arc::new(Mutex::new(Vec::new()));
        for pipe in [
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let output = output.clone();
            tokio::spawn(async move {
                let mut pipe = pipe;
                let mut buf = [0u8; 8192];
                while let Ok(n) = pipe.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    output
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .extend_from_slice(&buf[..n]);
                }
            });
        }
        Ok(Sidecar {
            child,
            ports,
            admin_port,
            output,
            output_file: options.output_file.clone(),
            token_file,
            trust_bundle: None,
        })
    }

    /// `http://127.0.0.1:PORT` of a key.
    pub fn url(&self, key: &str) -> String {
        format!(
            "http://127.0.0.1:{}",
            self.ports.get(key).copied().unwrap_or(0)
        )
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.admin_port)
    }

    /// Everything the process wrote to stdout and stderr so far.
    pub fn output(&self) -> String {
        if let Some(path) = &self.output_file {
            return std::fs::read_to_string(path).unwrap_or_default();
        }
        String::from_utf8_lossy(&self.output.lock().unwrap_or_else(|p| p.into_inner())).into_owned()
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Polls `/readyz` until 200 or `within` passes.
    pub async fn wait_ready(&mut self, within: Duration) -> anyhow::Result<Duration> {
        let start = tokio::time::Instant::now();
        let client = reqwest::Client::new();
        let mut last = String::new();
        while start.elapsed() < within {
            if let Some(status) = self.child.try_wait()? {
                anyhow::bail!("the proxy exited ({status}): {}", self.output());
            }
            match client.get(self.admin_url("/readyz")).send().await {
                Ok(r) if r.status() == 200 => return Ok(start.elapsed()),
                Ok(r) => last = r.text().await.unwrap_or_default(),
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        anyhow::bail!(
            "the proxy was not ready within {within:?}: {last}\n{}",
            self.output()
        )
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) -> anyhow::Result<()> {
        let pid = self.child.id().context("the proxy has exited")?;
        let pid = nix::unistd::Pid::from_raw(i32::try_from(pid)?);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
        Ok(())
    }

    /// Waits for the process to exit.
    pub async fn wait_exit(
        &mut self,
        within: Duration,
    ) -> anyhow::Result<std::process::ExitStatus> {
        tokio::time::timeout(within, self.child.wait())
            .await
            .context("the proxy did not exit")?
            .map_err(Into::into)
    }

    /// Replaces the token file (the kubelet rotating the projected token).
    pub fn write_token(&self, token: &str) -> anyhow::Result<()> {
        std::fs::write(&self.token_file, token)?;
        Ok(())
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.token_file);
    }
}

/// An application calling Anthropic's Messages API through a sidecar's key port every 50 ms,
/// until [`AppCalls::finish`]: what a running pod's app would see.
pub struct AppCalls {
    stop: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<(u32, Vec<String>)>,
}

impl AppCalls {
    pub fn start(base_url: &str) -> Self {
        let base_url = base_url.to_owned();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let task = {
            let stop = stop.clone();
            tokio::spawn(async move {
                let http = reqwest::Client::new();
                let (mut ok, mut failed) = (0u32, Vec::new());
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let res = anthropic_call(&http, &base_url).await;
                    match res {
                        Ok((status, _)) if (200..300).contains(&status) => ok += 1,
                        Ok((status, body)) => failed.push(format!("{status}: {body}")),
                        Err(e) => failed.push(e.to_string()),
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                (ok, failed)
            })
        };
        Self { stop, task }
    }

    /// Stops calling; the successful calls and what each failed one got.
    pub async fn finish(self) -> anyhow::Result<(u32, Vec<String>)> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        Ok(self.task.await?)
    }
}

/// One Messages API call through a sidecar's key port at `base_url`: status and body.
pub async fn anthropic_call(
    http: &reqwest::Client,
    base_url: &str,
) -> anyhow::Result<(u16, String)> {
    let res = http
        .post(format!("{base_url}/v1/messages"))
        .header("anthropic-version", "2023-06-01")
        .json(
            &serde_json::json!({"model": "claude-sonnet-4-5", "max_tokens": 8,
            "messages": [{"role": "user", "content": "hi"}]}),
        )
        .send()
        .await?;
    let status = res.status().as_u16();
    Ok((status, res.text().await?))
}

/// What tests of a running pod start from: a Ready Anthropic ProviderKey `claude` (a fresh
/// key), an opted-in pod using it admitted through `op`'s webhook, and its sidecar running
/// and ready.
pub async fn serving_claude(
    env: &TestEnv,
    fake: &crate::fake_provider::FakeProvider,
    op: &ServingOperator,
    generate_name: &str,
) -> anyhow::Result<Sidecar> {
    let key = crate::operator::random_key("sk-ant-");
    crate::serving::ready_anthropic(env, fake, "claude", &key, serde_json::json!({})).await?;
    let pod = env
        .api::<Pod>()
        .create(
            &kube::api::PostParams::default(),
            &crate::serving::opted_in_pod(generate_name, &["claude"]),
        )
        .await?;
    let mut sidecar = Sidecar::start(env, op, &pod, "default").await?;
    sidecar.wait_ready(Duration::from_secs(30)).await?;
    Ok(sidecar)
}
