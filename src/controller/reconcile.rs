//! One reconcile of a ProviderKey, as a pipeline: read (IO) -> plan (pure, [`super::plan`]) ->
//! verify (IO, only when the plan says so) -> decide (pure) -> apply Secret and status (IO,
//! server-side apply) -> events.

use std::collections::BTreeMap;
use std::sync::Arc;

use jiff::Timestamp;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, ObjectMeta, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::runtime::finalizer::{self, finalizer};
use kube::{Resource, ResourceExt};
use secrecy::{ExposeSecret, SecretString};

use super::plan::{self, InService, Observed, SecretWrite, Source, Target, Verified};
use super::{Context, Error, FIELD_MANAGER, FINALIZER};
use crate::crd::{DEFAULT_AZURE_API_VERSION, ProviderKey, ProviderKeySpec};
use crate::crypto;
use crate::providers::ProviderParams;
use crate::reason::Reason;

/// The managed Secret's single data entry: the envelope (see [`crate::crypto`]).
pub const ENVELOPE_KEY: &str = "key.enc";
pub const MANAGED_SECRET_TYPE: &str = "byok.dev/encrypted-key";
pub const MANAGED_BY_LABEL: (&str, &str) = ("app.kubernetes.io/managed-by", "byok-operator");
pub const PROVIDERKEY_LABEL: &str = "byok.dev/providerkey";

/// Non-secret facts about the key in service, kept on the managed Secret itself so the
/// status can always be rebuilt from what is actually stored.
pub mod annotations {
    pub const FINGERPRINT: &str = "byok.dev/fingerprint";
    pub const MASKED_KEY: &str = "byok.dev/masked-key";
    pub const KEY_VERSION: &str = "byok.dev/key-version";
    pub const ENCRYPTION_KEY_ID: &str = "byok.dev/encryption-key-id";
    pub const ROTATED_AT: &str = "byok.dev/rotated-at";
    pub const PROVIDER: &str = "byok.dev/provider";
}

pub async fn reconcile(pk: Arc<ProviderKey>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = pk.namespace().ok_or(Error::MissingNamespace)?;
    let api: Api<ProviderKey> = Api::namespaced(ctx.client.clone(), &ns);
    finalizer(&api, FINALIZER, pk, |event| async {
        match event {
            finalizer::Event::Apply(pk) => apply(&pk, &ctx).await,
            finalizer::Event::Cleanup(pk) => cleanup(&pk, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)))
}

/// The source key, read from the referenced Secret. Surrounding whitespace (a trailing newline
/// from `kubectl create secret --from-file`, say) is not part of any provider's key.
fn read_source(
    secret: Option<&Secret>,
    spec: &ProviderKeySpec,
) -> Result<SecretString, (Reason, String)> {
    let name = &spec.secret_ref.name;
    let key = &spec.secret_ref.key;
    let Some(secret) = secret else {
        return Err((
            Reason::SecretNotFound,
            format!("Secret {name} not found in this namespace"),
        ));
    };
    let bytes = secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|b| b.0.as_slice())
        .unwrap_or_default();
    let Ok(text) = std::str::from_utf8(bytes) else {
        return Err((
            Reason::InvalidSpec,
            format!("entry {key} of Secret {name} is not UTF-8 text"),
        ));
    };
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err((
            Reason::SecretKeyMissing,
            format!("Secret {name} has no non-empty entry {key}"),
        ));
    }
    Ok(SecretString::from(trimmed.to_string()))
}

fn in_service_from(secret: &Secret) -> Option<InService> {
    let a = secret.metadata.annotations.as_ref()?;
    Some(InService {
        fingerprint: a.get(annotations::FINGERPRINT)?.clone(),
        masked_key: a.get(annotations::MASKED_KEY)?.clone(),
        key_version: a.get(annotations::KEY_VERSION)?.parse().ok()?,
        encryption_key_id: a.get(annotations::ENCRYPTION_KEY_ID)?.clone(),
        rotated_at: a
            .get(annotations::ROTATED_AT)
            .and_then(|t| t.parse::<Timestamp>().ok())
            .map(Time),
    })
}

fn provider_params(spec: &ProviderKeySpec) -> Result<ProviderParams, String> {
    let base_url = match &spec.base_url {
        Some(u) => {
            Some(url::Url::parse(u).map_err(|_| "spec.baseURL is not a valid URL".to_string())?)
        }
        None => None,
    };
    Ok(ProviderParams {
        base_url,
        azure_api_version: Some(
            spec.azure
                .as_ref()
                .map_or(DEFAULT_AZURE_API_VERSION.to_string(), |a| {
                    a.api_version.clone()
                }),
        ),
        vertex_project: spec.vertex.as_ref().and_then(|v| v.project.clone()),
        vertex_location: spec.vertex.as_ref().map(|v| v.location.clone()),
    })
}

async fn apply(pk: &ProviderKey, ctx: &Context) -> Result<Action, Error> {
    let ns = pk.namespace().ok_or(Error::MissingNamespace)?;
    let name = pk.name_any();
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let keyring = ctx.keyring().ok_or(Error::KeyringUnavailable)?;

    // Read.
    let source_secret = secrets.get_opt(&pk.spec.secret_ref.name).await?;
    let source_key = read_source(source_secret.as_ref(), &pk.spec);
    let managed_name = pk.managed_secret_name();
    let managed = secrets.get_opt(&managed_name).await?;
    let in_service = managed.as_ref().and_then(in_service_from);
    let source = match &source_key {
        Ok(key) => Source::Present {
            fingerprint: crypto::fingerprint(key.expose_secret().as_bytes()),
            masked_key: crypto::mask(key.expose_secret()),
        },
        Err((reason, message)) => Source::Unusable {
            reason: *reason,
            message: message.clone(),
        },
    };
    let observed = Observed {
        generation: pk.metadata.generation,
        status: pk.status.clone().unwrap_or_default(),
        source,
        in_service,
        active_key_id: keyring.active_id().to_string(),
        // reported as InvalidSpec by the controller (in progress)
        interval: plan::effective_interval(pk.spec.verification.as_ref()).unwrap_or(None),
        now: Time(Timestamp::now()),
    };

    // Verify, only when the plan says so.
    let target = plan::verification_target(&observed);
    let verified = match target {
        None => None,
        Some(target) => {
            let key = match (target, &source_key, &managed) {
                (Target::Source, Ok(key), _) => Some(key.clone()),
                (Target::InService, _, Some(m)) => Some(decrypt_managed(&keyring, &ns, &name, m)?),
                _ => None,
            };
            match key {
                Some(key) => Some(verify(pk, ctx, &key).await),
                None => None,
            }
        }
    };
    let desired = plan::decide(&observed, target, verified.as_ref());

    // Apply: the managed Secret first, so the status never claims what is not stored.
    let plaintext = match (&desired.secret, &source_key, &managed) {
        (SecretWrite::Keep, _, _) => None,
        (SecretWrite::PutSourceKey { .. }, Ok(key), _) => Some(key.clone()),
        (SecretWrite::ReEncrypt, _, Some(m)) => Some(decrypt_managed(&keyring, &ns, &name, m)?),
        _ => None,
    };
    if let Some(plaintext) = plaintext {
        let envelope = keyring.encrypt(&ns, &name, plaintext.expose_secret().as_bytes())?;
        let secret = managed_secret(pk, &managed_name, &desired.status, envelope)?;
        secrets
            .patch(
                &managed_name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&secret),
            )
            .await?;
        let kind = if desired.secret == SecretWrite::ReEncrypt {
            "reencrypt"
        } else {
            "put"
        };
        ctx.metrics.secret_written(kind);
    }
    let mut status = desired.status.clone();
    status.managed_secret_name = status.fingerprint.as_ref().map(|_| managed_name.clone());
    if pk.status.as_ref() != Some(&status) {
        let api: Api<ProviderKey> = Api::namespaced(ctx.client.clone(), &ns);
        let patch = serde_json::json!({
            "apiVersion": ProviderKey::api_version(&()),
            "kind": ProviderKey::kind(&()),
            "status": status,
        });
        api.patch_status(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await?;
    }

    for note in &desired.events {
        let event = Event {
            type_: if note.warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: note.reason.to_string(),
            note: Some(note.note.clone()),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(e) = ctx.recorder.publish(&event, &pk.object_ref(&())).await {
            tracing::warn!(error = %e, "could not publish an event");
        }
    }

    let object = kube::runtime::reflector::ObjectRef::from_obj(pk);
    if desired.transient {
        let delay = ctx.backoff.next_delay(&object);
        tracing::info!(providerkey = %object, retry_in = ?delay, "transient verification failure; backing off");
        return Ok(Action::requeue(delay));
    }
    ctx.backoff.reset(&object);
    Ok(desired
        .requeue_after
        .map_or_else(Action::await_change, Action::requeue))
}

async fn verify(pk: &ProviderKey, ctx: &Context, key: &SecretString) -> Verified {
    let started = std::time::Instant::now();
    let outcome = match provider_params(&pk.spec) {
        Ok(params) => ctx.verifier.verify(pk.spec.provider, key, &params).await,
        Err(message) => crate::providers::Verification::invalid_spec(message),
    };
    ctx.metrics
        .verification(pk.spec.provider, outcome.reason, started.elapsed());
    tracing::debug!(
        providerkey = %pk.name_any(),
        namespace = pk.namespace().unwrap_or_default(),
        provider = %pk.spec.provider,
        reason = %outcome.reason,
        "verified"
    );
    Verified {
        reason: outcome.reason,
        message: outcome.message,
    }
}

fn decrypt_managed(
    keyring: &crypto::Keyring,
    ns: &str,
    name: &str,
    managed: &Secret,
) -> Result<SecretString, Error> {
    let envelope = managed
        .data
        .as_ref()
        .and_then(|d| d.get(ENVELOPE_KEY))
        .map(|b| b.0.as_slice())
        .unwrap_or_default();
    let plaintext = keyring.decrypt(ns, name, envelope)?;
    let text =
        std::str::from_utf8(plaintext.expose_secret()).map_err(|_| Error::CorruptManagedSecret)?;
    Ok(SecretString::from(text.to_string()))
}

fn managed_secret(
    pk: &ProviderKey,
    name: &str,
    status: &crate::crd::ProviderKeyStatus,
    envelope: Vec<u8>,
) -> Result<Secret, Error> {
    let owner = pk
        .controller_owner_ref(&())
        .ok_or(Error::MissingNamespace)?;
    let mut annotations = BTreeMap::new();
    let facts = [
        (annotations::FINGERPRINT, status.fingerprint.clone()),
        (annotations::MASKED_KEY, status.masked_key.clone()),
        (
            annotations::KEY_VERSION,
            status.key_version.map(|v| v.to_string()),
        ),
        (
            annotations::ENCRYPTION_KEY_ID,
            status.encryption_key_id.clone(),
        ),
        (
            annotations::ROTATED_AT,
            status.last_rotation_time.as_ref().map(|t| t.0.to_string()),
        ),
        (annotations::PROVIDER, Some(pk.spec.provider.to_string())),
    ];
    for (k, v) in facts {
        annotations.insert(
            k.to_string(),
            v.ok_or(Error::Internal("managed Secret facts incomplete"))?,
        );
    }
    Ok(Secret {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: pk.namespace(),
            labels: Some(BTreeMap::from([
                (
                    MANAGED_BY_LABEL.0.to_string(),
                    MANAGED_BY_LABEL.1.to_string(),
                ),
                (PROVIDERKEY_LABEL.to_string(), pk.name_any()),
            ])),
            annotations: Some(annotations),
            owner_references: Some(vec![owner]),
            ..Default::default()
        },
        type_: Some(MANAGED_SECRET_TYPE.into()),
        data: Some(BTreeMap::from([(
            ENVELOPE_KEY.to_string(),
            ByteString(envelope),
        )])),
        ..Default::default()
    })
}

/// Deletion: hard-delete the managed Secret (not left to garbage collection, which may lag or
/// be absent) and say so.
async fn cleanup(pk: &ProviderKey, ctx: &Context) -> Result<Action, Error> {
    let ns = pk.namespace().ok_or(Error::MissingNamespace)?;
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let managed_name = pk.managed_secret_name();
    match secrets.delete(&managed_name, &Default::default()).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 404 => {}
        Err(e) => return Err(e.into()),
    }
    let event = Event {
        type_: EventType::Normal,
        reason: "Deleted".into(),
        note: Some(format!(
            "managed Secret {managed_name} deleted; the key is no longer served"
        )),
        action: "Delete".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &pk.object_ref(&())).await {
        tracing::warn!(error = %e, "could not publish an event");
    }
    ctx.backoff
        .reset(&kube::runtime::reflector::ObjectRef::from_obj(pk));
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ProviderKeySpec {
        serde_json::from_value(
            serde_json::json!({"provider": "openai", "secretRef": {"name": "raw"}}),
        )
        .expect("spec")
    }

    fn secret(entries: &[(&str, &[u8])]) -> Secret {
        Secret {
            data: Some(
                entries
                    .iter()
                    .map(|(k, v)| (k.to_string(), ByteString(v.to_vec())))
                    .collect(),
            ),
            ..Default::default()
        }
    }

    #[test]
    fn source_key_problems_have_typed_reasons() {
        assert_eq!(
            read_source(None, &spec()).err().map(|e| e.0),
            Some(Reason::SecretNotFound)
        );
        let other = secret(&[("token", b"sk-x")]);
        assert_eq!(
            read_source(Some(&other), &spec()).err().map(|e| e.0),
            Some(Reason::SecretKeyMissing)
        );
        let blank = secret(&[("api-key", b" \n")]);
        assert_eq!(
            read_source(Some(&blank), &spec()).err().map(|e| e.0),
            Some(Reason::SecretKeyMissing)
        );
        let binary = secret(&[("api-key", &[0xff, 0xfe])]);
        assert_eq!(
            read_source(Some(&binary), &spec()).err().map(|e| e.0),
            Some(Reason::InvalidSpec)
        );
    }

    #[test]
    fn a_trailing_newline_is_not_part_of_the_key() {
        let s = secret(&[("api-key", b"sk-test-1234567890\n")]);
        let key = read_source(Some(&s), &spec()).expect("key");
        assert_eq!(key.expose_secret(), "sk-test-1234567890");
    }
}
