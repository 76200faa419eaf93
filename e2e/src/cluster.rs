//! What a real cluster adds to the test node, for tests that run the chart's Deployment as pods:
//! kube-controller-manager (rolls Deployments out, writes EndpointSlices, publishes
//! `kube-root-ca.crt`, collects garbage), kube-scheduler (places them on the node) and
//! kube-proxy (iptables mode: Service addresses reach pods, from pods and from the API server
//! alike).
//! Both built from the API server's module and version (`e2e/k8s-testbins/build.sh`).
//!
//! Only inside `hack/node-ns.sh`, like [`crate::node`]: kube-proxy's chains exist only in the
//! node's network namespace. Cluster DNS is [`ClusterDns`], answering for Services as
//! CoreDNS does.
//!
//! Only in a test binary of its own: the root CA publisher writes `kube-root-ca.crt` into every
//! namespace, which [`crate::node::add_root_ca`] would then find taken.

use std::fs;
use std::process::{Child, Command};
use std::time::Duration;

use anyhow::Context as _;
use k8s_openapi::api::core::v1::Service;
use kube::Api;

use crate::envtest::{Binaries, ControlPlane, spawn, write_kubeconfig};
use crate::node::{NODE_NAME, Node, POD_SUBNET};
use crate::operator::free_port;

/// The controllers a Deployment of the chart needs (node lifecycle lifts the node's
/// `not-ready` taint once the kubelet reports Ready), and nothing that would act on other tests'
/// objects (namespaces, ServiceAccounts: [`crate::envtest::TestEnv`] makes those).
const CONTROLLERS: &str = "deployment-controller,replicaset-controller,endpointslice-controller,\
root-ca-certificate-publisher-controller,garbage-collector-controller,disruption-controller,\
clusterrole-aggregation-controller,node-lifecycle-controller";

/// kube-controller-manager, kube-scheduler and kube-proxy for the node's control plane;
/// dropping it stops them.
pub struct ClusterAddons {
    controller_manager: Child,
    scheduler: Child,
    proxy: Child,
    dir: std::path::PathBuf,
}

impl std::fmt::Debug for ClusterAddons {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterAddons")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl ClusterAddons {
    pub fn start(cp: &ControlPlane, node: &Node) -> anyhow::Result<Self> {
        let bins = Binaries::locate()?;
        let dir = node.dir.join("addons");
        fs::create_dir_all(&dir)?;
        let kubeconfig = dir.join("kubeconfig");
        write_kubeconfig(&cp.kubeconfig(), &kubeconfig)?;
        let kubeconfig = kubeconfig.display().to_string();
        // The Service range must be routable for kube-proxy's DNAT to see the packets that
        // the API server (and the test) send to it; pods route everything to the node anyway.
        let route = Command::new("ip")
            .args(["route", "replace", "10.0.0.0/24", "dev", "byok-node"])
            .status()
            .context("running ip (iproute2)")?;
        anyhow::ensure!(
            route.success(),
            "adding the route to the Service range failed"
        );

        // The controller-manager and the scheduler talk to the API server, and check who
        // calls them, as the admin.
        let as_admin = [
            format!("--kubeconfig={kubeconfig}"),
            format!("--authentication-kubeconfig={kubeconfig}"),
            format!("--authorization-kubeconfig={kubeconfig}"),
        ];
        let controller_manager = spawn(
            Command::new(bins.dir.join("kube-controller-manager"))
                .args(&as_admin)
                .args([
                    format!("--root-ca-file={}", cp.ca_file().display()),
                    format!("--controllers={CONTROLLERS}"),
                    "--leader-elect=false".into(),
                    "--use-service-account-credentials=false".into(),
                    "--secure-port=0".into(),
                    // The rollouts of a test take seconds; so should their bookkeeping.
                    "--concurrent-deployment-syncs=2".into(),
                    "--v=1".into(),
                ]),
            &dir.join("kube-controller-manager.log"),
        )
        .context("starting kube-controller-manager (make testbins)")?;
        let scheduler = spawn(
            Command::new(bins.dir.join("kube-scheduler"))
                .args(&as_admin)
                .args(["--leader-elect=false", "--secure-port=0", "--v=1"]),
            &dir.join("kube-scheduler.log"),
        )
        .context("starting kube-scheduler (make testbins)")?;
        let proxy = spawn(
            Command::new(bins.dir.join("kube-proxy")).args([
                format!("--kubeconfig={kubeconfig}"),
                format!("--hostname-override={NODE_NAME}"),
                "--proxy-mode=iptables".into(),
                format!("--cluster-cidr={POD_SUBNET}"),
                // A pod calling a Service that lands on a pod of the same bridge gets its
                // answer back through the node, where the DNAT is undone.
                "--masquerade-all".into(),
                // Global sysctls stay as they are (the node's namespace does not hold them).
                "--conntrack-max-per-core=0".into(),
                "--conntrack-tcp-timeout-established=0".into(),
                "--conntrack-tcp-timeout-close-wait=0".into(),
                format!("--healthz-bind-address=127.0.0.1:{}", free_port()?),
                format!("--metrics-bind-address=127.0.0.1:{}", free_port()?),
                "--iptables-sync-period=5s".into(),
                "--v=1".into(),
            ]),
            &dir.join("kube-proxy.log"),
        )
        .context("starting kube-proxy (make testbins)")?;
        Ok(Self {
            controller_manager,
            scheduler,
            proxy,
            dir,
        })
    }

    /// The last `lines` lines of `kube-controller-manager`, `kube-scheduler` or `kube-proxy`'s log.
    pub fn log_tail(&self, component: &str, lines: usize) -> String {
        let log = fs::read_to_string(self.dir.join(format!("{component}.log"))).unwrap_or_default();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Fails with the addon's log if it exited.
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        for (name, child) in [
            ("kube-controller-manager", &mut self.controller_manager),
            ("kube-scheduler", &mut self.scheduler),
            ("kube-proxy", &mut self.proxy),
        ] {
            if let Some(status) = child.try_wait()? {
                let log =
                    fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(30).collect();
                anyhow::bail!(
                    "{name} exited with {status}:\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
        }
        Ok(())
    }
}

impl Drop for ClusterAddons {
    /// Stops the addons and removes what kube-proxy left in the node's network namespace
    /// (its chains, the Service route), which later test binaries share.
    fn drop(&mut self) {
        for child in [
            &mut self.controller_manager,
            &mut self.scheduler,
            &mut self.proxy,
        ] {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Ok(bins) = Binaries::locate() {
            let _ = Command::new(bins.dir.join("kube-proxy"))
                .args(["--cleanup", "--proxy-mode=iptables"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status();
        }
        let _ = Command::new("ip")
            .args(["route", "del", "10.0.0.0/24", "dev", "byok-node"])
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// The node's cluster DNS, as CoreDNS's `kubernetes` plugin answers for Services:
/// `<service>.<namespace>.svc[.cluster.local]` → the Service's cluster IP (A records; other
/// types of a known name get an empty answer), anything else NXDOMAIN. UDP on the node's
/// address, port 53, which the kubelet writes into every pod's `resolv.conf`
/// ([`crate::node`]'s `clusterDNS`).
pub struct ClusterDns {
    socket: std::sync::Arc<tokio::net::UdpSocket>,
    client: kube::Client,
}

impl ClusterDns {
    /// Binds port 53 of the node's address (fails here, not later in a pod's lookup).
    pub async fn bind(client: kube::Client, node_ip: std::net::Ipv4Addr) -> anyhow::Result<Self> {
        let socket = tokio::net::UdpSocket::bind((node_ip, 53))
            .await
            .context("binding the cluster DNS to port 53 of the node")?;
        Ok(Self {
            socket: std::sync::Arc::new(socket),
            client,
        })
    }

    /// Answers until the task is dropped; each query on a task of its own, given 2 s.
    pub async fn serve(self) -> anyhow::Result<()> {
        let mut buf = vec![0u8; 1500];
        loop {
            let (len, from) = self.socket.recv_from(&mut buf).await?;
            let (socket, client, query) = (
                self.socket.clone(),
                self.client.clone(),
                buf[..len].to_vec(),
            );
            tokio::spawn(async move {
                let answer =
                    tokio::time::timeout(Duration::from_secs(2), dns_reply(&client, &query));
                if let Ok(Some(reply)) = answer.await {
                    let _ = socket.send_to(&reply, from).await;
                }
            });
        }
    }
}

/// `<service>.<namespace>` of a Service name, lowercased; only RFC 1123 labels.
fn service_of(name: &str) -> Option<(String, String)> {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    let rest = name.strip_suffix(".cluster.local").unwrap_or(&name);
    let (service, namespace) = rest.strip_suffix(".svc")?.split_once('.')?;
    let label = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    (label(service) && label(namespace)).then(|| (service.to_owned(), namespace.to_owned()))
}

/// The answer to one query packet, or nothing for what is not a query.
async fn dns_reply(client: &kube::Client, query: &[u8]) -> Option<Vec<u8>> {
    use simple_dns::rdata::{A, RData};
    use simple_dns::{CLASS, Packet, PacketFlag, QTYPE, RCODE, ResourceRecord, TYPE};
    let query = Packet::parse(query).ok()?;
    let question = query.questions.first()?.clone();
    let ip = match service_of(&question.qname.to_string()) {
        // An API error gets no answer (the client asks again), not a NXDOMAIN.
        Some((service, namespace)) => Api::<Service>::namespaced(client.clone(), &namespace)
            .get_opt(&service)
            .await
            .ok()?
            .and_then(|s| s.spec?.cluster_ip)
            .and_then(|ip| ip.parse::<std::net::Ipv4Addr>().ok()),
        None => None,
    };
    let mut reply = Packet::new_reply(query.id());
    reply.set_flags(PacketFlag::AUTHORITATIVE_ANSWER | PacketFlag::RECURSION_AVAILABLE);
    if query.has_flags(PacketFlag::RECURSION_DESIRED) {
        reply.set_flags(PacketFlag::RECURSION_DESIRED);
    }
    reply.questions.push(question.clone());
    match ip {
        Some(ip) => {
            if question.qtype == QTYPE::TYPE(TYPE::A) {
                reply.answers.push(ResourceRecord::new(
                    question.qname.clone(),
                    CLASS::IN,
                    5,
                    RData::A(A::from(ip)),
                ));
            }
        }
        None => *reply.rcode_mut() = RCODE::NameError,
    }
    reply.build_bytes_vec().ok()
}

#[cfg(test)]
mod tests {
    use super::service_of;

    #[test]
    fn only_service_names_of_rfc_1123_labels_are_looked_up() {
        let found = |n: &str| service_of(n).map(|(s, ns)| format!("{s}/{ns}"));
        assert_eq!(found("broker.ops.svc").as_deref(), Some("broker/ops"));
        assert_eq!(
            found("Broker.OPS.svc.cluster.local.").as_deref(),
            Some("broker/ops")
        );
        for bad in [
            "svc/proxy/x.ns.svc",
            "a.b.c.svc",
            "x.ns.svc.example",
            "-x.ns.svc",
            "x?.ns.svc",
            ".ns.svc",
        ] {
            assert_eq!(found(bad), None, "{bad}");
        }
    }
}
