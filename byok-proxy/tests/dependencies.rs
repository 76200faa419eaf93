//! The sidecar runs in every injected pod: its binary must not grow the operator's weight or
//! attack surface. `cargo tree` of this crate's normal dependencies must hold none of the
//! Kubernetes, actix or certificate-generation crates the operator uses.

use std::process::Command;

/// Crates the operator needs and the sidecar must never link.
const FORBIDDEN: [&str; 7] = [
    "kube",
    "kube-client",
    "kube-runtime",
    "k8s-openapi",
    "actix-web",
    "rcgen",
    "x509-parser",
];

#[test]
fn the_sidecar_depends_on_nothing_of_kubernetes_actix_or_certificate_generation() {
    let out = Command::new(env!("CARGO"))
        .args(["tree", "--offline", "-p", "byok-proxy", "-e", "normal"])
        .args(["--prefix", "none", "--format", "{p}"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let crates: std::collections::BTreeSet<&str> = stdout
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    // The tree is the real one: the proxy's own HTTP stack is in it.
    for expected in ["byok-proxy", "hyper", "rustls", "tokio"] {
        assert!(
            crates.contains(expected),
            "{expected} missing from {crates:?}"
        );
    }
    let found: Vec<&&str> = FORBIDDEN.iter().filter(|c| crates.contains(**c)).collect();
    assert!(
        found.is_empty(),
        "the sidecar's dependency tree holds {found:?}; `cargo tree -p byok-proxy -e normal -i <crate>` shows why"
    );
    // Nor anything of the kube family under another name.
    let kube_like: Vec<&&str> = crates
        .iter()
        .filter(|c| c.starts_with("kube") || c.starts_with("k8s-") || c.starts_with("actix"))
        .collect();
    assert!(kube_like.is_empty(), "{kube_like:?}");
}
