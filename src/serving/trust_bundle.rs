//! The namespaces' trust bundles: one ConfigMap [`names::TRUST_BUNDLE_CONFIGMAP`] in every
//! namespace with opted-in pods, holding the CA the broker's serving certificate chains to.
//! Sidecars mount it whole, so when the CA changes (a lost CA Secret, a cert-manager issuer
//! rotating its CA) the kubelet refreshes every running sidecar's copy, and the sidecar uses
//! it from its next broker call: running pods keep their keys without a restart.
//!
//! Why a ConfigMap per namespace (as Istio's `istio-ca-root-cert`): a pod can mount only
//! ConfigMaps of its own namespace, and ClusterTrustBundle projection is still beta and
//! off by default. Namespace editors can write ConfigMaps, so the chart's
//! ValidatingAdmissionPolicy `<release>-trust` lets only the operator's
//! ServiceAccount create, change or delete one by this name (the namespace and garbage
//! collectors may delete); a bundle a tenant chose would let whoever holds a certificate from
//! it take the sidecar's token.
//!
//! Who writes: the leader brings every bundle to the current CA ([`keep`]); every replica's
//! webhook asks for a missing one when it injects a pod ([`create_missing`]), without
//! overwriting, so a replica that has not seen a new CA yet never writes an old one back.
//! [`due`] is the whole policy and is pure.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use tokio::sync::{mpsc, watch};

use crate::names;

/// How often the leader compares every bundle with the CA (and on every CA change).
pub const CHECK_EVERY: Duration = Duration::from_secs(30);
/// How often a replica looks whether it has become the leader (then it passes at once).
const LEADER_POLL: Duration = Duration::from_secs(2);
/// A namespace whose bundle was seen or created is not asked for again within this.
const CREATED_MEMO: Duration = Duration::from_secs(60);

/// The bundle ConfigMap of `namespace` holding `ca_pem`.
pub fn config_map(namespace: &str, ca_pem: &str) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(names::TRUST_BUNDLE_CONFIGMAP.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some(BTreeMap::from([
                (
                    names::MANAGED_BY_LABEL.to_owned(),
                    names::MANAGED_BY_VALUE.to_owned(),
                ),
                (names::TRUST_BUNDLE_LABEL.to_owned(), "true".to_owned()),
            ])),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([(
            names::TRUST_BUNDLE_KEY.to_owned(),
            ca_pem.to_owned(),
        )])),
        ..ConfigMap::default()
    }
}

/// Whether `cm` is the operator's bundle for `ca_pem` exactly: `ca.crt` alone, nothing in
/// `binaryData`, not immutable. The broker serves a pod that trusts its namespace's bundle only
/// while this holds, so a bundle written before the policy existed (or while it was missing)
/// never gets a key to a sidecar that might trust someone else.
pub fn conforms(cm: &ConfigMap, ca_pem: &str) -> bool {
    let data_ok = cm.data.as_ref().is_some_and(|d| {
        d.len() == 1 && d.get(names::TRUST_BUNDLE_KEY).is_some_and(|v| v == ca_pem)
    });
    data_ok && cm.binary_data.as_ref().is_none_or(BTreeMap::is_empty) && cm.immutable != Some(true)
}

/// Whether an apply cannot bring `cm` to a conforming bundle (it is immutable, or holds
/// `binaryData` or other keys, which an apply of `ca.crt` would not remove): it is deleted
/// and created again, marked [`REPLACED_AT_ANNOTATION`]. Only a bundle written before the
/// policy guarded it can be so: the kubelet never refreshes an immutable one in a running
/// pod, so pods created before the replacement may trust whatever it held.
pub fn needs_recreating(cm: &ConfigMap) -> bool {
    cm.immutable == Some(true)
        || cm.binary_data.as_ref().is_some_and(|b| !b.is_empty())
        || cm
            .data
            .as_ref()
            .is_some_and(|d| d.keys().any(|k| k != names::TRUST_BUNDLE_KEY))
}

/// On a bundle the operator wrote in place of one it could not rewrite: when (RFC 3339). The
/// broker serves no pod created before it.
pub const REPLACED_AT_ANNOTATION: &str = "byok.dev/trust-bundle-replaced-at";

/// The namespaces whose bundle must be written, of those with opted-in pods (`existing`:
/// namespace -> its `ca.crt`, if any, of those that have one) where the bundle is missing or
/// holds something other than `ca_pem`.
pub fn due(
    pod_namespaces: &BTreeSet<String>,
    existing: &BTreeMap<String, Option<String>>,
    ca_pem: &str,
) -> Vec<String> {
    pod_namespaces
        .iter()
        .chain(existing.keys())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .filter(|ns| {
            existing
                .get(*ns)
                .is_none_or(|held| held.as_deref() != Some(ca_pem))
        })
        .cloned()
        .collect()
}

/// Writes the bundle of `namespace` (server-side apply, its own field manager).
pub async fn apply(client: &kube::Client, namespace: &str, ca_pem: &str) -> kube::Result<()> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let mut cm = config_map(namespace, ca_pem);
    // Apply needs the type in the body.
    cm.metadata.managed_fields = None;
    let body = serde_json::json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": cm.metadata,
        "data": cm.data,
    });
    api.patch(
        names::TRUST_BUNDLE_CONFIGMAP,
        &PatchParams::apply(names::TRUST_BUNDLE_FIELD_MANAGER).force(),
        &Patch::Apply(body),
    )
    .await
    .map(drop)
}

/// The leader's loop: on every CA change and every [`CHECK_EVERY`], every bundle of a
/// namespace with opted-in pods that is due ([`due`]) is written (a stale bundle where no
/// pod runs is brought up to date when one is injected there). `pod_namespaces` lists the namespaces with opted-in pods;
/// `leading` says whether this replica leads now.
pub async fn keep(
    client: kube::Client,
    mut ca: watch::Receiver<String>,
    pod_namespaces: impl Fn() -> BTreeSet<String> + Send + 'static,
    leading: impl Fn() -> bool + Send + 'static,
) {
    // Whether a pass is due: a replica that just became leader, a CA change, or
    // CHECK_EVERY since the last pass.
    let mut last_pass: Option<Instant> = None;
    let mut ca_changed = false;
    loop {
        let due_now = ca_changed || last_pass.is_none_or(|at| at.elapsed() >= CHECK_EVERY);
        if !leading() {
            // Seen, or `changed()` below would wake at once forever; becoming leader passes.
            ca.borrow_and_update();
            last_pass = None;
        } else if due_now {
            last_pass = Some(Instant::now());
            let ca_pem = ca.borrow_and_update().clone();
            pass(&client, &pod_namespaces(), &ca_pem).await;
        }
        // `changed()` marks the new value seen: remember it for the next pass.
        ca_changed = tokio::select! {
            changed = ca.changed() => {
                if changed.is_err() {
                    return;
                }
                true
            }
            () = tokio::time::sleep(LEADER_POLL) => false,
        };
    }
}

/// One pass of [`keep`]: reads the bundle of every namespace with opted-in pods, then writes
/// those that are due.
async fn pass(client: &kube::Client, namespaces: &BTreeSet<String>, ca_pem: &str) {
    // One GET per namespace with opted-in pods: works with a cluster-wide role and with
    // per-namespace Roles (watchNamespaces) alike.
    let mut existing = BTreeMap::new();
    for namespace in namespaces {
        let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
        if let Some(held) = held(&api, namespace, ca_pem).await {
            existing.insert(namespace.clone(), held);
        }
    }
    for namespace in due(namespaces, &existing, ca_pem) {
        match apply(client, &namespace, ca_pem).await {
            Ok(()) => tracing::info!(namespace, "trust bundle written"),
            // A namespace being deleted refuses new objects: not an error.
            Err(kube::Error::Api(e)) if e.code == 404 || e.message.contains("being terminated") => {
                tracing::debug!(namespace, error = %e, "trust bundle not written");
            }
            Err(e) => {
                tracing::warn!(namespace, error = %e, "writing the trust bundle failed; retried");
            }
        }
    }
}

/// What the namespace's bundle holds, as [`due`] takes it: `None` when there is none, or a
/// replacement of one the operator cannot rewrite failed. A bundle that could not be read,
/// or was just replaced, counts as holding `ca_pem` (nothing to write this pass).
async fn held(api: &Api<ConfigMap>, namespace: &str, ca_pem: &str) -> Option<Option<String>> {
    match api.get_opt(names::TRUST_BUNDLE_CONFIGMAP).await {
        Ok(Some(cm)) if needs_recreating(&cm) => replace(api, namespace, &cm, ca_pem)
            .await
            .then(|| Some(ca_pem.to_owned())),
        Ok(Some(cm)) => Some(
            cm.data
                .as_ref()
                .and_then(|d| d.get(names::TRUST_BUNDLE_KEY))
                .cloned(),
        ),
        Ok(None) => None,
        Err(e) => {
            tracing::warn!(namespace, error = %e, "reading the trust bundle failed; retried");
            Some(Some(ca_pem.to_owned()))
        }
    }
}

/// Replaces a bundle the operator cannot rewrite (`cm`): deletes it, then creates it anew
/// marked with the time it was replaced. Whether the delete went through.
async fn replace(api: &Api<ConfigMap>, namespace: &str, cm: &ConfigMap, ca_pem: &str) -> bool {
    // Only the UID seen is deleted; the create below makes it anew.
    let uid = cm.metadata.uid.clone();
    let params = kube::api::DeleteParams {
        preconditions: Some(kube::api::Preconditions {
            uid,
            resource_version: None,
        }),
        ..Default::default()
    };
    match api.delete(names::TRUST_BUNDLE_CONFIGMAP, &params).await {
        Ok(_) => {
            tracing::warn!(
                namespace,
                "the trust bundle was not the operator's (immutable, binaryData or other keys): replaced; pods created before get 503 until recreated"
            );
            let mut fresh = config_map(namespace, ca_pem);
            fresh.metadata.annotations = Some(BTreeMap::from([(
                REPLACED_AT_ANNOTATION.to_owned(),
                jiff::Timestamp::now().to_string(),
            )]));
            if let Err(e) = api.create(&PostParams::default(), &fresh).await {
                tracing::warn!(namespace, error = %e, "creating the replaced trust bundle failed; retried");
            }
            true
        }
        Err(e) => {
            tracing::warn!(namespace, error = %e, "deleting a trust bundle the operator cannot rewrite failed; retried");
            false
        }
    }
}

/// Every replica: creates the bundle of each namespace the webhook injected a pod into, when
/// it is missing (never overwriting one), so the pod's mount does not wait for the leader.
pub async fn create_missing(
    client: kube::Client,
    ca: watch::Receiver<String>,
    mut wanted: mpsc::Receiver<String>,
) {
    let mut seen: BTreeMap<String, Instant> = BTreeMap::new();
    while let Some(namespace) = wanted.recv().await {
        let now = Instant::now();
        seen.retain(|_, at| now.duration_since(*at) < CREATED_MEMO);
        if seen.contains_key(&namespace) {
            continue;
        }
        let api: Api<ConfigMap> = Api::namespaced(client.clone(), &namespace);
        let ca_pem = ca.borrow().clone();
        let created = match api.get_opt(names::TRUST_BUNDLE_CONFIGMAP).await {
            Ok(Some(_)) => Ok(()),
            Ok(None) => api
                .create(&PostParams::default(), &config_map(&namespace, &ca_pem))
                .await
                .map(drop)
                .or_else(|e| match e {
                    kube::Error::Api(ref r) if r.code == 409 => Ok(()),
                    e => Err(e),
                }),
            Err(e) => Err(e),
        };
        match created {
            Ok(()) => {
                seen.insert(namespace, now);
            }
            Err(e) => {
                tracing::warn!(namespace, error = %e, "creating the trust bundle failed; the leader retries")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(items: &[&str]) -> BTreeSet<String> {
        items.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn bundles_are_due_where_pods_use_keys_or_a_bundle_is_stale() {
        let existing = BTreeMap::from([
            ("current".to_owned(), Some("CA".to_owned())),
            ("stale".to_owned(), Some("OLD".to_owned())),
            ("emptied".to_owned(), None),
        ]);
        assert_eq!(
            due(&set(&["current", "new", "stale"]), &existing, "CA"),
            ["emptied", "new", "stale"]
        );
        // A bundle stays current after its pods are gone (a pod may come back any time).
        assert_eq!(
            due(&set(&[]), &existing, "NEW"),
            ["current", "emptied", "stale"]
        );
        assert!(due(&set(&["current"]), &existing, "CA").len() == 2);
    }

    #[test]
    fn only_the_operators_exact_bundle_conforms() {
        let good = config_map("team", "CA");
        assert!(conforms(&good, "CA"));
        assert!(!needs_recreating(&good));
        assert!(!conforms(&good, "NEW"));
        let mut extra = good.clone();
        extra
            .data
            .get_or_insert_with(BTreeMap::new)
            .insert("evil.crt".into(), "X".into());
        assert!(!conforms(&extra, "CA"));
        // An apply of ca.crt would leave the other key (another manager's).
        assert!(needs_recreating(&extra));
        let mut binary = good.clone();
        binary.binary_data = Some(BTreeMap::from([(
            names::TRUST_BUNDLE_KEY.to_owned(),
            k8s_openapi::ByteString(b"evil".to_vec()),
        )]));
        assert!(!conforms(&binary, "CA"));
        assert!(needs_recreating(&binary));
        let mut frozen = good.clone();
        frozen.immutable = Some(true);
        assert!(!conforms(&frozen, "CA"));
        assert!(needs_recreating(&frozen));
        assert!(!conforms(&ConfigMap::default(), "CA"));
    }

    #[test]
    fn the_bundle_names_itself_for_the_operator_and_the_mount() {
        let cm = config_map("team", "PEM");
        assert_eq!(
            cm.metadata.name.as_deref(),
            Some(names::TRUST_BUNDLE_CONFIGMAP)
        );
        assert_eq!(
            cm.data
                .as_ref()
                .and_then(|d| d.get(names::TRUST_BUNDLE_KEY))
                .map(String::as_str),
            Some("PEM")
        );
        assert_eq!(
            cm.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(names::TRUST_BUNDLE_LABEL))
                .map(String::as_str),
            Some("true")
        );
    }
}
