//! One reconcile of a ProviderKey, as a pipeline: read (IO) -> plan (pure, [`super::plan`]) ->
//! verify (IO, only when the plan says so) -> decide (pure) -> write the managed Secret, then
//! the status (IO) -> Events.
//!
//! Trust rules kept here (see the security model in the README):
//! - only Secrets labelled `byok.dev/key-source: "true"` are read as sources; for any other,
//!   only metadata is fetched, to say so;
//! - a Secret this ProviderKey did not create is never updated or deleted; deletes carry a
//!   UID precondition, updates a resourceVersion;
//! - every object the API server can store reaches a typed reason, even one that does not
//!   deserialise.

use std::collections::BTreeMap;
use std::sync::Arc;

use jiff::Timestamp;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ObjectReference, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::core::DeserializeGuard;
use kube::core::error_boundary::InvalidObject;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use secrecy::{ExposeSecret, SecretString};

use super::plan::{
    self, EventNote, InService, Managed, Next, Observed, SecretWrite, Source, Target,
};
use super::{Context, Error, cache};
use crate::crd::{ProviderKey, ProviderKeySpec};
use crate::crypto::{self, Keyring};
use crate::names::{self, FIELD_MANAGER, FINALIZER, annotations};
use crate::reason::Reason;
use crate::status::{self, Decided, Status, types};

pub async fn reconcile(
    obj: Arc<DeserializeGuard<ProviderKey>>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    match &obj.0 {
        Ok(pk) => {
            let pk = ctx.fresher(pk);
            if pk.meta().deletion_timestamp.is_some() {
                cleanup(&pk.metadata, &ctx).await
            } else {
                let pk = ensure_finalizer(pk, &ctx).await?;
                apply(&pk, &ctx).await
            }
        }
        Err(invalid) => reconcile_invalid(invalid, &ctx).await,
    }
}

fn namespace(meta: &ObjectMeta) -> Result<String, Error> {
    meta.namespace.clone().ok_or(Error::MissingNamespace)
}

/// Adds the finalizer before anything is written, so the managed Secret can never outlive its
/// ProviderKey. The resourceVersion test makes a stale cache fail instead of duplicating it.
async fn ensure_finalizer(pk: ProviderKey, ctx: &Context) -> Result<ProviderKey, Error> {
    if pk.finalizers().iter().any(|f| f == FINALIZER) {
        return Ok(pk);
    }
    let ns = namespace(&pk.metadata)?;
    let api: Api<ProviderKey> = Api::namespaced(ctx.client.clone(), &ns);
    let ops = if pk.metadata.finalizers.is_some() {
        serde_json::json!([
            {"op": "test", "path": "/metadata/resourceVersion", "value": pk.resource_version()},
            {"op": "add", "path": "/metadata/finalizers/-", "value": FINALIZER},
        ])
    } else {
        serde_json::json!([
            {"op": "test", "path": "/metadata/resourceVersion", "value": pk.resource_version()},
            {"op": "add", "path": "/metadata/finalizers", "value": [FINALIZER]},
        ])
    };
    let updated = api
        .patch(&pk.name_any(), &PatchParams::default(), &json_patch(ops)?)
        .await?;
    ctx.remember(&pk, &updated);
    Ok(updated)
}

/// A JSON patch from its operations; the `test` ops make it fail instead of acting on an
/// object that changed since it was judged.
fn json_patch(ops: serde_json::Value) -> Result<Patch<()>, Error> {
    serde_json::from_value::<json_patch::Patch>(ops)
        .map(Patch::Json)
        .map_err(|_| Error::Internal("a JSON patch that does not parse"))
}

async fn remove_finalizer(meta: &ObjectMeta, ctx: &Context) -> Result<(), Error> {
    let ns = namespace(meta)?;
    let Some(index) = meta
        .finalizers
        .iter()
        .flatten()
        .position(|f| f == FINALIZER)
    else {
        return Ok(());
    };
    let path = format!("/metadata/finalizers/{index}");
    let patch = json_patch(serde_json::json!([
        {"op": "test", "path": path, "value": FINALIZER},
        {"op": "remove", "path": path},
    ]))?;
    let api: Api<DeserializeGuard<ProviderKey>> = Api::namespaced(ctx.client.clone(), &ns);
    match api
        .patch(
            meta.name.as_deref().unwrap_or_default(),
            &PatchParams::default(),
            &patch,
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// An object the API server stored but our types cannot read (for example one stored through
/// an older, looser CRD). It gets `InvalidSpec` on its own status; nothing else is affected.
async fn reconcile_invalid(invalid: &InvalidObject, ctx: &Context) -> Result<Action, Error> {
    let meta = &invalid.metadata;
    if meta.deletion_timestamp.is_some() {
        return cleanup(meta, ctx).await;
    }
    let ns = namespace(meta)?;
    let name = meta.name.clone().unwrap_or_default();
    let key = (meta.uid.clone().unwrap_or_default(), meta.generation);
    if ctx.invalid_reported(&key) {
        return Ok(Action::await_change());
    }
    let detail = invalid_field(ctx, &ns, &name)
        .await
        .unwrap_or_else(|| invalid.error.clone());
    let detail: String = detail.chars().take(200).collect();
    let message = format!("the object does not match the ProviderKey API: {detail}");
    let now = Time(Timestamp::now());
    let ready = Decided::new(
        types::READY,
        Status::False,
        Reason::InvalidSpec.as_str(),
        &message,
    );
    let status = crate::crd::ProviderKeyStatus {
        observed_generation: meta.generation,
        conditions: status::merge(&[], &[ready], meta.generation, &now),
        ..Default::default()
    };
    // The Event first: the API server may refuse even a status write for an object whose
    // stored spec no longer matches the schema's types.
    publish(
        ctx,
        &reference(meta),
        &EventNote {
            reason: plan::EventReason::Failed(Reason::InvalidSpec),
            note: message,
        },
    )
    .await;
    let api: Api<DeserializeGuard<ProviderKey>> = Api::namespaced(ctx.client.clone(), &ns);
    // A merge patch, not server-side apply: apply must type the live object against the
    // schema, which is exactly what this object fails.
    let written = api
        .patch_status(
            &name,
            &PatchParams::default(),
            &Patch::Merge(&serde_json::json!({ "status": status })),
        )
        .await;
    match written {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 422 => {
            tracing::warn!(
                providerkey = %name,
                namespace = %ns,
                "the API server refuses status writes for this object (its stored spec no \
                 longer matches the schema); reported by Event only"
            );
        }
        Err(e) => return Err(e.into()),
    }
    ctx.mark_invalid_reported(key);
    Ok(Action::await_change())
}

/// Which field makes the object unreadable, and why (serde alone does not say where). One
/// GET per undeserialisable generation.
async fn invalid_field(ctx: &Context, ns: &str, name: &str) -> Option<String> {
    let resource = kube::core::ApiResource::erase::<ProviderKey>(&());
    let api: Api<kube::core::DynamicObject> =
        Api::namespaced_with(ctx.client.clone(), ns, &resource);
    let raw = serde_json::to_value(api.get(name).await.ok()?).ok()?;
    match serde_path_to_error::deserialize::<_, ProviderKey>(raw) {
        Ok(_) => None,
        Err(e) => Some(format!("{}: {}", e.path(), e.inner())),
    }
}

fn status_patch(status: &crate::crd::ProviderKeyStatus) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": ProviderKey::api_version(&()),
        "kind": ProviderKey::kind(&()),
        "status": status,
    })
}

fn reference(meta: &ObjectMeta) -> ObjectReference {
    ObjectReference {
        api_version: Some(ProviderKey::api_version(&()).into()),
        kind: Some(ProviderKey::kind(&()).into()),
        name: meta.name.clone(),
        namespace: meta.namespace.clone(),
        uid: meta.uid.clone(),
        resource_version: meta.resource_version.clone(),
        ..Default::default()
    }
}

/// The one way Events are published. A failure to publish is logged, never fatal.
pub(crate) async fn publish(ctx: &Context, regarding: &ObjectReference, note: &EventNote) {
    let event = Event {
        type_: if note.reason.is_warning() {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: note.reason.as_str().to_string(),
        note: Some(note.note.clone()),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, regarding).await {
        tracing::warn!(error = %e, "could not publish an event");
    }
}

/// The source Secret's entry as decisions see it, from the cache of labelled Secrets. For a
/// Secret outside that cache only metadata is fetched, to say why it is not used; one that is
/// labelled but not cached yet is read now (and its key kept for this reconcile).
async fn observe_source(
    ctx: &Context,
    secrets: &Api<Secret>,
    ns: &str,
    spec: &ProviderKeySpec,
) -> Result<(Source, Option<SecretString>), Error> {
    let name = &spec.secret_ref.name;
    if let Some(cached) = ctx.sources.get(&ObjectRef::<Secret>::new(name).within(ns)) {
        if !names::is_key_source(cached.metadata.labels.as_ref()) {
            return Ok((unusable(not_labelled(name, ns)), None));
        }
        let entry = cache::source_entry(&cached, &spec.secret_ref.key);
        return Ok((source_of_entry(entry, spec), None));
    }
    match secrets.get_metadata_opt(name).await? {
        None => Ok((unusable(not_found(name)), None)),
        Some(meta) if !names::is_key_source(meta.metadata.labels.as_ref()) => {
            Ok((unusable(not_labelled(name, ns)), None))
        }
        Some(_) => fetch_source(secrets, ns, spec).await,
    }
}

/// The source key itself, with a GET: only when a verification or a write needs it.
async fn fetch_source(
    secrets: &Api<Secret>,
    ns: &str,
    spec: &ProviderKeySpec,
) -> Result<(Source, Option<SecretString>), Error> {
    let name = &spec.secret_ref.name;
    Ok(match secrets.get_opt(name).await? {
        None => (unusable(not_found(name)), None),
        Some(s) if !names::is_key_source(s.metadata.labels.as_ref()) => {
            (unusable(not_labelled(name, ns)), None)
        }
        Some(s) => source_from(&s, spec),
    })
}

fn unusable((reason, message): (Reason, String)) -> Source {
    Source::Unusable { reason, message }
}

fn not_found(name: &str) -> (Reason, String) {
    (
        Reason::SecretNotFound,
        format!("Secret {name} not found in this namespace"),
    )
}

fn not_labelled(name: &str, ns: &str) -> (Reason, String) {
    (
        Reason::SecretNotLabelled,
        format!(
            "Secret {name} is not labelled as a key source, so the operator does not read it; \
             to use it: kubectl label secret {name} -n {ns} {}={}",
            names::KEY_SOURCE_LABEL,
            names::KEY_SOURCE_VALUE
        ),
    )
}

/// What decisions see of a source entry; `spec` names the Secret and entry in messages.
fn source_of_entry(entry: cache::Entry, spec: &ProviderKeySpec) -> Source {
    let name = &spec.secret_ref.name;
    let key = &spec.secret_ref.key;
    match entry {
        cache::Entry::Key {
            fingerprint,
            masked_key,
        } => Source::Present {
            fingerprint,
            masked_key,
        },
        cache::Entry::NotText => unusable((
            Reason::InvalidSpec,
            format!("entry {key} of Secret {name} is not UTF-8 text"),
        )),
        cache::Entry::Empty => unusable((
            Reason::SecretKeyMissing,
            format!("Secret {name} has no non-empty entry {key}"),
        )),
    }
}

/// What a source Secret holds in entry `spec.secretRef.key`, and the key itself when it is
/// usable. Surrounding whitespace (a trailing newline from `kubectl create secret
/// --from-file`) is not part of any provider's key.
fn source_from(secret: &Secret, spec: &ProviderKeySpec) -> (Source, Option<SecretString>) {
    let bytes = secret
        .data
        .as_ref()
        .and_then(|d| d.get(&spec.secret_ref.key))
        .map(|b| b.0.as_slice())
        .unwrap_or_default();
    let source = source_of_entry(cache::Entry::of(bytes), spec);
    let key = matches!(source, Source::Present { .. }).then(|| {
        let text = std::str::from_utf8(bytes)
            .map(str::trim)
            .unwrap_or_default();
        SecretString::from(text.to_string())
    });
    (source, key)
}

#[cfg(test)]
fn key_from_source(
    secret: &Secret,
    spec: &ProviderKeySpec,
) -> Result<SecretString, (Reason, String)> {
    match source_from(secret, spec) {
        (_, Some(key)) => Ok(key),
        (Source::Unusable { reason, message }, None) => Err((reason, message)),
        (Source::Present { .. }, None) => Err((Reason::InvalidSpec, String::new())),
    }
}

/// Whose a Secret named `<name>-byok` is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ownership {
    /// Created by this ProviderKey (its ownerReference carries this UID).
    Ours,
    /// Restored from a backup or re-created by GitOps: a managed Secret whose only owner is a
    /// same-named ProviderKey that no longer exists. Adopted if its envelope authenticates
    /// under this namespace/name.
    Restored,
    /// Anything else: never touched.
    Foreign,
}

/// Pure: who owns `secret`, from its type and ownerReferences.
pub fn ownership(secret: &Secret, pk_name: &str, pk_uid: &str) -> Ownership {
    if secret.type_.as_deref() != Some(names::MANAGED_SECRET_TYPE) {
        return Ownership::Foreign;
    }
    let refs = secret
        .metadata
        .owner_references
        .as_deref()
        .unwrap_or_default();
    let is_providerkey = |r: &k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference| {
        r.kind == ProviderKey::kind(&())
            && r.api_version.split('/').next() == Some(ProviderKey::group(&()).as_ref())
    };
    if !pk_uid.is_empty() && refs.iter().any(|r| r.uid == pk_uid && is_providerkey(r)) {
        return Ownership::Ours;
    }
    match refs {
        [only] if is_providerkey(only) && only.name == pk_name => Ownership::Restored,
        _ => Ownership::Foreign,
    }
}

/// A time as the API server stores it (`metav1.Time` has whole seconds). The managed Secret
/// records the exact instant; the status built from it must not differ from the status read
/// back in the nanoseconds, or every reconcile rewrites it.
fn whole_seconds(t: Timestamp) -> Time {
    Time(Timestamp::from_second(t.as_second()).unwrap_or(t))
}

/// The key in service: what its envelope seals, with the version and rotation time the
/// managed Secret's annotations record.
fn in_service(secret: &Secret, sealed: cache::Sealed) -> InService {
    let a = secret.annotations();
    InService {
        fingerprint: sealed.fingerprint,
        masked_key: sealed.masked_key,
        key_version: a
            .get(annotations::KEY_VERSION)
            .and_then(|v| v.parse().ok())
            .unwrap_or(1),
        encryption_key_id: sealed.encryption_key_id,
        rotated_at: a
            .get(annotations::ROTATED_AT)
            .and_then(|t| t.parse::<Timestamp>().ok())
            .map(whole_seconds),
        origin: sealed.origin,
    }
}

/// The host of a `scheme://host:port` origin: what the per-host limiter counts by.
fn origin_host(origin: &str) -> Option<String> {
    url::Url::parse(origin).ok()?.host_str().map(str::to_string)
}

/// Where the key would go now, or why it may go nowhere (no connection is attempted).
fn destination(pk: &ProviderKey, ctx: &Context) -> Result<String, plan::Verified> {
    let refused = |v: crate::providers::Verification| plan::Verified {
        reason: v.reason,
        message: v.message,
    };
    let params = pk.spec.provider_params().map_err(|m| plan::Verified {
        reason: Reason::InvalidSpec,
        message: m,
    })?;
    let base = ctx
        .verifier
        .resolve_base_url(pk.spec.provider, &params)
        .map_err(refused)?;
    Ok(crate::providers::origin(&base))
}

/// The plaintexts one reconcile may need; each [`SecretWrite`] names exactly one of them.
struct Keys {
    source: Option<SecretString>,
    in_service: Option<SecretString>,
}

impl Keys {
    fn for_write(&self, write: &SecretWrite) -> Result<Option<&SecretString>, Error> {
        match write {
            SecretWrite::Keep => Ok(None),
            SecretWrite::PutSourceKey { .. } => self
                .source
                .as_ref()
                .map(Some)
                .ok_or(Error::Internal("plan put a source key that was not read")),
            SecretWrite::ReEncrypt => self
                .in_service
                .as_ref()
                .map(Some)
                .ok_or(Error::Internal("plan re-encrypts a key that was not read")),
        }
    }

    fn for_target(&self, target: Target) -> Option<&SecretString> {
        match target {
            Target::Source => self.source.as_ref(),
            Target::InService => self.in_service.as_ref(),
        }
    }
}

/// The managed Secret as decisions see it, and the copy that was judged (its resourceVersion
/// is the one a write must match).
struct ManagedView {
    managed: Managed,
    secret: Option<Arc<Secret>>,
}

/// Judges the managed Secret from the cache when its envelope was opened before; otherwise
/// reads it (one GET) and opens the envelope, keeping the key for this reconcile.
async fn observe_managed(
    pk: &ProviderKey,
    ctx: &Context,
    secrets: &Api<Secret>,
    keyring: Option<&Keyring>,
    keys: &mut Keys,
) -> Result<ManagedView, Error> {
    let ns = namespace(&pk.metadata)?;
    let name = pk.name_any();
    let uid = pk.uid().unwrap_or_default();
    let oref = ObjectRef::<Secret>::new(&names::managed_secret_name(&name)).within(&ns);
    // The cached copy serves only if its envelope was opened before; else the API server knows
    // (not cached yet, cached before our last write, or never opened).
    let cached = ctx.managed.get(&oref).and_then(|secret| {
        let opened = ctx.opened(&oref, cache::managed_digest(&secret).as_deref())?;
        Some((secret, Some(opened)))
    });
    let (secret, opened) = match cached {
        Some(found) => found,
        None => match secrets.get_opt(&oref.name).await? {
            Some(secret) => {
                let opened = ctx.opened(&oref, cache::managed_digest(&secret).as_deref());
                (Arc::new(secret), opened)
            }
            None => {
                ctx.forget_opened(&oref);
                return Ok(ManagedView {
                    managed: Managed::Absent,
                    secret: None,
                });
            }
        },
    };
    let owned = ownership(&secret, &name, &uid);
    if owned == Ownership::Foreign {
        return Ok(ManagedView {
            managed: Managed::Conflict,
            secret: Some(secret),
        });
    }
    let Some(keyring) = keyring else {
        // Without a keyring nothing can be judged; the plan stops on that first.
        return Ok(ManagedView {
            managed: Managed::Undecryptable,
            secret: Some(secret),
        });
    };
    let sealed = match opened {
        Some(opened) => opened.sealed,
        None => {
            let opened = crate::envelope::open(keyring, &ns, &name, &secret);
            let sealed = opened.as_ref().map(|(_, sealed)| sealed.clone());
            if let Some(digest) = cache::managed_digest(&secret) {
                let sealed = sealed.clone();
                ctx.remember_opened(oref.clone(), cache::Opened { digest, sealed });
            }
            keys.in_service = opened.map(|(key, _)| key);
            sealed
        }
    };
    let managed = match (sealed, owned) {
        (Some(sealed), Ownership::Restored) => {
            let adopted = Arc::new(adopt(pk, ctx, secrets, &secret).await?);
            return Ok(ManagedView {
                managed: Managed::InService(in_service(&adopted, sealed)),
                secret: Some(adopted),
            });
        }
        (Some(sealed), _) => Managed::InService(in_service(&secret, sealed)),
        (None, Ownership::Ours) => Managed::Undecryptable,
        // A restored Secret that does not authenticate here is not ours to adopt.
        (None, _) => Managed::Conflict,
    };
    Ok(ManagedView {
        managed,
        secret: Some(secret),
    })
}

/// Reads the key in service (one GET) for a verification or a re-encryption; `None` when
/// the envelope is no longer the one decisions were made on.
async fn fetch_in_service(
    pk: &ProviderKey,
    secrets: &Api<Secret>,
    keyring: Option<&Keyring>,
    judged: Option<&Secret>,
) -> Result<Option<SecretString>, Error> {
    let (Some(keyring), Some(judged)) = (keyring, judged) else {
        return Ok(None);
    };
    let ns = namespace(&pk.metadata)?;
    let Some(secret) = secrets.get_opt(&judged.name_any()).await? else {
        return Ok(None);
    };
    if secret.uid() != judged.uid()
        || cache::managed_digest(&secret) != cache::managed_digest(judged)
    {
        return Ok(None);
    }
    Ok(crate::envelope::open(keyring, &ns, &pk.name_any(), &secret).map(|(key, _)| key))
}

/// Waits for this object's turn to verify. Never before its backoff is over (a watch event,
/// our own status write included, may wake it early), nor before its turn at the provider
/// host (see [`super::Context::verification_turn`]). `Some`: not now, requeue instead.
async fn await_verification_turn(
    ctx: &Context,
    object: &ObjectRef<ProviderKey>,
    observed: &Observed,
) -> Option<Action> {
    if let Some(wait) = ctx.backoff.remaining(object) {
        return Some(Action::requeue(wait));
    }
    if let Some(host) = observed
        .destination
        .as_ref()
        .ok()
        .and_then(|o| origin_host(o))
    {
        match ctx.verification_turn(object, &host) {
            Ok(at) => tokio::time::sleep_until(at).await,
            Err(wait) => return Some(Action::requeue(wait)),
        }
    }
    None
}

async fn apply(pk: &ProviderKey, ctx: &Context) -> Result<Action, Error> {
    let ns = namespace(&pk.metadata)?;
    let name = pk.name_any();
    let uid = pk.uid().unwrap_or_default();
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let keyring = ctx.keyring();
    let managed_name = names::managed_secret_name(&name);

    // Read, from the caches; key bytes only when already at hand.
    let (source, source_key) = observe_source(ctx, &secrets, &ns, &pk.spec).await?;
    let mut keys = Keys {
        source: source_key,
        in_service: None,
    };
    let view = observe_managed(pk, ctx, &secrets, keyring.as_ref(), &mut keys).await?;
    let mut observed = Observed {
        generation: pk.metadata.generation,
        status: pk.status.clone().unwrap_or_default(),
        managed_secret_name: managed_name.clone(),
        source,
        managed: view.managed,
        active_key_id: keyring.as_ref().map(|k| k.active_id().to_string()),
        destination: destination(pk, ctx),
        interval: plan::effective_interval(pk.spec.verification.as_ref())
            .map_err(|e| format!("spec.verification.interval: {e}")),
        now: Time(Timestamp::now()),
        spread: plan::spread_for(&uid),
    };

    // Verify, only when the plan says so, and only in this object's turn.
    let mut target = plan::verification_target(&observed);
    let object = ObjectRef::from_obj(pk);
    if target.is_some()
        && let Some(later) = await_verification_turn(ctx, &object, &observed).await
    {
        return Ok(later);
    }
    // The key that verification needs, read now. A source whose key changed since the cache
    // saw it is judged again from what was read.
    match target {
        Some(Target::Source) if keys.source.is_none() => {
            let (source, key) = fetch_source(&secrets, &ns, &pk.spec).await?;
            keys.source = key;
            observed.source = source;
            target = plan::verification_target(&observed);
        }
        Some(Target::InService) if keys.in_service.is_none() => {
            keys.in_service =
                fetch_in_service(pk, &secrets, keyring.as_ref(), view.secret.as_deref()).await?;
        }
        _ => {}
    }
    let verified = match target.and_then(|t| keys.for_target(t)) {
        Some(key) => Some(verify(pk, ctx, key).await),
        None => None,
    };
    let desired = plan::decide(&observed, target, verified.as_ref());

    // Apply: the managed Secret first, so the status never claims what is not stored.
    if desired.secret == SecretWrite::ReEncrypt && keys.in_service.is_none() {
        keys.in_service =
            fetch_in_service(pk, &secrets, keyring.as_ref(), view.secret.as_deref()).await?;
        if keys.in_service.is_none() {
            // Changed since it was judged: judge it again soon (not at once: no spin if the
            // two reads keep disagreeing).
            return Ok(Action::requeue(std::time::Duration::from_secs(1)));
        }
    }
    if let (Some(plaintext), Some(keyring)) = (keys.for_write(&desired.secret)?, &keyring) {
        let written = SealedWrite {
            plaintext,
            keyring,
            kind: &desired.secret,
            existing: view.secret.as_deref(),
        };
        seal_and_write(pk, ctx, &secrets, &observed, &desired.status, written).await?;
    }
    write_status(pk, ctx, &desired.status).await?;
    for note in &desired.events {
        publish(ctx, &pk.object_ref(&()), note).await;
    }

    Ok(next_action(ctx, &object, desired.next))
}

/// A key to seal into the managed Secret, and the copy it replaces.
struct SealedWrite<'a> {
    plaintext: &'a SecretString,
    keyring: &'a Keyring,
    kind: &'a SecretWrite,
    existing: Option<&'a Secret>,
}

/// Seals the key with the destination it was verified for and writes the managed Secret
/// (create if absent, else replace at the judged resourceVersion).
async fn seal_and_write(
    pk: &ProviderKey,
    ctx: &Context,
    secrets: &Api<Secret>,
    observed: &Observed,
    status: &crate::crd::ProviderKeyStatus,
    w: SealedWrite<'_>,
) -> Result<(), Error> {
    let ns = namespace(&pk.metadata)?;
    let name = pk.name_any();
    let origin = observed
        .destination
        .as_ref()
        .map_err(|_| Error::Internal("a key is written only for a usable destination"))?;
    let payload = crypto::seal_payload(origin, w.plaintext.expose_secret().as_bytes());
    let envelope = w.keyring.encrypt(&ns, &name, &payload)?;
    let digest = cache::envelope_digest(&envelope);
    let secret = managed_secret(
        pk,
        &observed.managed_secret_name,
        status,
        observed,
        envelope,
    )?;
    write_managed(secrets, secret, w.existing).await?;
    // What was just sealed need not be decrypted again.
    let sealed = cache::Sealed::of(
        w.plaintext.expose_secret(),
        w.keyring.active_id(),
        Some(origin),
    );
    ctx.remember_opened(
        ObjectRef::new(&observed.managed_secret_name).within(&ns),
        cache::Opened {
            digest,
            sealed: Some(sealed),
        },
    );
    ctx.metrics.secret_written(match w.kind {
        SecretWrite::ReEncrypt => "reencrypt",
        _ => "put",
    });
    Ok(())
}

/// The one status writer: a server-side apply of the whole status, only when it changed.
async fn write_status(
    pk: &ProviderKey,
    ctx: &Context,
    status: &crate::crd::ProviderKeyStatus,
) -> Result<(), Error> {
    if pk.status.as_ref() == Some(status) {
        return Ok(());
    }
    let api: Api<ProviderKey> = Api::namespaced(ctx.client.clone(), &namespace(&pk.metadata)?);
    let updated = api
        .patch_status(
            &pk.name_any(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&status_patch(status)),
        )
        .await?;
    ctx.remember(pk, &updated);
    Ok(())
}

/// When to come back, and the object's backoff to match.
fn next_action(ctx: &Context, object: &ObjectRef<ProviderKey>, next: Next) -> Action {
    match next {
        Next::Backoff => {
            let delay = ctx.backoff.next_delay(object);
            tracing::info!(providerkey = %object, retry_in = ?delay, "not ready yet; backing off");
            Action::requeue(delay)
        }
        Next::After(d) => {
            ctx.backoff.reset(object);
            Action::requeue(d)
        }
        Next::AwaitChange => {
            ctx.backoff.reset(object);
            Action::await_change()
        }
    }
}

/// Creates the managed Secret only if absent; replaces it only at the resourceVersion that was
/// judged ours, so a Secret swapped in meanwhile is never overwritten.
async fn write_managed(
    secrets: &Api<Secret>,
    mut secret: Secret,
    existing: Option<&Secret>,
) -> Result<(), Error> {
    let pp = PostParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..Default::default()
    };
    let name = secret.name_any();
    match existing {
        None => {
            secrets.create(&pp, &secret).await?;
        }
        Some(current) => {
            secret.metadata.resource_version = current.metadata.resource_version.clone();
            secrets.replace(&name, &pp, &secret).await?;
        }
    }
    Ok(())
}

/// Takes over a managed Secret restored from a backup: its owner reference is rewritten to
/// this ProviderKey, at the resourceVersion that was judged.
async fn adopt(
    pk: &ProviderKey,
    ctx: &Context,
    secrets: &Api<Secret>,
    secret: &Secret,
) -> Result<Secret, Error> {
    let owner = pk
        .controller_owner_ref(&())
        .ok_or(Error::MissingNamespace)?;
    let patch = json_patch(serde_json::json!([
        {"op": "test", "path": "/metadata/resourceVersion", "value": secret.resource_version()},
        {"op": "replace", "path": "/metadata/ownerReferences", "value": [owner]},
    ]))?;
    let adopted = secrets
        .patch(&secret.name_any(), &PatchParams::default(), &patch)
        .await?;
    publish(
        ctx,
        &pk.object_ref(&()),
        &EventNote {
            reason: plan::EventReason::Adopted,
            note: format!(
                "managed Secret {} restored from a previous ProviderKey of this name was adopted",
                secret.name_any()
            ),
        },
    )
    .await;
    Ok(adopted)
}

async fn verify(pk: &ProviderKey, ctx: &Context, key: &SecretString) -> plan::Verified {
    let started = std::time::Instant::now();
    let outcome = match pk.spec.provider_params() {
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
    plan::Verified {
        reason: outcome.reason,
        message: outcome.message,
    }
}

fn managed_secret(
    pk: &ProviderKey,
    name: &str,
    status: &crate::crd::ProviderKeyStatus,
    observed: &Observed,
    envelope: Vec<u8>,
) -> Result<Secret, Error> {
    let owner = pk
        .controller_owner_ref(&())
        .ok_or(Error::MissingNamespace)?;
    let origin = observed
        .destination
        .as_ref()
        .map_err(|_| Error::Internal("a key is written only for a usable destination"))?;
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
        (annotations::VERIFIED_ORIGIN, Some(origin.clone())),
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
            labels: Some({
                let mut labels = names::managed_by_labels();
                labels.insert(names::PROVIDERKEY_LABEL.to_string(), pk.name_any());
                labels
            }),
            annotations: Some(annotations),
            owner_references: Some(vec![owner]),
            ..Default::default()
        },
        type_: Some(names::MANAGED_SECRET_TYPE.into()),
        data: Some(BTreeMap::from([(
            names::ENVELOPE_KEY.to_string(),
            ByteString(envelope),
        )])),
        ..Default::default()
    })
}

/// Deletion: hard-delete the managed Secret (not left to garbage collection, which may lag or
/// be absent), only if this ProviderKey created it, with a UID precondition; then say so and
/// let the ProviderKey go.
async fn cleanup(meta: &ObjectMeta, ctx: &Context) -> Result<Action, Error> {
    if !meta.finalizers.iter().flatten().any(|f| f == FINALIZER) {
        return Ok(Action::await_change());
    }
    let ns = namespace(meta)?;
    let name = meta.name.clone().unwrap_or_default();
    let uid = meta.uid.clone().unwrap_or_default();
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let managed_name = names::managed_secret_name(&name);
    let note = match secrets.get_opt(&managed_name).await? {
        Some(secret) if ownership(&secret, &name, &uid) == Ownership::Ours => {
            let dp = DeleteParams {
                preconditions: Some(Preconditions {
                    uid: secret.uid(),
                    resource_version: secret.resource_version(),
                }),
                ..Default::default()
            };
            match secrets.delete(&managed_name, &dp).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
            format!("managed Secret {managed_name} deleted; the key is no longer served")
        }
        Some(_) => format!(
            "Secret {managed_name} was not created by this ProviderKey and is left in place"
        ),
        None => "no managed Secret to delete; the key is no longer served".to_string(),
    };
    publish(
        ctx,
        &reference(meta),
        &EventNote {
            reason: plan::EventReason::Deleted,
            note,
        },
    )
    .await;
    remove_finalizer(meta, ctx).await?;
    let object = ObjectRef::<ProviderKey>::new(&name).within(&ns);
    ctx.backoff.reset(&object);
    ctx.forget(&object);
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;

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
        let other = secret(&[("token", b"sk-x")]);
        assert_eq!(
            key_from_source(&other, &spec()).err().map(|e| e.0),
            Some(Reason::SecretKeyMissing)
        );
        let blank = secret(&[("api-key", b" \n")]);
        assert_eq!(
            key_from_source(&blank, &spec()).err().map(|e| e.0),
            Some(Reason::SecretKeyMissing)
        );
        let binary = secret(&[("api-key", &[0xff, 0xfe])]);
        assert_eq!(
            key_from_source(&binary, &spec()).err().map(|e| e.0),
            Some(Reason::InvalidSpec)
        );
    }

    #[test]
    fn a_trailing_newline_is_not_part_of_the_key() {
        let s = secret(&[("api-key", b"sk-test-1234567890\n")]);
        let key = key_from_source(&s, &spec()).expect("key");
        assert_eq!(key.expose_secret(), "sk-test-1234567890");
    }

    #[test]
    fn the_unlabelled_message_gives_the_exact_command() {
        let (reason, message) = not_labelled("db-password", "team-a");
        assert_eq!(reason, Reason::SecretNotLabelled);
        assert!(
            message.contains("kubectl label secret db-password -n team-a byok.dev/key-source=true"),
            "{message}"
        );
    }

    fn owned(type_: &str, refs: Vec<OwnerReference>) -> Secret {
        Secret {
            type_: Some(type_.into()),
            metadata: ObjectMeta {
                owner_references: Some(refs),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn owner(kind: &str, name: &str, uid: &str) -> OwnerReference {
        OwnerReference {
            api_version: "byok.dev/v1alpha1".into(),
            kind: kind.into(),
            name: name.into(),
            uid: uid.into(),
            controller: Some(true),
            ..Default::default()
        }
    }

    #[test]
    fn only_our_own_managed_secret_is_ours() {
        let t = names::MANAGED_SECRET_TYPE;
        let cases = [
            (
                owned(t, vec![owner("ProviderKey", "k", "u1")]),
                Ownership::Ours,
            ),
            (
                owned(t, vec![owner("ProviderKey", "k", "old")]),
                Ownership::Restored,
            ),
            (
                owned(t, vec![owner("ProviderKey", "other", "old")]),
                Ownership::Foreign,
            ),
            (
                owned(t, vec![owner("ConfigMap", "k", "old")]),
                Ownership::Foreign,
            ),
            (owned(t, vec![]), Ownership::Foreign),
            (
                owned(
                    t,
                    vec![
                        owner("ProviderKey", "k", "a"),
                        owner("ProviderKey", "k", "b"),
                    ],
                ),
                Ownership::Foreign,
            ),
            // Our UID on a Secret of another type is still not ours: its type says it was
            // not written by us.
            (
                owned("Opaque", vec![owner("ProviderKey", "k", "u1")]),
                Ownership::Foreign,
            ),
            (Secret::default(), Ownership::Foreign),
        ];
        for (i, (secret, want)) in cases.iter().enumerate() {
            assert_eq!(ownership(secret, "k", "u1"), *want, "case {i}");
        }
        assert_eq!(
            ownership(&owned(t, vec![owner("ProviderKey", "k", "")]), "k", ""),
            Ownership::Restored,
            "an empty UID never matches"
        );
    }

    #[test]
    fn origin_is_scheme_host_and_port() {
        let u = |s: &str| url::Url::parse(s).expect("url");
        assert_eq!(
            crate::providers::origin(&u("https://api.openai.com/v1")),
            "https://api.openai.com:443"
        );
        assert_eq!(
            crate::providers::origin(&u("https://h.example:8443/x")),
            "https://h.example:8443"
        );
    }
}
