//! What the controller's caches hold. A watch delivers whole Secrets; before one is stored it
//! is rewritten to the facts reconcile decides on. No key, no ciphertext and no
//! `kubectl.kubernetes.io/last-applied-configuration` (which holds a Secret's data in
//! plaintext when it was applied with kubectl) stays in memory between reconciles, and
//! 10,000 keys cost little. Key bytes are read with a GET, only when a verification or a
//! write needs them.
//!
//! The facts ride in annotations under a prefix the API server would refuse
//! (`cache.byok.dev~...` is not a valid annotation name), so a user's own annotation can
//! never pose as one; the originals are dropped anyway.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Container, EphemeralContainer, Pod, PodSecurityContext, PodSpec, ProjectedVolumeSource,
    ResourceRequirements, Secret, SecurityContext, Volume, VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::ResourceExt;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::crypto;
use crate::names::{self, annotations};

/// Per data entry of a source Secret: [`Entry`] as JSON.
const ENTRY_PREFIX: &str = "cache.byok.dev~entry.";
/// On a managed Secret: the SHA-256 of its envelope, hex.
const ENVELOPE_DIGEST: &str = "cache.byok.dev~envelope-sha256";

/// What one entry of a source Secret holds, as far as decisions go: the public facts the
/// status shows about a key, never the key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind")]
pub enum Entry {
    /// A key: its fingerprint and mask (surrounding whitespace is not part of a key).
    Key {
        fingerprint: String,
        masked_key: String,
    },
    /// Absent, or only whitespace.
    Empty,
    /// Not UTF-8 text.
    NotText,
}

impl Entry {
    pub fn of(bytes: &[u8]) -> Entry {
        match std::str::from_utf8(bytes).map(str::trim) {
            Err(_) => Entry::NotText,
            Ok("") => Entry::Empty,
            Ok(key) => Entry::Key {
                fingerprint: crypto::fingerprint(key.as_bytes()),
                masked_key: crypto::mask(key),
            },
        }
    }
}

/// The metadata reconcile reads: identity, version, lifecycle and owners. Labels,
/// annotations, timestamps and managedFields go (each cached object is one of 10,000s).
pub fn identity(meta: &mut ObjectMeta) {
    let full = std::mem::take(meta);
    *meta = ObjectMeta {
        name: full.name,
        namespace: full.namespace,
        uid: full.uid,
        resource_version: full.resource_version,
        generation: full.generation,
        deletion_timestamp: full.deletion_timestamp,
        finalizers: full.finalizers,
        owner_references: full.owner_references,
        ..ObjectMeta::default()
    };
}

/// Rewrites an opted-in pod to what the broker checks: name, namespace, uid, deletion, the
/// inject label and the provider-keys annotation.
pub fn strip_pod(pod: &mut Pod) {
    pod.metadata = pod_meta(std::mem::take(&mut pod.metadata));
    // Of the spec, what shows who can read a byok.dev token, where it may go and whether the
    // node can hand it to anyone (see `webhook::patch::token_held_only_by_sidecar` and
    // `node_reach`): every container's name, image, whole volume mounts and the security
    // settings that reach the node (privileged, runAsUser); all of the sidecar's run settings
    // (application containers' env is not kept: it may hold values of their own); each
    // volume's name, whether it is a hostPath or an emptyDir, its projected token sources
    // (other sources counted, not kept), and the trust bundle's ConfigMap source; the host
    // namespaces; how it resolves names (`hostAliases` hostnames, `dnsPolicy`, its own
    // nameservers: a pod that resolves the broker's name elsewhere is not served, see
    // `sidecar::shape::resolves_broker_as_the_cluster_does`).
    let spec = pod.spec.take().unwrap_or_default();
    pod.spec = Some(PodSpec {
        host_aliases: spec.host_aliases.map(|aliases| {
            aliases
                .into_iter()
                .map(|a| k8s_openapi::api::core::v1::HostAlias {
                    hostnames: a.hostnames,
                    ip: String::new(),
                })
                .collect()
        }),
        dns_policy: spec.dns_policy,
        dns_config: spec
            .dns_config
            .map(|d| k8s_openapi::api::core::v1::PodDNSConfig {
                nameservers: d.nameservers,
                ..Default::default()
            }),
        share_process_namespace: spec.share_process_namespace,
        host_pid: spec.host_pid,
        host_ipc: spec.host_ipc,
        host_network: spec.host_network,
        security_context: spec.security_context.map(|s| PodSecurityContext {
            run_as_user: s.run_as_user,
            ..PodSecurityContext::default()
        }),
        containers: spec.containers.into_iter().map(pod_container).collect(),
        init_containers: spec
            .init_containers
            .map(|c| c.into_iter().map(pod_container).collect()),
        ephemeral_containers: spec
            .ephemeral_containers
            .map(|c| c.into_iter().map(pod_ephemeral_container).collect()),
        volumes: spec
            .volumes
            .map(|v| v.into_iter().map(pod_volume).collect()),
        ..PodSpec::default()
    });
    pod.status = None;
}

/// The metadata of a pod as [`strip_pod`] keeps it.
fn pod_meta(full: ObjectMeta) -> ObjectMeta {
    let keep = |map: Option<BTreeMap<String, String>>, key: &str| {
        map.and_then(|m| {
            m.get(key)
                .map(|v| BTreeMap::from([(key.to_string(), v.clone())]))
        })
    };
    ObjectMeta {
        name: full.name,
        namespace: full.namespace,
        uid: full.uid,
        resource_version: full.resource_version,
        deletion_timestamp: full.deletion_timestamp,
        // A trust bundle replaced later may not be what the pod mounted.
        creation_timestamp: full.creation_timestamp,
        // Spec changes while the pod was out of the watch (`controller::swaps`).
        generation: full.generation,
        labels: keep(full.labels, names::INJECT_LABEL),
        annotations: keep(full.annotations, names::PROVIDER_KEYS_ANNOTATION),
        ..ObjectMeta::default()
    }
}

/// The security settings of a container that reach the node.
fn node_security(s: Option<SecurityContext>) -> Option<SecurityContext> {
    s.map(|s| SecurityContext {
        privileged: s.privileged,
        run_as_user: s.run_as_user,
        ..SecurityContext::default()
    })
}

/// A container (or init container) as [`strip_pod`] keeps it: the sidecar's run settings
/// whole, an application container's name, image, mounts and node security.
fn pod_container(c: Container) -> Container {
    if c.name == crate::sidecar::SIDECAR_NAME {
        Container {
            // Of its resources, only the claims (a device driver's mounts and env).
            resources: c.resources.and_then(|r| {
                r.claims.map(|claims| ResourceRequirements {
                    claims: Some(claims),
                    ..ResourceRequirements::default()
                })
            }),
            ports: None,
            ..c
        }
    } else {
        Container {
            name: c.name,
            image: c.image,
            volume_mounts: c.volume_mounts,
            security_context: node_security(c.security_context),
            ..Container::default()
        }
    }
}

/// An ephemeral container as [`strip_pod`] keeps it.
fn pod_ephemeral_container(c: EphemeralContainer) -> EphemeralContainer {
    EphemeralContainer {
        name: c.name,
        image: c.image,
        target_container_name: c.target_container_name,
        volume_mounts: c.volume_mounts,
        security_context: node_security(c.security_context),
        ..EphemeralContainer::default()
    }
}

/// A volume as [`strip_pod`] keeps it.
fn pod_volume(v: Volume) -> Volume {
    Volume {
        // The sidecar's trust bundle: whose ConfigMap, mounted how.
        config_map: v
            .config_map
            .filter(|_| v.name == crate::sidecar::TRUST_VOLUME),
        name: v.name,
        host_path: v.host_path,
        empty_dir: v.empty_dir,
        projected: v.projected.map(|p| ProjectedVolumeSource {
            sources: p.sources.map(|s| {
                s.into_iter()
                    .map(|s| VolumeProjection {
                        service_account_token: s.service_account_token,
                        ..VolumeProjection::default()
                    })
                    .collect()
            }),
            ..ProjectedVolumeSource::default()
        }),
        ..Volume::default()
    }
}

/// Rewrites a source Secret to its identity, whether it is labelled as a key source, and one
/// [`Entry`] per data entry.
pub fn strip_source(secret: &mut Secret) {
    let source = names::is_key_source(secret.metadata.labels.as_ref());
    let entries: BTreeMap<String, String> = secret
        .data
        .take()
        .unwrap_or_default()
        .into_iter()
        .filter_map(|(name, value)| {
            let entry = serde_json::to_string(&Entry::of(&value.0)).ok()?;
            Some((format!("{ENTRY_PREFIX}{name}"), entry))
        })
        .collect();
    secret.string_data = None;
    identity(&mut secret.metadata);
    if source {
        secret.metadata.labels = Some(BTreeMap::from([(
            names::KEY_SOURCE_LABEL.to_string(),
            names::KEY_SOURCE_VALUE.to_string(),
        )]));
    }
    secret.metadata.annotations = Some(entries);
}

/// The cached facts about entry `name` of a source Secret rewritten by [`strip_source`].
pub fn source_entry(secret: &Secret, name: &str) -> Entry {
    secret
        .annotations()
        .get(&format!("{ENTRY_PREFIX}{name}"))
        .and_then(|json| serde_json::from_str(json).ok())
        .unwrap_or(Entry::Empty)
}

/// Rewrites a managed Secret to its metadata, the operator's own annotations (key version,
/// rotation time) and the digest of its envelope.
pub fn strip_managed(secret: &mut Secret) {
    let envelope = secret
        .data
        .take()
        .unwrap_or_default()
        .remove(names::ENVELOPE_KEY);
    secret.string_data = None;
    let annotations = secret.metadata.annotations.take();
    identity(&mut secret.metadata);
    let mut kept: BTreeMap<String, String> = annotations
        .unwrap_or_default()
        .into_iter()
        .filter(|(k, _)| k == annotations::KEY_VERSION || k == annotations::ROTATED_AT)
        .collect();
    if let Some(envelope) = envelope {
        kept.insert(ENVELOPE_DIGEST.to_string(), envelope_digest(&envelope.0));
    }
    secret.metadata.annotations = Some(kept);
}

/// The digest a stripped managed Secret carries for `envelope`.
pub fn envelope_digest(envelope: &[u8]) -> String {
    hex::encode(Sha256::digest(envelope))
}

/// The envelope digest of a managed Secret: from the cache's annotation, or computed from
/// the data of a Secret read with a GET.
pub fn managed_digest(secret: &Secret) -> Option<String> {
    if let Some(envelope) = secret
        .data
        .as_ref()
        .and_then(|d| d.get(names::ENVELOPE_KEY))
    {
        return Some(envelope_digest(&envelope.0));
    }
    secret.annotations().get(ENVELOPE_DIGEST).cloned()
}

pub use crate::envelope::Sealed;

/// An envelope opened (or found not to open) under the current keyring.
#[derive(Debug, Clone)]
pub struct Opened {
    pub digest: String,
    /// `None`: it does not authenticate for this ProviderKey under the current keyring.
    pub sealed: Option<Sealed>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;

    fn secret(data: &[(&str, &[u8])], annotations: &[(&str, &str)]) -> Secret {
        Secret {
            metadata: ObjectMeta {
                name: Some("s".into()),
                annotations: Some(
                    annotations
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
                ..Default::default()
            },
            data: Some(
                data.iter()
                    .map(|(k, v)| (k.to_string(), ByteString(v.to_vec())))
                    .collect(),
            ),
            ..Default::default()
        }
    }

    #[test]
    fn a_stripped_source_keeps_facts_and_no_key_material() {
        let key = "sk-proj-abcdefghijklmnopqrstuvwxyz0123";
        let applied = format!(r#"{{"data":{{"api-key":"{key}"}}}}"#);
        let mut s = secret(
            &[
                ("api-key", format!("{key}\n").as_bytes()),
                ("blank", b"  \n"),
                ("binary", &[0xff, 0xfe]),
            ],
            &[("kubectl.kubernetes.io/last-applied-configuration", &applied)],
        );
        strip_source(&mut s);
        let dump = format!("{s:?}");
        assert!(!dump.contains("abcdefghijklmnop"), "{dump}");
        assert_eq!(s.data, None);
        assert_eq!(
            source_entry(&s, "api-key"),
            Entry::Key {
                fingerprint: crypto::fingerprint(key.as_bytes()),
                masked_key: crypto::mask(key),
            }
        );
        assert_eq!(source_entry(&s, "blank"), Entry::Empty);
        assert_eq!(source_entry(&s, "binary"), Entry::NotText);
        assert_eq!(source_entry(&s, "missing"), Entry::Empty);
    }

    #[test]
    fn a_users_annotation_cannot_pose_as_a_cached_fact() {
        let forged = format!("{ENTRY_PREFIX}api-key");
        let mut s = secret(
            &[],
            &[(
                &forged,
                r#"{"kind":"Key","fingerprint":"x","masked_key":"y"}"#,
            )],
        );
        strip_source(&mut s);
        assert_eq!(source_entry(&s, "api-key"), Entry::Empty);

        let mut m = secret(&[], &[(ENVELOPE_DIGEST, "forged")]);
        strip_managed(&mut m);
        assert_eq!(managed_digest(&m), None);
    }

    #[test]
    fn a_stripped_managed_secret_keeps_the_envelope_digest_and_our_annotations() {
        let envelope = b"byok1.k1.ciphertext";
        let mut m = secret(
            &[(names::ENVELOPE_KEY, envelope)],
            &[(annotations::KEY_VERSION, "3"), ("someone/else", "big")],
        );
        let full_digest = managed_digest(&m);
        strip_managed(&mut m);
        assert_eq!(m.data, None);
        assert_eq!(managed_digest(&m), full_digest);
        assert_eq!(managed_digest(&m), Some(envelope_digest(envelope)));
        assert_eq!(
            m.annotations()
                .get(annotations::KEY_VERSION)
                .map(String::as_str),
            Some("3")
        );
        assert!(!m.annotations().contains_key("someone/else"));
    }
}
