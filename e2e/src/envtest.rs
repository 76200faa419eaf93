//! A real local control plane: etcd and kube-apiserver, built from their Go modules by
//! `e2e/k8s-testbins/build.sh`, started on free loopback ports.
//!
//! Tests share one control plane per test binary ([`shared`]) and isolate themselves with a
//! fresh namespace each ([`TestEnv::new`]). The processes die with the test binary, even when
//! it panics or is killed: every child gets `PR_SET_PDEATHSIG`, and the children of the shared
//! control plane are spawned from a thread that lives as long as the process (the signal
//! follows the spawning *thread*, not the process).

use std::fs;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::api::{Api, PostParams};
use kube::config::{
    AuthInfo, Cluster, Context as KubeContext, KubeConfigOptions, Kubeconfig, NamedAuthInfo,
    NamedCluster, NamedContext,
};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::pki::{TestCa, key_pair_pem};

/// How long a cold kube-apiserver may take to become ready (RBAC bootstrap on 2 shared cores).
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a process gets after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);
const CONTEXT_NAME: &str = "byok-envtest";

/// Paths of the two control-plane binaries.
#[derive(Debug, Clone)]
pub struct Binaries {
    pub kube_apiserver: PathBuf,
    pub etcd: PathBuf,
    /// Only the tests with a real node need it (see [`crate::node`]).
    pub kubelet: Option<PathBuf>,
    /// The directory holding them, with `helm`, `kubectl` and published third-party CRDs
    /// (`crds/`) for the chart checks.
    pub dir: PathBuf,
}

impl Binaries {
    /// `$BYOK_TESTBINS_DIR` if set, otherwise whatever `build.sh` prints (it builds only when
    /// the version-keyed cache under `$HOME/.cache` is empty).
    pub fn locate() -> anyhow::Result<Self> {
        let dir = match std::env::var_os("BYOK_TESTBINS_DIR") {
            Some(dir) => PathBuf::from(dir),
            None => {
                let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("k8s-testbins/build.sh");
                let out = Command::new("bash")
                    .arg(&script)
                    .stderr(Stdio::inherit())
                    .output()
                    .with_context(|| format!("running {}", script.display()))?;
                if !out.status.success() {
                    bail!(
                        "{} failed ({}); see its output above",
                        script.display(),
                        out.status
                    );
                }
                PathBuf::from(String::from_utf8(out.stdout)?.trim())
            }
        };
        let bins = Self {
            kube_apiserver: dir.join("kube-apiserver"),
            etcd: dir.join("etcd"),
            kubelet: Some(dir.join("kubelet")).filter(|k| k.is_file()),
            dir,
        };
        for bin in [&bins.kube_apiserver, &bins.etcd] {
            if !bin.is_file() {
                bail!("{} is missing: run `make testbins`", bin.display());
            }
        }
        Ok(bins)
    }
}

/// A running etcd + kube-apiserver pair. Dropping it stops both and removes its run directory.
pub struct ControlPlane {
    run_dir: PathBuf,
    etcd: std::sync::Mutex<Option<Child>>,
    apiserver: std::sync::Mutex<Option<Child>>,
    /// How the API server was started, for [`ControlPlane::restart_apiserver`].
    apiserver_command: (PathBuf, Vec<String>),
    server_url: String,
    ca_pem: String,
    admin_token: String,
    webhook_client_ca_pem: String,
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane")
            .field("server_url", &self.server_url)
            .field("run_dir", &self.run_dir)
            .finish_non_exhaustive()
    }
}

impl ControlPlane {
    /// Starts etcd and kube-apiserver with their state in `run_dir` (created; removed on drop)
    /// and blocks until `/readyz` answers 200.
    pub fn start(bins: &Binaries, run_dir: &Path) -> anyhow::Result<Self> {
        fs::create_dir_all(run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
        let run_dir = run_dir.canonicalize()?;
        let ca = TestCa::new("byok-envtest-ca")?;
        // On the test node, pods reach the API server as a cluster's do: at the `kubernetes`
        // Service's address (10.0.0.1, routed by kube-proxy where it runs) or the node's.
        let node_ip = if crate::node::in_node_namespace() {
            Some(crate::node::node_ip()?.to_string())
        } else {
            None
        };
        let mut sans = vec!["localhost", "127.0.0.1"];
        if let Some(ip) = node_ip.as_deref() {
            sans.extend([
                ip,
                "10.0.0.1",
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
            ]);
        }
        let serving = ca.issue("kube-apiserver", &sans)?;
        let admin_token = random_token();
        let (sa_signing_key, sa_public_key) = key_pair_pem()?;
        // The API server presents a client certificate to every webhook that asks for one
        // (its admission configuration), as a hardened cluster does.
        let webhook_client_ca = TestCa::new("byok-envtest-webhook-client-ca")?;
        let webhook_client = webhook_client_ca.issue("kube-apiserver-webhook-client", &[])?;
        let file = |name: &str| run_dir.join(name).display().to_string();
        let webhook_kubeconfig = serde_json::json!({
            "apiVersion": "v1", "kind": "Config",
            "users": [{"name": "*", "user": {
                "client-certificate": file("webhook-client.crt"),
                "client-key": file("webhook-client.key"),
            }}],
        });
        let webhook_admission = serde_json::json!({
            "apiVersion": "apiserver.config.k8s.io/v1",
            "kind": "WebhookAdmissionConfiguration",
            "kubeConfigFile": file("webhook-kubeconfig.json"),
        });
        let admission = serde_json::json!({
            "apiVersion": "apiserver.config.k8s.io/v1",
            "kind": "AdmissionConfiguration",
            "plugins": [
                {"name": "MutatingAdmissionWebhook", "configuration": webhook_admission},
                {"name": "ValidatingAdmissionWebhook", "configuration": webhook_admission},
            ],
        });
        let files = [
            ("webhook-client.crt", webhook_client.cert_pem.clone()),
            ("webhook-client.key", webhook_client.key_pem.clone()),
            ("webhook-kubeconfig.json", webhook_kubeconfig.to_string()),
            ("admission.json", admission.to_string()),
            ("ca.crt", ca.cert_pem()),
            ("apiserver.crt", serving.cert_pem.clone()),
            ("apiserver.key", serving.key_pem.clone()),
            ("service-account.key", sa_signing_key),
            ("service-account.pub", sa_public_key),
            (
                "tokens.csv",
                format!("{admin_token},envtest-admin,envtest-admin,system:masters\n"),
            ),
        ];
        for (name, content) in &files {
            fs::write(run_dir.join(name), content)?;
        }

        let mut cp = ControlPlane {
            run_dir: run_dir.clone(),
            etcd: std::sync::Mutex::new(None),
            apiserver: std::sync::Mutex::new(None),
            apiserver_command: (bins.kube_apiserver.clone(), Vec::new()),
            server_url: String::new(),
            ca_pem: ca.cert_pem(),
            admin_token,
            webhook_client_ca_pem: webhook_client_ca.cert_pem(),
        };
        let [etcd_client, etcd_peer, apiserver_port] = free_ports()?;
        let etcd_url = format!("http://127.0.0.1:{etcd_client}");
        let peer_url = format!("http://127.0.0.1:{etcd_peer}");
        *cp.etcd.get_mut().unwrap_or_else(|p| p.into_inner()) = Some(spawn(
            Command::new(&bins.etcd).args([
                "--name=envtest",
                &format!("--data-dir={}", run_dir.join("etcd").display()),
                &format!("--listen-client-urls={etcd_url}"),
                &format!("--advertise-client-urls={etcd_url}"),
                &format!("--listen-peer-urls={peer_url}"),
                &format!("--initial-advertise-peer-urls={peer_url}"),
                &format!("--initial-cluster=envtest={peer_url}"),
                // Throwaway data: durability costs seconds per test run and buys nothing.
                "--unsafe-no-fsync",
                "--log-level=warn",
            ]),
            &run_dir.join("etcd.log"),
        )?);

        let file = |name: &str| run_dir.join(name).display().to_string();
        let address_args: Vec<String> = match node_ip.as_deref() {
            // The node's address is the `kubernetes` Service's endpoint. The API server's
            // certificate (client use included, from the CA the kubelet trusts) authenticates
            // it to the kubelet for exec, attach, port-forward and logs.
            Some(ip) => vec![
                "--bind-address=0.0.0.0".into(),
                format!("--advertise-address={ip}"),
                "--endpoint-reconciler-type=lease".into(),
                format!("--kubelet-client-certificate={}", file("apiserver.crt")),
                format!("--kubelet-client-key={}", file("apiserver.key")),
                "--kubelet-preferred-address-types=InternalIP".into(),
            ],
            // No Service IPs to route: skip the `kubernetes` Endpoints.
            None => vec![
                "--bind-address=127.0.0.1".into(),
                "--advertise-address=127.0.0.1".into(),
                "--endpoint-reconciler-type=none".into(),
            ],
        };
        let apiserver_args: Vec<String> = [format!("--etcd-servers={etcd_url}")]
            .into_iter()
            .chain(address_args)
            .chain([
                format!("--secure-port={apiserver_port}"),
                format!("--cert-dir={}", file("apiserver-certs")),
                format!("--tls-cert-file={}", file("apiserver.crt")),
                format!("--tls-private-key-file={}", file("apiserver.key")),
                format!("--client-ca-file={}", file("ca.crt")),
                format!("--token-auth-file={}", file("tokens.csv")),
                "--authorization-mode=RBAC".into(),
                // TokenRequest and TokenReview, which the key broker relies on.
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
                format!("--service-account-key-file={}", file("service-account.pub")),
                format!(
                    "--service-account-signing-key-file={}",
                    file("service-account.key")
                ),
                "--service-cluster-ip-range=10.0.0.0/24".into(),
                "--allow-privileged=true".into(),
                format!("--admission-control-config-file={}", file("admission.json")),
                "--enable-priority-and-fairness=false".into(),
                "--profiling=false".into(),
            ])
            .collect();
        *cp.apiserver.get_mut().unwrap_or_else(|p| p.into_inner()) = Some(spawn(
            Command::new(&bins.kube_apiserver).args(&apiserver_args),
            &run_dir.join("kube-apiserver.log"),
        )?);
        cp.apiserver_command.1 = apiserver_args;
        cp.server_url = format!("https://127.0.0.1:{apiserver_port}");
        cp.wait_ready()?;
        Ok(cp)
    }

    /// The file holding [`ControlPlane::ca_pem`].
    pub fn ca_file(&self) -> PathBuf {
        self.run_dir.join("ca.crt")
    }

    pub fn server_url(&self) -> &str {
        &self.server_url
    }

    /// PEM of the CA that issued the client certificate the API server presents to webhooks.
    pub fn webhook_client_ca_pem(&self) -> &str {
        &self.webhook_client_ca_pem
    }

    /// PEM of the CA that signed the API server's serving certificate.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// A kubeconfig for the admin user (a member of `system:masters`).
    pub fn kubeconfig(&self) -> Kubeconfig {
        self.kubeconfig_for_token(&self.admin_token)
    }

    /// A kubeconfig that authenticates with `token` (e.g. a ServiceAccount's, to run the
    /// operator with exactly the RBAC it ships with).
    pub fn kubeconfig_for_token(&self, token: &str) -> Kubeconfig {
        use base64::Engine;
        Kubeconfig {
            clusters: vec![NamedCluster {
                name: CONTEXT_NAME.into(),
                cluster: Some(Cluster {
                    server: Some(self.server_url.clone()),
                    certificate_authority_data: Some(
                        base64::engine::general_purpose::STANDARD.encode(&self.ca_pem),
                    ),
                    ..Default::default()
                }),
                ..Default::default()
            }],
            auth_infos: vec![NamedAuthInfo {
                name: CONTEXT_NAME.into(),
                auth_info: Some(AuthInfo {
                    token: Some(token.to_string().into()),
                    ..Default::default()
                }),
                ..Default::default()
            }],
            contexts: vec![NamedContext {
                name: CONTEXT_NAME.into(),
                context: Some(KubeContext {
                    cluster: CONTEXT_NAME.into(),
                    user: Some(CONTEXT_NAME.into()),
                    ..Default::default()
                }),
                ..Default::default()
            }],
            current_context: Some(CONTEXT_NAME.into()),
            ..Default::default()
        }
    }

    /// Writes [`Self::kubeconfig`] to `path` (YAML), for kubectl and for spawned operators.
    pub fn write_kubeconfig(&self, path: &Path) -> anyhow::Result<()> {
        write_kubeconfig(&self.kubeconfig(), path)
    }
}

/// Writes a kubeconfig as YAML, atomically (whoever polls for the file never reads half).
pub fn write_kubeconfig(kubeconfig: &Kubeconfig, path: &Path) -> anyhow::Result<()> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent)?;
    }
    let yaml = serde_saphyr::to_string(kubeconfig)?;
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, yaml)?;
    fs::rename(&tmp, path)?;
    Ok(())
}

impl ControlPlane {
    pub async fn kube_config(&self) -> anyhow::Result<kube::Config> {
        Ok(
            kube::Config::from_custom_kubeconfig(self.kubeconfig(), &KubeConfigOptions::default())
                .await?,
        )
    }

    /// A client for the admin user. Each tokio runtime needs its own client (a client's
    /// connection pool lives on the runtime that built it), so tests ask for one each.
    pub async fn client(&self) -> anyhow::Result<kube::Client> {
        Ok(kube::Client::try_from(self.kube_config().await?)?)
    }

    /// The last lines of a component's log, for error messages.
    pub fn log_tail(&self, component: &str, lines: usize) -> String {
        let text =
            fs::read_to_string(self.run_dir.join(format!("{component}.log"))).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Stops the API server and starts it again with the same flags, port and etcd (its
    /// state kept), as a control-plane upgrade or a crash does; returns once `/readyz` answers.
    /// Only for a test binary of its own: every other test of the binary sees the outage.
    pub fn restart_apiserver(&self) -> anyhow::Result<()> {
        let old = self
            .apiserver
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(child) = old {
            stop(child);
        }
        let (program, args) = self.apiserver_command.clone();
        let log = self.run_dir.join("kube-apiserver.log.restarted");
        // Spawned from a thread that never ends: the child's death signal follows its thread.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("apiserver-owner".into())
            .spawn(move || {
                let _ = tx.send(spawn(Command::new(&program).args(&args), &log));
                loop {
                    std::thread::park();
                }
            })?;
        let child = rx.recv().context("the apiserver-owner thread died")??;
        *self.apiserver.lock().unwrap_or_else(|p| p.into_inner()) = Some(child);
        self.wait_ready()
    }

    fn wait_ready(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        // A scoped thread, so that this also works when called from inside another runtime.
        let client = std::thread::scope(|s| s.spawn(|| runtime.block_on(self.client())).join())
            .map_err(|_| anyhow::anyhow!("building a client panicked"))??;
        loop {
            let exited = [("etcd", &self.etcd), ("kube-apiserver", &self.apiserver)]
                .into_iter()
                .find_map(|(name, child)| {
                    let mut child = child.lock().unwrap_or_else(|p| p.into_inner());
                    Some((name, child.as_mut()?.try_wait().ok()??))
                });
            if let Some((name, status)) = exited {
                bail!(
                    "{name} exited with {status} during start-up:\n{}",
                    self.log_tail(name, 30)
                );
            }
            let probe = std::thread::scope(|s| {
                s.spawn(|| {
                    runtime.block_on(async {
                        let req = http::Request::get("/readyz").body(Vec::new())?;
                        tokio::time::timeout(Duration::from_secs(5), client.request_text(req))
                            .await??;
                        anyhow::Ok(())
                    })
                })
                .join()
            });
            if matches!(probe, Ok(Ok(()))) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "kube-apiserver not ready after {READY_TIMEOUT:?}:\n{}",
                    self.log_tail("kube-apiserver", 30)
                );
            }
            std::thread::sleep(Duration::from_millis(200)); // poll interval, not synchronisation
        }
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        // The API server first, so it does not spend its grace period retrying a dead etcd.
        let take = |c: &std::sync::Mutex<Option<Child>>| {
            c.lock().unwrap_or_else(|p| p.into_inner()).take()
        };
        for child in [take(&self.apiserver), take(&self.etcd)]
            .into_iter()
            .flatten()
        {
            stop(child);
        }
        let _ = fs::remove_dir_all(&self.run_dir);
    }
}

fn stop(mut child: Child) {
    let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
    let deadline = Instant::now() + STOP_GRACE;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

pub(crate) fn spawn(cmd: &mut Command, log: &Path) -> anyhow::Result<Child> {
    let log_file = fs::File::create(log)?;
    let parent = std::process::id();
    cmd.stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file);
    // SAFETY: the closure runs between fork and exec and only makes two async-signal-safe
    // system calls (prctl, getppid); it allocates nothing and takes no locks.
    #[allow(unsafe_code)]
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
            // The parent may have died before prctl: then nobody would ever stop us.
            if nix::unistd::getppid().as_raw() as u32 != parent {
                return Err(std::io::Error::other("parent exited before start"));
            }
            Ok(())
        });
    }
    cmd.spawn()
        .with_context(|| format!("starting {:?}", cmd.get_program()))
}

fn free_ports<const N: usize>() -> anyhow::Result<[u16; N]> {
    // Hold all listeners until every port is chosen, so the kernel hands out distinct ports.
    let listeners: Vec<TcpListener> = (0..N)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<_, _>>()?;
    let ports: Vec<u16> = listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect::<Result<_, _>>()?;
    Ok(ports.try_into().expect("N ports"))
}

fn random_token() -> String {
    use rand::distr::{Alphanumeric, SampleString};
    Alphanumeric.sample_string(&mut rand::rng(), 40)
}

/// Root of the run directories of control planes started by test binaries.
fn test_runs_root() -> PathBuf {
    std::env::temp_dir().join("byok-envtest")
}

/// Removes run directories left by test binaries that were killed (their process is gone).
fn remove_stale_runs(root: &Path) {
    let Ok(entries) = fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let pid = name
            .to_str()
            .and_then(|n| n.split('-').next())
            .and_then(|p| p.parse::<i32>().ok());
        if let Some(pid) = pid
            && kill(Pid::from_raw(pid), None).is_err()
        {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

/// The control plane shared by every test in this test binary, started on first use.
///
/// It is never dropped (statics are not), so its processes end through `PR_SET_PDEATHSIG`
/// when the test binary exits, and its run directory is removed by the next start.
pub fn shared() -> &'static ControlPlane {
    static SHARED: OnceLock<Result<ControlPlane, String>> = OnceLock::new();
    let started = SHARED.get_or_init(|| {
        start_on_owner_thread("envtest-owner", || {
            let root = test_runs_root();
            remove_stale_runs(&root);
            let run_dir = root.join(format!("{}-{}", std::process::id(), random_token()));
            Binaries::locate().and_then(|bins| ControlPlane::start(&bins, &run_dir))
        })
    });
    match started {
        Ok(cp) => cp,
        Err(e) => panic!("the local control plane did not start: {e}"),
    }
}

/// Runs `start` on a thread that then lives as long as the process: children spawned there
/// with [`spawn`] get their death signal when that thread ends, so it must never end.
pub fn start_on_owner_thread<T: Send + 'static>(
    name: &str,
    start: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> Result<T, String> {
    let (tx, rx) = std::sync::mpsc::channel();
    let owner = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let _ = tx.send(start().map_err(|e| format!("{e:#}")));
            loop {
                std::thread::park();
            }
        });
    match owner {
        Ok(_) => rx
            .recv()
            .unwrap_or_else(|_| Err(format!("{name} thread died"))),
        Err(e) => Err(format!("spawning the {name} thread: {e}")),
    }
}

/// What one test gets: an admin client and a namespace of its own on the shared control plane.
pub struct TestEnv {
    pub client: kube::Client,
    pub namespace: String,
}

impl TestEnv {
    /// A fresh namespace named `<prefix>-<random>`, with the `default` ServiceAccount that the
    /// (absent) controller-manager would have created, so pods can be admitted.
    pub async fn new(prefix: &str) -> anyhow::Result<Self> {
        let cp = shared();
        let client = cp.client().await?;
        let suffix: String = random_token().to_lowercase().chars().take(8).collect();
        let namespace = format!("{prefix}-{suffix}");
        let ns = Namespace {
            metadata: kube::api::ObjectMeta {
                name: Some(namespace.clone()),
                ..Default::default()
            },
            ..Default::default()
        };
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await?;
        let sa = ServiceAccount {
            metadata: kube::api::ObjectMeta {
                name: Some("default".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        Api::<ServiceAccount>::namespaced(client.clone(), &namespace)
            .create(&PostParams::default(), &sa)
            .await?;
        Ok(Self { client, namespace })
    }

    pub fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as kube::Resource>::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.namespace)
    }
}
