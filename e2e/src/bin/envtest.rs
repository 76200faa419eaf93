//! `make cluster-up`: starts the same local control plane the tests use and keeps it up until
//! SIGINT or SIGTERM (`make cluster-down`), then stops etcd and kube-apiserver. With `--node`
//! (`make cluster-up NODE=1`, under `hack/node-ns.sh`) also the tests' node: containerd and a
//! kubelet, with the test images imported.

use std::path::PathBuf;

use anyhow::Context;
use byok_e2e::envtest::{Binaries, ControlPlane};

fn main() -> anyhow::Result<()> {
    let dir = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "target/envtest".into()),
    );
    let kubeconfig = dir.join("kubeconfig");
    let pid_file = dir.join("envtest.pid");
    std::fs::create_dir_all(&dir)?;
    let _ = std::fs::remove_file(&kubeconfig); // its appearance is the "ready" signal
    let with_node = std::env::args().any(|a| a == "--node");
    if !byok_e2e::node::in_node_namespace() {
        // Under hack/node-ns.sh our pid is the namespace's; `make` records the script's.
        std::fs::write(&pid_file, std::process::id().to_string())?;
    }

    let bins = Binaries::locate()?;
    let control_plane =
        ControlPlane::start(&bins, &dir.join("run")).context("starting the control plane")?;
    let node = if with_node {
        Some(byok_e2e::node::Node::start(&control_plane).context("starting the node")?)
    } else {
        None
    };
    control_plane.write_kubeconfig(&kubeconfig)?;
    eprintln!(
        "control plane ready at {}\n  export KUBECONFIG={}\nstop it with `make cluster-down`",
        control_plane.server_url(),
        kubeconfig.display()
    );

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        anyhow::Ok(())
    })?;
    eprintln!("stopping the control plane");
    drop(node);
    drop(control_plane);
    let _ = std::fs::remove_file(&kubeconfig);
    let _ = std::fs::remove_file(&pid_file);
    Ok(())
}
