//! A one-node cluster for tests: the shared control plane plus containerd, runc, the CNI
//! bridge and a kubelet built from the same Kubernetes version as the API server.
//!
//! Only inside `hack/node-ns.sh` (network, mount and PID namespaces of its own, see there):
//! the node's address, its pods' bridge and every path it writes exist only in there, and
//! everything started here dies with the namespace. Tests that need a node are `#[ignore]`d
//! and named `node_…`; `make test` runs them under that script.

use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use k8s_openapi::api::core::v1::{ConfigMap, Node as KubeNode, Pod};
use kube::api::{Api, ObjectMeta, PostParams};

use crate::envtest::{
    Binaries, ControlPlane, TestEnv, shared, spawn, start_on_owner_thread, write_kubeconfig,
};
use crate::oci::{self, Entry, Image};
use crate::serving::{TEST_OPERATOR_IMAGE, TEST_PROXY_IMAGE};

pub const NODE_NAME: &str = "byok-node";
pub const PAUSE_IMAGE: &str = "byok.dev/test/pause:e2e";
pub const APP_IMAGE: &str = "byok.dev/test/app:e2e";
/// What an attacker swaps the sidecar's image to: the sidecar's repository (another tag),
/// busybox printing the token the sidecar's mount holds, then sleeping. The sidecar's args are
/// handed to `sh -c` as positional parameters, and ignored.
pub const TOKEN_PRINTER_IMAGE: &str = "byok.dev/test/byok-proxy:token-printer";
/// Where the node keeps its state: a tmpfs of the node's mount namespace.
const NODE_DIR: &str = "/var/lib/byok-node";
const CONTAINERD_SOCKET: &str = "/run/containerd/containerd.sock";
/// The pods' subnet on the node's CNI bridge.
pub const POD_SUBNET: &str = "10.202.0.0/24";
/// Start of containerd and a kubelet to a Ready node (measured: 2–5 s; more when the
/// sidecar binary must be built first).
const READY_TIMEOUT: Duration = Duration::from_secs(90);

/// Whether this process runs where a node can be started (see `hack/node-ns.sh`).
pub fn in_node_namespace() -> bool {
    std::env::var_os("BYOK_NODE_NS").is_some_and(|v| v == "1")
}

/// The node's address: the API server, the operator's broker and the fake provider are
/// reached by pods on it.
pub fn node_ip() -> anyhow::Result<Ipv4Addr> {
    anyhow::ensure!(
        in_node_namespace(),
        "tests with a real node run under hack/node-ns.sh (`make test` does that)"
    );
    let ip = std::env::var("BYOK_NODE_IP").context("BYOK_NODE_IP is not set")?;
    Ok(ip.parse()?)
}

/// containerd and a kubelet, registered as node [`NODE_NAME`] with the shared control plane.
pub struct Node {
    pub ip: Ipv4Addr,
    pub dir: PathBuf,
    containerd: Child,
    kubelet: Option<Child>,
    /// Seconds from nothing to a Ready node, for the note and `make bench`.
    pub started_in: Duration,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("ip", &self.ip)
            .finish_non_exhaustive()
    }
}

/// The node shared by every test of this test binary, started on first use.
pub fn shared_node() -> &'static Node {
    static NODE: OnceLock<Result<Node, String>> = OnceLock::new();
    let started =
        NODE.get_or_init(|| start_on_owner_thread("node-owner", || Node::start(shared())));
    match started {
        Ok(node) => node,
        Err(e) => panic!("the test node did not start: {e}"),
    }
}

impl Node {
    /// Starts containerd and a kubelet for `cp` and waits until the node is Ready.
    pub fn start(cp: &ControlPlane) -> anyhow::Result<Node> {
        let begin = Instant::now();
        let ip = node_ip()?;
        let bins = Binaries::locate()?;
        let kubelet_bin = bins
            .kubelet
            .clone()
            .context("no kubelet in the test binaries: run `make testbins`")?;
        let dir = PathBuf::from(NODE_DIR);
        fs::create_dir_all(dir.join("cni"))?;

        fs::write(dir.join("containerd.toml"), containerd_config(&dir))?;
        fs::write(dir.join("cni/10-byok.conflist"), cni_config())?;
        let containerd = spawn(
            Command::new("containerd").args(["--config", &path_str(&dir.join("containerd.toml"))]),
            &dir.join("containerd.log"),
        )
        .context("starting containerd (Debian: containerd runc containernetworking-plugins)")?;
        let mut node = Node {
            ip,
            dir: dir.clone(),
            containerd,
            kubelet: None,
            started_in: Duration::ZERO,
        };
        node.wait_for("containerd", Duration::from_secs(30), |_| {
            Ok(Command::new("ctr")
                .args(["--address", CONTAINERD_SOCKET, "version"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()?
                .success())
        })?;
        eprintln!("test node: containerd up after {:?}", begin.elapsed());
        node.import_images()?;
        eprintln!("test node: images imported after {:?}", begin.elapsed());

        let kubelet_dir = dir.join("kubelet");
        fs::create_dir_all(&kubelet_dir)?;
        fs::write(kubelet_dir.join("ca.crt"), cp.ca_pem())?;
        write_kubeconfig(&cp.kubeconfig(), &kubelet_dir.join("kubeconfig"))?;
        fs::write(
            kubelet_dir.join("config.yaml"),
            kubelet_config(ip, &kubelet_dir),
        )?;
        node.kubelet = Some(spawn(
            Command::new(kubelet_bin).args([
                format!("--config={}", path_str(&kubelet_dir.join("config.yaml"))),
                format!("--kubeconfig={}", path_str(&kubelet_dir.join("kubeconfig"))),
                format!("--hostname-override={NODE_NAME}"),
                format!("--node-ip={ip}"),
                "--root-dir=/var/lib/kubelet".into(),
                "--v=2".into(),
            ]),
            &dir.join("kubelet.log"),
        )?);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let client = std::thread::scope(|s| s.spawn(|| runtime.block_on(cp.client())).join())
            .map_err(|_| anyhow::anyhow!("building a client panicked"))??;
        let nodes: Api<KubeNode> = Api::all(client);
        node.wait_for("the node to be Ready", READY_TIMEOUT, |_| {
            let got = std::thread::scope(|s| {
                s.spawn(|| runtime.block_on(nodes.get_opt(NODE_NAME)))
                    .join()
            })
            .map_err(|_| anyhow::anyhow!("reading the node panicked"))??;
            Ok(got.is_some_and(|n| is_ready(&n)))
        })?;
        node.started_in = begin.elapsed();
        eprintln!("test node Ready in {:?}", node.started_in);
        Ok(node)
    }

    /// Polls `ready` until it says yes, failing early (with the logs) if a process exited.
    fn wait_for(
        &mut self,
        what: &str,
        timeout: Duration,
        mut ready: impl FnMut(&mut Self) -> anyhow::Result<bool>,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let exited = [
                ("containerd", Some(&mut self.containerd)),
                ("kubelet", self.kubelet.as_mut()),
            ]
            .into_iter()
            .find_map(|(name, child)| Some((name, child?.try_wait().ok()??)));
            if let Some((name, status)) = exited {
                bail!(
                    "{name} exited with {status} while waiting for {what}:\n{}",
                    self.log_tail(name, 40)
                );
            }
            if ready(self)? {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "timed out after {timeout:?} waiting for {what}\ncontainerd:\n{}\nkubelet:\n{}",
                    self.log_tail("containerd", 20),
                    self.log_tail("kubelet", 40)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The last `lines` lines of `containerd` or `kubelet`'s log.
    pub fn log_tail(&self, component: &str, lines: usize) -> String {
        let log = fs::read_to_string(self.dir.join(format!("{component}.log"))).unwrap_or_default();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Puts `image` into the node's containerd, where pods find it without a pull.
    pub fn import(&self, image: &Image) -> anyhow::Result<()> {
        let file = self
            .dir
            .join(format!("{}.tar", image.name.replace(['/', ':'], "_")));
        oci::write_image(image, &file)?;
        let out = Command::new("ctr")
            .args([
                "--address",
                CONTAINERD_SOCKET,
                "-n",
                "k8s.io",
                "images",
                "import",
            ])
            .arg(&file)
            .output()?;
        let _ = fs::remove_file(&file);
        anyhow::ensure!(
            out.status.success(),
            "importing {}: {}",
            image.name,
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    fn import_images(&self) -> anyhow::Result<()> {
        let busybox = Path::new("/bin/busybox");
        let sidecar_entries = proxy_image_entries(&sidecar_binary(&self.dir)?, vec![])?;
        let operator_entries = operator_image_entries(&operator_program(&self.dir)?, vec![])?;
        let images = [
            Image {
                name: PAUSE_IMAGE.into(),
                entrypoint: vec![
                    "/bin/sh".into(),
                    "-c".into(),
                    "trap 'exit 0' TERM INT; while :; do sleep 3600 & wait $!; done".into(),
                ],
                cmd: vec![],
                env: vec!["PATH=/bin".into()],
                entries: oci::busybox_entries(busybox)?,
            },
            Image {
                name: APP_IMAGE.into(),
                entrypoint: vec![],
                cmd: vec!["/bin/sh".into()],
                env: vec!["PATH=/bin".into()],
                entries: oci::busybox_entries(busybox)?,
            },
            Image {
                name: TOKEN_PRINTER_IMAGE.into(),
                entrypoint: vec![
                    "/bin/sh".into(),
                    "-c".into(),
                    // Answers the sidecar's probes, as a real attacker's image would: a
                    // native sidecar that never starts is not restarted on an image change.
                    format!(
                        "echo \"token: $(cat /var/run/secrets/byok.dev/token/token)\"; \
                         exec busybox httpd -f -p {} -h /www",
                        byok_operator::webhook::patch::ADMIN_PORT
                    ),
                    "printer".into(),
                ],
                cmd: vec![],
                env: vec!["PATH=/bin".into()],
                entries: {
                    let mut entries = oci::busybox_entries(busybox)?;
                    entries.push(Entry::Dir { path: "www".into() });
                    for probe in ["www/readyz", "www/livez"] {
                        entries.push(Entry::File {
                            path: probe.into(),
                            mode: 0o644,
                            contents: b"ok\n".to_vec(),
                        });
                    }
                    entries
                },
            },
            Image {
                name: TEST_PROXY_IMAGE.into(),
                entrypoint: vec![PROXY_ENTRYPOINT.into()],
                cmd: vec![],
                env: vec![],
                entries: sidecar_entries,
            },
            // What releases before the byok-proxy image injected (`byok-operator proxy`).
            Image {
                name: TEST_OPERATOR_IMAGE.into(),
                entrypoint: vec!["/byok-operator".into()],
                cmd: vec![],
                env: vec![],
                entries: operator_entries,
            },
        ];
        for image in &images {
            self.import(image)?;
        }
        Ok(())
    }

    /// What a container of `pod` wrote to its stdout and stderr (the kubelet's log file).
    pub fn container_log(&self, pod: &Pod, container: &str) -> String {
        let meta = &pod.metadata;
        let dir = format!(
            "/var/log/pods/{}_{}_{}/{container}",
            meta.namespace.as_deref().unwrap_or_default(),
            meta.name.as_deref().unwrap_or_default(),
            meta.uid.as_deref().unwrap_or_default()
        );
        let mut out = String::new();
        if let Ok(entries) = fs::read_dir(&dir) {
            let mut files: Vec<_> = entries.flatten().map(|e| e.path()).collect();
            files.sort();
            for file in files {
                out.push_str(&fs::read_to_string(file).unwrap_or_default());
            }
        }
        out
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(kubelet) = self.kubelet.as_mut() {
            let _ = kubelet.kill();
        }
        let _ = self.containerd.kill();
    }
}

fn is_ready(node: &KubeNode) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn path_str(path: &Path) -> String {
    path.display().to_string()
}

/// Lines of a CRI container log: `<RFC 3339 time> <stream> <F|P> <text>`.
pub fn cri_lines(log: &str) -> Vec<(jiff::Timestamp, String)> {
    log.lines()
        .filter_map(|line| {
            let mut parts = line.splitn(4, ' ');
            let time = parts.next()?.parse().ok()?;
            let text = parts.nth(2).unwrap_or_default();
            Some((time, text.to_owned()))
        })
        .collect()
}

/// A shell function `call` making one Messages API call through `$ANTHROPIC_BASE_URL`, and
/// `openai_call` one Chat Completions call through `$OPENAI_BASE_URL`; both print the body.
pub const CALLS: &str = r#"
call() {
  wget -q -O- --header 'content-type: application/json' --header 'anthropic-version: 2023-06-01' \
    --post-data '{"model":"claude-sonnet-4-5","max_tokens":16,"messages":[{"role":"user","content":"hi"}]}' \
    "$ANTHROPIC_BASE_URL/v1/messages"
}
openai_call() {
  wget -q -O- --header 'content-type: application/json' \
    --post-data '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}' \
    "$OPENAI_BASE_URL/chat/completions"
}
"#;

/// `call` every 100 ms for up to `seconds`, printing `OK` or `ERR <what wget said>`.
pub fn calling_loop(seconds: u32) -> String {
    format!(
        r#"{CALLS}
end=$(( $(date +%s) + {seconds} ))
while [ $(date +%s) -lt $end ]; do
  if call >/dev/null 2>/tmp/err; then echo OK; else echo "ERR $(cat /tmp/err)"; fi
  sleep 0.1
done"#
    )
}

/// Waits until `name`'s app has printed a line that `wanted` accepts; returns how long that
/// took, or fails after `within` with the app's and the sidecar's logs and the pod's status.
pub async fn wait_app_line(
    pods: &Api<Pod>,
    node: &Node,
    name: &str,
    what: &str,
    within: Duration,
    wanted: impl Fn(&str) -> bool,
) -> anyhow::Result<Duration> {
    let start = Instant::now();
    loop {
        let pod = pods.get(name).await?;
        let log = node.container_log(&pod, "app");
        if cri_lines(&log).iter().any(|(_, line)| wanted(line)) {
            return Ok(start.elapsed());
        }
        if start.elapsed() > within {
            bail!(
                "pod {name}: the app never printed {what} in {within:?}; its log:\n{log}\nsidecar log:\n{}\nstatus: {:?}",
                node.container_log(&pod, byok_operator::webhook::patch::SIDECAR_NAME),
                pod.status
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The sidecar image's program: the `byok-proxy` binary next to the tests, without its debug
/// sections (which are most of a debug build's size). `BYOK_SIDECAR_BINARY` picks another
/// (`make test`: the static one of the image).
pub fn sidecar_binary(dir: &Path) -> anyhow::Result<PathBuf> {
    let source = match std::env::var_os("BYOK_SIDECAR_BINARY") {
        Some(path) => PathBuf::from(path),
        None => crate::operator::proxy_binary()?,
    };
    stripped(&source, &dir.join("byok-proxy"))
}

/// The operator image's program: the operator binary next to the tests, stripped the same
/// way. `BYOK_OPERATOR_BINARY` picks another (`make test`: the static one of the image).
pub fn operator_program(dir: &Path) -> anyhow::Result<PathBuf> {
    let source = match std::env::var_os("BYOK_OPERATOR_BINARY") {
        Some(path) => PathBuf::from(path),
        None => crate::operator::operator_binary()?,
    };
    stripped(&source, &dir.join("byok-operator"))
}

fn stripped(source: &Path, to: &Path) -> anyhow::Result<PathBuf> {
    let status = Command::new("strip")
        .arg("--strip-debug")
        .arg("-o")
        .arg(to)
        .arg(source)
        .status()
        .context("running strip (binutils)")?;
    anyhow::ensure!(status.success(), "strip {} failed", source.display());
    Ok(to.to_path_buf())
}

/// Where the sidecar image (the Dockerfile's `proxy` target) holds its program.
pub const PROXY_ENTRYPOINT: &str = "/byok-proxy";

/// The system CAs, for real providers' certificates.
fn ca_bundle_entries() -> Vec<Entry> {
    vec![
        Entry::Dir {
            path: "etc/ssl/certs".into(),
        },
        Entry::File {
            path: "etc/ssl/certs/ca-certificates.crt".into(),
            mode: 0o644,
            contents: fs::read("/etc/ssl/certs/ca-certificates.crt").unwrap_or_default(),
        },
    ]
}

/// What the operator's image holds (the Dockerfile's): the static binary at `/byok-operator`,
/// the system CAs, an empty `/tmp`, plus `extra`.
pub fn operator_image_entries(binary: &Path, extra: Vec<Entry>) -> anyhow::Result<Vec<Entry>> {
    let mut entries = oci::program_entries(binary, "/byok-operator")?;
    entries.extend(ca_bundle_entries());
    entries.push(Entry::Dir { path: "tmp".into() });
    entries.extend(extra);
    Ok(entries)
}

/// What the sidecar's image holds (the Dockerfile's `proxy` target, on scratch): the static
/// binary at [`PROXY_ENTRYPOINT`] and the system CAs, plus `extra`; nothing else.
pub fn proxy_image_entries(binary: &Path, extra: Vec<Entry>) -> anyhow::Result<Vec<Entry>> {
    let mut entries = oci::program_entries(binary, PROXY_ENTRYPOINT)?;
    entries.extend(ca_bundle_entries());
    entries.extend(extra);
    Ok(entries)
}

fn containerd_config(dir: &Path) -> String {
    format!(
        r#"version = 2
root = "/var/lib/containerd"
state = "/run/containerd"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]

[grpc]
  address = "{CONTAINERD_SOCKET}"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  # This VM lacks CAP_SYS_RESOURCE: runc cannot set the sandbox's oom_score_adj of -998.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{}"
"#,
        path_str(&dir.join("cni"))
    )
}

fn cni_config() -> String {
    serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "byok-pods",
        "plugins": [{
            "type": "bridge",
            "bridge": "byok-cni0",
            "isGateway": true,
            "ipMasq": false,
            "hairpinMode": true,
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": POD_SUBNET}]],
                "routes": [{"dst": "0.0.0.0/0"}]
            }
        }]
    })
    .to_string()
}

fn kubelet_config(ip: Ipv4Addr, dir: &Path) -> String {
    let port = crate::operator::free_port().unwrap_or(10250);
    format!(
        r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: "{ip}"
port: {port}
readOnlyPort: 0
healthzPort: 0
authentication:
  anonymous: {{enabled: false}}
  webhook: {{enabled: false}}
  x509: {{clientCAFile: "{ca}"}}
authorization: {{mode: AlwaysAllow}}
containerRuntimeEndpoint: "unix://{CONTAINERD_SOCKET}"
cgroupDriver: cgroupfs
# The test VMs run cgroup v1, which kubelet 1.37 refuses unless told.
failCgroupV1: false
failSwapOn: false
resolvConf: ""
# Pods resolve Service names at the node's address, where a test that needs it serves
# cluster DNS (crate::cluster::ClusterDns); elsewhere no name a pod looks up resolves (most
# tests use addresses only).
clusterDNS: ["{ip}"]
clusterDomain: cluster.local
serializeImagePulls: false
# A small shared disk must not evict the test pods or collect their images.
evictionHard: {{"memory.available": "1Mi", "nodefs.available": "1%", "imagefs.available": "1%", "nodefs.inodesFree": "1%"}}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
syncFrequency: 10s
"#,
        ca = path_str(&dir.join("ca.crt")),
    )
}

/// A namespace for pods on the node: what the controller-manager would have added (the
/// `default` ServiceAccount comes from [`TestEnv::new`], the root CA ConfigMap from here).
pub async fn node_env(prefix: &str) -> anyhow::Result<(TestEnv, &'static Node)> {
    let node = tokio::task::spawn_blocking(shared_node).await?;
    let env = TestEnv::new(prefix).await?;
    add_root_ca(&env).await?;
    Ok((env, node))
}

/// The `kube-root-ca.crt` ConfigMap the controller-manager would have put in the namespace.
pub async fn add_root_ca(env: &TestEnv) -> anyhow::Result<()> {
    let cm = ConfigMap {
        metadata: ObjectMeta {
            name: Some("kube-root-ca.crt".into()),
            ..Default::default()
        },
        data: Some([("ca.crt".to_owned(), shared().ca_pem().to_owned())].into()),
        ..Default::default()
    };
    env.api::<ConfigMap>()
        .create(&PostParams::default(), &cm)
        .await?;
    Ok(())
}
