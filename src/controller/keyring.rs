//! The operator keyring in the cluster: a Secret in the operator's namespace holding the
//! operator keys (see [`crate::crypto::Keyring`]).
//!
//! It is created only on a first install (no managed Secret exists yet) or by an explicit
//! `byok-operator keyring init`. A keyring that goes missing while envelopes exist is never
//! replaced: a new key could not open the old envelopes, which would then read as tampered.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use kube::runtime::watcher;

use k8s_openapi::api::core::v1::{ObjectReference, Secret};
use kube::api::{Api, ListParams, ObjectMeta, PostParams};
use kube::runtime::events::{Event, EventType};

use crate::crypto::Keyring;
use crate::names;

use super::Context;

pub const DEFAULT_KEYRING_SECRET: &str = "byok-operator-keyring";
const SECRET_TYPE: &str = "byok.dev/keyring";

#[derive(Debug, thiserror::Error)]
pub enum KeyringError {
    #[error("reading or writing keyring Secret {namespace}/{name}: {source}")]
    Api {
        namespace: String,
        name: String,
        source: kube::Error,
    },
    #[error("keyring Secret {namespace}/{name} is unusable: {source}")]
    Invalid {
        namespace: String,
        name: String,
        source: crate::crypto::CryptoError,
    },
}

/// Parses a keyring Secret.
pub fn from_secret(secret: &Secret) -> Result<Keyring, crate::crypto::CryptoError> {
    Keyring::from_secret_data(secret.data.as_ref().unwrap_or(&BTreeMap::new()))
}

fn to_secret(name: &str, keyring: &Keyring, resource_version: Option<String>) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            resource_version,
            labels: Some(names::managed_by_labels()),
            // Not a Helm object, but one adopted into a release later must survive an
            // uninstall: it is the only copy of the operator keys.
            annotations: Some([("helm.sh/resource-policy".to_string(), "keep".to_string())].into()),
            ..Default::default()
        },
        type_: Some(SECRET_TYPE.into()),
        data: Some(keyring.to_secret_data()),
        ..Default::default()
    }
}

/// Loads the keyring. When it does not exist it is created only if `create` and no managed
/// Secret exists in `managed_scope` (a first install); otherwise `None`: the operator runs,
/// and every ProviderKey says `KeyringUnavailable` until the Secret is restored or provided.
pub async fn load_or_init(
    api: &Api<Secret>,
    managed_scope: &Api<Secret>,
    name: &str,
    create: bool,
) -> Result<Option<Keyring>, KeyringError> {
    let ns = api.namespace().unwrap_or_default().to_string();
    let err = |source| KeyringError::Api {
        namespace: ns.clone(),
        name: name.to_string(),
        source,
    };
    if let Some(existing) = api.get_opt(name).await.map_err(err)? {
        return Ok(usable(&ns, name, &existing));
    }
    if !create {
        tracing::error!(
            namespace = %ns,
            secret = name,
            "the operator keyring Secret does not exist and was to be provided (--no-create-keyring); \
             create it (byok-operator keyring init, or restore it from backup)"
        );
        return Ok(None);
    }
    let managed = managed_scope
        .list_metadata(
            &ListParams::default()
                .labels(names::PROVIDERKEY_LABEL)
                .limit(1),
        )
        .await
        .map_err(err)?;
    if !managed.items.is_empty() {
        tracing::error!(
            namespace = %ns,
            secret = name,
            "the operator keyring Secret is missing but encrypted keys exist; it is not re-created (the keys could not be decrypted). Restore it from backup"
        );
        return Ok(None);
    }
    init(api, name).await.map(Some)
}

/// A keyring Secret that does not parse is reported and treated as missing.
fn usable(ns: &str, name: &str, secret: &Secret) -> Option<Keyring> {
    match from_secret(secret) {
        Ok(k) => Some(k),
        Err(e) => {
            tracing::error!(namespace = %ns, secret = name, error = %e, "the operator keyring Secret is unusable");
            None
        }
    }
}

/// Creates the keyring with a fresh key, unless it exists. Two replicas starting at once
/// both end up with the one that was created first.
pub async fn init(api: &Api<Secret>, name: &str) -> Result<Keyring, KeyringError> {
    let ns = api.namespace().unwrap_or_default().to_string();
    let err = |source| KeyringError::Api {
        namespace: ns.clone(),
        name: name.to_string(),
        source,
    };
    let invalid = |source| KeyringError::Invalid {
        namespace: ns.clone(),
        name: name.to_string(),
        source,
    };
    let keyring = Keyring::generate();
    match api
        .create(&PostParams::default(), &to_secret(name, &keyring, None))
        .await
    {
        Ok(_) => {
            tracing::info!(
                secret = name,
                key_id = keyring.active_id(),
                "created the operator keyring"
            );
            Ok(keyring)
        }
        Err(kube::Error::Api(status)) if status.code == 409 => {
            let existing = api.get(name).await.map_err(err)?;
            from_secret(&existing).map_err(invalid)
        }
        Err(e) => Err(err(e)),
    }
}

/// The keyring Secret as an Event's subject (it may not exist).
pub fn reference(namespace: &str, name: &str) -> ObjectReference {
    ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Secret".into()),
        namespace: Some(namespace.into()),
        name: Some(name.into()),
        ..Default::default()
    }
}

/// A Warning Event naming the missing keyring Secret.
pub async fn report_missing(recorder: &super::events::Publisher, keyring: &ObjectReference) {
    let event = Event {
        type_: EventType::Warning,
        reason: crate::reason::Reason::KeyringUnavailable.as_str().into(),
        note: Some(format!(
            "the operator keyring Secret {}/{} is missing or unusable while encrypted keys exist; it is not re-created. Restore it from backup",
            keyring.namespace.as_deref().unwrap_or_default(),
            keyring.name.as_deref().unwrap_or_default()
        )),
        action: "LoadKeyring".into(),
        secondary: None,
    };
    if let Err(e) = recorder.publish(&event, keyring).await {
        tracing::warn!(error = %e, "could not publish an event");
    }
}

/// Adds a new operator key and makes it active; the controller then re-encrypts every managed
/// Secret with it. Uses the resourceVersion as a precondition, so concurrent rotations cannot
/// lose a key. Returns the new key id.
pub async fn rotate(api: &Api<Secret>, name: &str) -> Result<String, KeyringError> {
    let ns = api.namespace().unwrap_or_default().to_string();
    let err = |source| KeyringError::Api {
        namespace: ns.clone(),
        name: name.to_string(),
        source,
    };
    let existing = api.get(name).await.map_err(err)?;
    let mut keyring = from_secret(&existing).map_err(|source| KeyringError::Invalid {
        namespace: ns.clone(),
        name: name.to_string(),
        source,
    })?;
    let id = keyring.rotate();
    let updated = to_secret(name, &keyring, existing.metadata.resource_version.clone());
    api.replace(name, &PostParams::default(), &updated)
        .await
        .map_err(err)?;
    tracing::info!(secret = name, key_id = %id, "rotated the operator key");
    Ok(id)
}

/// How `byok_keyring_available` names the keyring Secret: `namespace/name`.
pub fn metric_label(keyring: &ObjectReference) -> String {
    format!(
        "{}/{}",
        keyring.namespace.as_deref().unwrap_or_default(),
        keyring.name.as_deref().unwrap_or_default()
    )
}

/// The keyring Secret, watched: each item is a change that every ProviderKey must see (a new
/// active key, the keyring lost or restored). The context's keyring follows the Secret, and
/// a lost one is reported on the Secret's Events and in `byok_keyring_available`.
pub fn changes(
    api: Api<Secret>,
    ctx: Arc<Context>,
    keyring_ref: ObjectReference,
) -> impl Stream<Item = ()> + Send {
    let secret_name = keyring_ref.name.clone().unwrap_or_default();
    let keyring_label = metric_label(&keyring_ref);
    watcher(
        api,
        watcher::Config::default().fields(&format!("metadata.name={secret_name}")),
    )
    .scan(false, move |seen, event| {
        let ctx = ctx.clone();
        let keyring_ref = keyring_ref.clone();
        let keyring_label = keyring_label.clone();
        let next = match event {
            Ok(watcher::Event::Init) => {
                *seen = false;
                None
            }
            Ok(watcher::Event::InitApply(secret) | watcher::Event::Apply(secret)) => {
                *seen = true;
                Some(from_secret(&secret).map_err(|e| e.to_string()))
            }
            Ok(watcher::Event::InitDone) if !*seen => Some(Err("the Secret does not exist".to_string())),
            Ok(watcher::Event::InitDone) => None,
            Ok(watcher::Event::Delete(_)) => {
                *seen = false;
                Some(Err("the Secret was deleted".to_string()))
            }
            Err(e) => {
                tracing::warn!(error = %e, "watching the keyring Secret");
                None
            }
        };
        async move {
            let Some(next) = next else {
                return Some(None);
            };
            let before = ctx.keyring().map(|k| k.active_id().to_string());
            match next {
                Ok(keyring) => {
                    let changed = before.as_deref() != Some(keyring.active_id());
                    ctx.set_keyring(Some(keyring));
                    ctx.metrics.set_keyring_available(&keyring_label, true);
                    ctx.metrics.keyring_loaded();
                    if changed && before.is_none() {
                        tracing::info!(secret = %keyring_ref.name.clone().unwrap_or_default(), "the operator keyring is available again");
                    }
                    Some(changed.then_some(()))
                }
                Err(why) => {
                    tracing::error!(
                        namespace = %keyring_ref.namespace.clone().unwrap_or_default(),
                        secret = %keyring_ref.name.clone().unwrap_or_default(),
                        problem = %why,
                        "the operator keyring is unavailable; ProviderKeys report KeyringUnavailable until it is restored"
                    );
                    ctx.set_keyring(None);
                    ctx.metrics.set_keyring_available(&keyring_label, false);
                    report_missing(&ctx.recorder, &keyring_ref).await;
                    Some(before.is_some().then_some(()))
                }
            }
        }
    })
    .filter_map(futures::future::ready)
}
