//! The pure heart of reconciliation: from what was observed (and, when one ran, the result of a
//! verification) to the desired managed Secret, status, Events and next visit. No IO, no
//! clock: `now` comes in.
//!
//! The steps, in order:
//! 1. [`blocker`]: something that stops all work on this object (a bad spec, a Secret that is
//!    not ours, no keyring, a refused destination). Nothing is verified or written.
//! 2. [`verification_target`]: whether a live call is due, and of which key.
//! 3. [`decide`]: what the verification (if any) means for the key in service, the
//!    conditions and the Events.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::crd::ProviderKeyStatus;
use crate::reason::Reason;
use crate::status::{self, Decided, Status, ready_reasons, types};

pub use crate::interval::{DEFAULT_INTERVAL, MIN_INTERVAL, effective_interval};

/// The key currently in service, as read back from the managed Secret: the fingerprint,
/// mask and encryption key id come from the decrypted envelope, not from annotations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InService {
    pub fingerprint: String,
    pub masked_key: String,
    pub key_version: i64,
    pub encryption_key_id: String,
    pub rotated_at: Option<Time>,
    /// `scheme://host:port` the key was verified against (`None`: not recorded).
    pub origin: Option<String>,
}

/// The managed Secret `<name>-byok`, as found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Managed {
    Absent,
    /// Ours, and its envelope authenticates for this ProviderKey.
    InService(InService),
    /// Ours, but the envelope does not authenticate here (tampered, copied, or encrypted
    /// with an operator key that is gone).
    Undecryptable,
    /// Not created by this ProviderKey: never updated or deleted.
    Conflict,
}

/// The source Secret's key, or why there is none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Present {
        fingerprint: String,
        masked_key: String,
    },
    Unusable {
        reason: Reason,
        message: String,
    },
}

/// Everything reconcile read, reduced to what decisions need.
#[derive(Debug, Clone)]
pub struct Observed {
    pub generation: Option<i64>,
    pub status: ProviderKeyStatus,
    pub managed_secret_name: String,
    pub source: Source,
    pub managed: Managed,
    /// The active operator key; `None` when the keyring is missing or unusable.
    pub active_key_id: Option<String>,
    /// Where the key goes now (`scheme://host:port`), or why it may go nowhere.
    pub destination: Result<String, Verified>,
    /// The re-verification interval (`None`: disabled), or why `spec.verification.interval`
    /// cannot be used.
    pub interval: Result<Option<Duration>, String>,
    pub now: Time,
    /// This key's spread of its re-verification interval, within ±[`MAX_SPREAD`]; see
    /// [`spread_for`].
    pub spread: f64,
}

/// How far a key's re-verification period may stray from its interval, either way.
pub const MAX_SPREAD: f64 = 0.1;

/// A key's own, stable spread in [-`MAX_SPREAD`, `MAX_SPREAD`], from its UID: different keys
/// with a daily interval never bunch into one minute, and a restart does not reshuffle them.
pub fn spread_for(uid: &str) -> f64 {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(uid.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    let unit = (u64::from_be_bytes(first) >> 11) as f64 / (1u64 << 53) as f64;
    (unit * 2.0 - 1.0) * MAX_SPREAD
}

/// The time between two verifications of this key: its interval, spread.
fn period(obs: &Observed) -> Option<Duration> {
    let interval = (*obs.interval.as_ref().ok()?)?;
    Some(interval.mul_f64(1.0 + obs.spread.clamp(-MAX_SPREAD, MAX_SPREAD)))
}

/// Which key a verification call checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The key in the source Secret (new, rotated, or after a spec change).
    Source,
    /// The key in service, for periodic re-verification when the source is gone.
    InService,
}

/// The outcome of a verification call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub reason: Reason,
    pub message: String,
}

/// What the managed Secret should become. Each variant names the one plaintext it needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretWrite {
    /// Leave it as it is.
    Keep,
    /// Put the source key in service (encrypted with the active operator key).
    PutSourceKey { key_version: i64 },
    /// The key in service, re-encrypted with the active operator key.
    ReEncrypt,
}

/// Why an Event is published. The string forms are what `kubectl get events` shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventReason {
    KeyInService,
    KeyRejected,
    ReEncrypted,
    /// A managed Secret restored from a backup was taken over.
    Adopted,
    /// The ProviderKey was deleted.
    Deleted,
    /// A failure a user can act on; the reason is the condition's.
    Failed(Reason),
}

impl EventReason {
    pub fn as_str(self) -> &'static str {
        match self {
            EventReason::KeyInService => "KeyInService",
            EventReason::KeyRejected => "KeyRejected",
            EventReason::ReEncrypted => "ReEncrypted",
            EventReason::Adopted => "Adopted",
            EventReason::Deleted => "Deleted",
            EventReason::Failed(r) => r.as_str(),
        }
    }

    pub fn is_warning(self) -> bool {
        matches!(self, EventReason::KeyRejected | EventReason::Failed(_))
    }
}

/// A Kubernetes Event to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventNote {
    pub reason: EventReason,
    pub note: String,
}

/// When reconcile should look at the object again if nothing changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Only when something changes.
    AwaitChange,
    /// After this long (periodic re-verification).
    After(Duration),
    /// After the object's backoff delay (a transient failure, or a condition outside our
    /// watches such as a foreign Secret in the way).
    Backoff,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Desired {
    pub secret: SecretWrite,
    pub status: ProviderKeyStatus,
    pub events: Vec<EventNote>,
    pub next: Next,
}

/// Something that stops all work on the object: no verification, no write.
pub fn blocker(obs: &Observed) -> Option<Verified> {
    let blocked = |reason, message: String| Some(Verified { reason, message });
    if let Err(message) = &obs.interval {
        return blocked(Reason::InvalidSpec, message.clone());
    }
    if obs.managed == Managed::Conflict {
        return blocked(
            Reason::ManagedSecretConflict,
            format!(
                "Secret {} already exists and was not created by this ProviderKey; it is left \
                 untouched. Delete or rename it, or give the ProviderKey another name",
                obs.managed_secret_name
            ),
        );
    }
    if obs.active_key_id.is_none() {
        return blocked(
            Reason::KeyringUnavailable,
            "the operator keyring Secret is missing or unusable; restore it from backup \
             (the operator recovers without a restart)"
                .to_string(),
        );
    }
    if let Err(refused) = &obs.destination {
        return Some(refused.clone());
    }
    None
}

/// The key in service, if it may still be used: it was verified against today's
/// destination. A key verified elsewhere is never sent to a new destination.
fn usable_in_service(obs: &Observed) -> Option<&InService> {
    match (&obs.managed, &obs.destination) {
        (Managed::InService(s), Ok(origin)) if s.origin.as_deref() == Some(origin.as_str()) => {
            Some(s)
        }
        _ => None,
    }
}

fn interval_elapsed(obs: &Observed) -> bool {
    let Some(period) = period(obs) else {
        return false;
    };
    // A key in service that this status never saw verified (restored from a backup, say) is
    // due at once.
    let Some(last) = obs.status.last_verified_time.as_ref() else {
        return matches!(obs.managed, Managed::InService(_));
    };
    let elapsed = obs.now.0.duration_since(last.0).as_secs();
    elapsed >= i64::try_from(period.as_secs()).unwrap_or(i64::MAX)
}

fn condition_status(conditions: &[Condition], type_: &str) -> Option<Status> {
    status::find(conditions, type_).map(|c| Status::parse(&c.status))
}

fn spec_changed(obs: &Observed) -> bool {
    obs.status.observed_generation != obs.generation
}

/// Decides whether a live verification is needed, and of which key.
pub fn verification_target(obs: &Observed) -> Option<Target> {
    if blocker(obs).is_some() {
        return None;
    }
    let serving = usable_in_service(obs);
    // A rejected key is not tried again until something changes.
    let rejected = |fingerprint: &str| {
        obs.status.rejected_fingerprint.as_deref() == Some(fingerprint) && !spec_changed(obs)
    };
    match &obs.source {
        Source::Present { fingerprint, .. } => {
            let serving_this = serving.is_some_and(|s| &s.fingerprint == fingerprint);
            if rejected(fingerprint) {
                None
            } else if !serving_this {
                // A new or rotated key, or one to replace a key we may no longer use.
                Some(Target::Source)
            } else {
                let verified = condition_status(&obs.status.conditions, types::VERIFIED);
                (spec_changed(obs) || verified != Some(Status::True) || interval_elapsed(obs))
                    .then_some(Target::Source)
            }
        }
        Source::Unusable { .. } => serving
            .filter(|s| !rejected(&s.fingerprint) && interval_elapsed(obs))
            .map(|_| Target::InService),
    }
}

/// The conditions, Secret write and Events for a blocked object: Ready says why, Verified
/// keeps what the last verification found (a refused destination is itself the result).
fn decide_blocked(obs: &Observed, why: Verified) -> Desired {
    let ready = Decided::new(
        types::READY,
        Status::False,
        why.reason.as_str(),
        &why.message,
    );
    // A refused destination is itself what verification found; other blockers say nothing
    // about the key.
    let verified = match &obs.destination {
        Err(refused) if *refused == why => Decided::new(
            types::VERIFIED,
            Status::False,
            why.reason.as_str(),
            &why.message,
        ),
        _ => carried_verified(obs),
    };
    let mut events = Vec::new();
    failure_events(obs, &[&ready, &verified], &mut events);
    let next = match why.reason {
        // Outside our watches: the foreign Secret is not labelled as ours.
        Reason::ManagedSecretConflict => Next::Backoff,
        _ => Next::AwaitChange,
    };
    let mut status = obs.status.clone();
    status.observed_generation = obs.generation;
    status.conditions = status::merge(
        &obs.status.conditions,
        &[ready, verified],
        obs.generation,
        &obs.now,
    );
    Desired {
        secret: SecretWrite::Keep,
        status,
        events,
        next,
    }
}

/// The Verified condition as it was, or Pending when there was none.
fn carried_verified(obs: &Observed) -> Decided {
    match status::find(&obs.status.conditions, types::VERIFIED) {
        Some(c) => Decided::new(
            types::VERIFIED,
            Status::parse(&c.status),
            c.reason.clone(),
            c.message.clone(),
        ),
        None => Decided::new(
            types::VERIFIED,
            Status::Unknown,
            ready_reasons::PENDING,
            "verification has not run yet",
        ),
    }
}

/// A Warning Event for each failing condition, once per change of its reason (a repeat of the
/// same failure says nothing new), and once when Ready and Verified fail for the same reason.
/// A source Secret that goes away while its key stays in service fails only Verified; it is
/// still worth a word.
fn failure_events(obs: &Observed, decided: &[&Decided], events: &mut Vec<EventNote>) {
    for d in decided {
        let Some(reason) = Reason::parse(&d.reason) else {
            continue;
        };
        // Transient failures retry by themselves; key rejections have their own Event.
        let rejection = matches!(reason, Reason::InvalidKey | Reason::QuotaExhausted);
        if d.status != Status::False || reason.is_transient() || rejection {
            continue;
        }
        let previous = status::find(&obs.status.conditions, d.type_);
        let repeated = previous
            .is_some_and(|c| Status::parse(&c.status) == Status::False && c.reason == d.reason);
        let already = events
            .iter()
            .any(|e| e.reason == EventReason::Failed(reason));
        if !repeated && !already {
            events.push(EventNote {
                reason: EventReason::Failed(reason),
                note: d.message.clone(),
            });
        }
    }
}

/// What the verification means for the key in service: the new key in service (if any) and
/// what to write. `None` result: no call was made.
struct KeyOutcome {
    in_service: Option<InService>,
    secret: SecretWrite,
    verified: Option<Decided>,
    rejected_fingerprint: Option<String>,
    last_verified_time: Option<Time>,
    transient: bool,
    /// The key in service itself was rejected (now, or earlier and nothing has fixed it): it
    /// must not be served, whatever happens to newer keys.
    serving_rejected: Option<Reason>,
    events: Vec<EventNote>,
}

/// The status says the key in service was rejected: Ready is False for a key rejection while
/// that very key is the one the status names.
fn serving_rejected_before(obs: &Observed) -> Option<Reason> {
    let Managed::InService(s) = &obs.managed else {
        return None;
    };
    if obs.status.fingerprint.as_deref() != Some(s.fingerprint.as_str()) {
        return None;
    }
    let c = status::find(&obs.status.conditions, types::READY)?;
    let reason = Reason::parse(&c.reason)?;
    (Status::parse(&c.status) == Status::False
        && matches!(reason, Reason::InvalidKey | Reason::QuotaExhausted))
    .then_some(reason)
}

fn key_outcome(obs: &Observed, target: Option<Target>, result: Option<&Verified>) -> KeyOutcome {
    let mut out = KeyOutcome {
        in_service: usable_in_service(obs).cloned(),
        secret: SecretWrite::Keep,
        verified: None,
        rejected_fingerprint: obs.status.rejected_fingerprint.clone(),
        last_verified_time: obs.status.last_verified_time.clone(),
        transient: false,
        serving_rejected: serving_rejected_before(obs),
        events: Vec::new(),
    };
    match (&obs.source, target, result) {
        (Source::Unusable { reason, message }, _, result) => {
            source_gone(obs, *reason, message, result, &mut out);
        }
        (
            Source::Present {
                fingerprint,
                masked_key,
            },
            Some(Target::Source),
            Some(v),
        ) => source_checked(obs, fingerprint, masked_key, v, &mut out),
        _ => {}
    }
    out
}

/// The source is gone: Verified says so, unless the key in service itself was just
/// rejected on re-verification.
fn source_gone(
    obs: &Observed,
    reason: Reason,
    message: &str,
    result: Option<&Verified>,
    out: &mut KeyOutcome,
) {
    let previous_verified = status::find(&obs.status.conditions, types::VERIFIED);
    let mut verified = Decided::new(types::VERIFIED, Status::False, reason.as_str(), message);
    match result {
        Some(v) if v.reason == Reason::Valid => {
            out.last_verified_time = Some(obs.now.clone());
            out.serving_rejected = None;
        }
        Some(v) if v.reason.is_transient() => out.transient = true,
        Some(v) => {
            out.rejected_fingerprint = out.in_service.as_ref().map(|s| s.fingerprint.clone());
            let msg = format!("key in service rejected on re-verification: {}", v.message);
            verified = rejection(previous_verified, v.reason, msg, &mut out.events);
        }
        None => {}
    }
    out.verified = Some(verified);
}

/// The source key was verified: put it in service, keep the last good key, or say why not.
fn source_checked(
    obs: &Observed,
    fingerprint: &str,
    masked_key: &str,
    v: &Verified,
    out: &mut KeyOutcome,
) {
    let previous_verified = status::find(&obs.status.conditions, types::VERIFIED);
    let is_new = out
        .in_service
        .as_ref()
        .is_none_or(|s| s.fingerprint != fingerprint);
    if v.reason == Reason::Valid {
        out.last_verified_time = Some(obs.now.clone());
        out.rejected_fingerprint = None;
        out.serving_rejected = None;
        out.verified = Some(Decided::new(
            types::VERIFIED,
            Status::True,
            Reason::Valid.as_str(),
            v.message.clone(),
        ));
        if is_new {
            put_in_service(obs, fingerprint, masked_key, out);
        }
    } else if v.reason.is_transient() {
        out.transient = true;
        if is_new {
            out.verified = Some(Decided::new(
                types::VERIFIED,
                Status::Unknown,
                v.reason.as_str(),
                // Only the reason, not the provider's answer: a message that changes with
                // every failure would rewrite the status each time, and the write would
                // wake the next attempt early.
                format!(
                    "could not verify key {fingerprint} yet ({}); retrying with backoff",
                    v.reason
                ),
            ));
        }
        // A transient failure never turns a verified key invalid.
    } else {
        out.rejected_fingerprint = Some(fingerprint.to_string());
        let msg = if is_new {
            if out.in_service.is_some() {
                format!(
                    "new key {fingerprint} rejected: {}; the last good key stays in service",
                    v.message
                )
            } else {
                format!("key {fingerprint} rejected: {}", v.message)
            }
        } else {
            out.serving_rejected = Some(v.reason);
            format!("key {fingerprint} rejected: {}", v.message)
        };
        out.verified = Some(rejection(previous_verified, v.reason, msg, &mut out.events));
    }
}

/// A verified source key that is not the one in service goes in: the managed Secret is
/// written with its version, and an Event says so. The same key verified against a new
/// destination keeps its version and rotation time.
fn put_in_service(obs: &Observed, fingerprint: &str, masked_key: &str, out: &mut KeyOutcome) {
    let origin = obs.destination.as_ref().ok().cloned();
    // The previous version: what is in service, whether or not it may still be used, else
    // what the status last said.
    let previous = match &obs.managed {
        Managed::InService(s) => Some(s.key_version),
        _ => obs.status.key_version,
    };
    let same_key = matches!(&obs.managed, Managed::InService(s) if s.fingerprint == fingerprint);
    let key_version = match (previous, same_key) {
        (Some(p), true) => p,
        (Some(p), false) => p.saturating_add(1),
        (None, _) => 1,
    };
    out.secret = SecretWrite::PutSourceKey { key_version };
    out.in_service = Some(InService {
        fingerprint: fingerprint.to_string(),
        masked_key: masked_key.to_string(),
        key_version,
        encryption_key_id: obs.active_key_id.clone().unwrap_or_default(),
        rotated_at: if same_key {
            match &obs.managed {
                Managed::InService(s) => s.rotated_at.clone(),
                _ => Some(obs.now.clone()),
            }
        } else {
            Some(obs.now.clone())
        },
        origin,
    });
    let note = if same_key {
        format!("key {fingerprint} verified against the new destination and kept in service")
    } else if key_version == 1 {
        format!("key {fingerprint} verified and put in service")
    } else {
        format!("key rotated to {fingerprint} (version {key_version})")
    };
    out.events.push(EventNote {
        reason: EventReason::KeyInService,
        note,
    });
}

/// A `Verified=False` condition for a rejected key, with a Warning Event unless the same
/// rejection is already on the status.
fn rejection(
    previous: Option<&Condition>,
    reason: Reason,
    message: String,
    events: &mut Vec<EventNote>,
) -> Decided {
    let repeated = previous.is_some_and(|c| {
        Status::parse(&c.status) == Status::False
            && c.reason == reason.as_str()
            && c.message == message
    });
    if !repeated {
        events.push(EventNote {
            reason: EventReason::KeyRejected,
            note: message.clone(),
        });
    }
    Decided::new(types::VERIFIED, Status::False, reason.as_str(), message)
}

/// The Ready condition: whether a key may be served, and if not, the one reason a user
/// should act on.
fn ready_condition(obs: &Observed, k: &KeyOutcome, verified: &Decided) -> Decided {
    match &k.in_service {
        None => {
            let (reason, message) = match (&obs.managed, &obs.source) {
                (Managed::Undecryptable, _) => (
                    Reason::DecryptionFailed.as_str().to_string(),
                    format!(
                        "managed Secret {} cannot be decrypted for this ProviderKey (tampered \
                         with, copied from another object, or encrypted with an operator key \
                         that is gone); the source Secret could not replace it: {}",
                        obs.managed_secret_name, verified.message
                    ),
                ),
                (Managed::InService(_), _) => (
                    Reason::DestinationChanged.as_str().to_string(),
                    format!(
                        "the provider endpoint changed since the key in service was verified; \
                         that key is not sent to the new destination until a key from the \
                         source Secret verifies there: {}",
                        verified.message
                    ),
                ),
                _ if verified.status == Status::Unknown && !k.transient => (
                    ready_reasons::PENDING.to_string(),
                    "waiting for the first verification".to_string(),
                ),
                _ => (verified.reason.clone(), verified.message.clone()),
            };
            Decided::new(types::READY, Status::False, reason, message)
        }
        Some(s) if k.serving_rejected.is_some() => {
            let reason = k.serving_rejected.unwrap_or(Reason::InvalidKey);
            Decided::new(
                types::READY,
                Status::False,
                reason.as_str(),
                format!(
                    "key {} in service was rejected by the provider ({reason}); it is not served \
                     until a key verifies (see the Verified condition)",
                    s.fingerprint
                ),
            )
        }
        Some(s) if k.rejected_fingerprint.is_some() => Decided::new(
            types::READY,
            Status::True,
            ready_reasons::PENDING_KEY_REJECTED,
            format!(
                "key {} is in service; a newer key was rejected (see the Verified condition)",
                s.fingerprint
            ),
        ),
        Some(s) => Decided::new(
            types::READY,
            Status::True,
            Reason::Valid.as_str(),
            format!(
                "key {} (version {}) is in service",
                s.fingerprint, s.key_version
            ),
        ),
    }
}

/// Builds the desired state from the observation and the verification result (if one ran).
pub fn decide(obs: &Observed, target: Option<Target>, result: Option<&Verified>) -> Desired {
    if let Some(why) = blocker(obs) {
        return decide_blocked(obs, why);
    }
    let mut k = key_outcome(obs, target, result);

    // The operator key was rotated: re-encrypt what is in service (no verification needed).
    // The key id comes from the envelope itself, never from an editable annotation.
    let active = obs.active_key_id.clone().unwrap_or_default();
    if let (SecretWrite::Keep, Some(s)) = (&k.secret, k.in_service.as_mut())
        && s.encryption_key_id != active
    {
        k.secret = SecretWrite::ReEncrypt;
        k.events.push(EventNote {
            reason: EventReason::ReEncrypted,
            note: format!("managed Secret re-encrypted with operator key {active}"),
        });
        s.encryption_key_id = active;
    }

    let verified = k.verified.clone().unwrap_or_else(|| carried_verified(obs));
    let ready = ready_condition(obs, &k, &verified);
    let mut events = std::mem::take(&mut k.events);
    failure_events(obs, &[&ready, &verified], &mut events);

    // A generation whose verification failed transiently is not observed yet: keeping the old
    // observedGeneration makes the retry verify again.
    let observed_generation = if k.transient {
        obs.status.observed_generation
    } else {
        obs.generation
    };
    let mut status = ProviderKeyStatus {
        observed_generation,
        last_verified_time: k.last_verified_time.clone(),
        rejected_fingerprint: k.rejected_fingerprint.clone(),
        conditions: status::merge(
            &obs.status.conditions,
            &[ready, verified],
            observed_generation,
            &obs.now,
        ),
        ..Default::default()
    };
    if let Some(s) = &k.in_service {
        status.fingerprint = Some(s.fingerprint.clone());
        status.masked_key = Some(s.masked_key.clone());
        status.key_version = Some(s.key_version);
        status.encryption_key_id = Some(s.encryption_key_id.clone());
        status.last_rotation_time = s.rotated_at.clone();
        status.managed_secret_name = Some(obs.managed_secret_name.clone());
    }

    let next = if k.transient {
        Next::Backoff
    } else {
        match (period(obs), &status.last_verified_time) {
            (Some(period), Some(last)) if k.in_service.is_some() => {
                let elapsed =
                    u64::try_from(obs.now.0.duration_since(last.0).as_secs().max(0)).unwrap_or(0);
                match period.as_secs().checked_sub(elapsed) {
                    Some(left) if left > 0 => Next::After(Duration::from_secs(left)),
                    // Due, yet nothing was verified (a rejected key waits for a change): look
                    // again a period later, not every second.
                    _ => Next::After(period),
                }
            }
            _ => Next::AwaitChange,
        }
    };
    Desired {
        secret: k.secret,
        status,
        events,
        next,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ORIGIN: &str = "https://api.openai.com:443";

    fn t(secs: i64) -> Time {
        Time(jiff::Timestamp::from_second(1_700_000_000 + secs).expect("valid"))
    }

    fn source(fp: &str) -> Source {
        Source::Present {
            fingerprint: fp.into(),
            masked_key: format!("sk-...{fp}"),
        }
    }

    fn observed(source: Source, managed: Managed, status: ProviderKeyStatus) -> Observed {
        Observed {
            generation: Some(1),
            status,
            managed_secret_name: "k-byok".into(),
            source,
            managed,
            active_key_id: Some("k1".into()),
            destination: Ok(ORIGIN.into()),
            interval: Ok(Some(DEFAULT_INTERVAL)),
            now: t(0),
            spread: 0.0,
        }
    }

    /// The key `fp` in service as version `version`, encrypted with k1, rotated at `t(at)`.
    fn serving(fp: &str, version: i64, at: i64) -> Managed {
        Managed::InService(InService {
            fingerprint: fp.into(),
            masked_key: format!("sk-...{fp}"),
            key_version: version,
            encryption_key_id: "k1".into(),
            rotated_at: Some(t(at)),
            origin: Some(ORIGIN.into()),
        })
    }

    fn failed(reason: Reason, message: &str) -> Verified {
        Verified {
            reason,
            message: message.into(),
        }
    }

    fn valid() -> Verified {
        failed(Reason::Valid, "the provider accepted the key")
    }

    fn cond<'a>(s: &'a ProviderKeyStatus, type_: &str) -> &'a Condition {
        status::find(&s.conditions, type_).expect("condition present")
    }

    fn ready(d: &Desired) -> (&str, &str) {
        let c = cond(&d.status, types::READY);
        (c.status.as_str(), c.reason.as_str())
    }

    /// Runs one full reconcile step and returns the desired state.
    fn step(obs: &Observed, result: Option<Verified>) -> Desired {
        let target = verification_target(obs);
        decide(obs, target, result.as_ref().filter(|_| target.is_some()))
    }

    /// `obs` after `d` was applied: the status written and the managed Secret as written.
    fn after(obs: &Observed, d: &Desired) -> Observed {
        let mut next = obs.clone();
        next.status = d.status.clone();
        if let (SecretWrite::PutSourceKey { key_version }, Source::Present { fingerprint, .. }) =
            (&d.secret, &obs.source)
        {
            next.managed = Managed::InService(InService {
                fingerprint: fingerprint.clone(),
                masked_key: format!("sk-...{fingerprint}"),
                key_version: *key_version,
                encryption_key_id: obs.active_key_id.clone().unwrap_or_default(),
                rotated_at: Some(obs.now.clone()),
                origin: obs.destination.clone().ok(),
            });
        }
        next
    }

    #[test]
    fn a_new_valid_key_goes_in_service_as_version_1_and_costs_one_call() {
        let obs = observed(source("aa"), Managed::Absent, ProviderKeyStatus::default());
        assert_eq!(verification_target(&obs), Some(Target::Source));
        let d = step(&obs, Some(valid()));
        assert_eq!(d.secret, SecretWrite::PutSourceKey { key_version: 1 });
        assert_eq!(d.status.key_version, Some(1));
        assert_eq!(d.status.fingerprint.as_deref(), Some("aa"));
        assert_eq!(ready(&d), ("True", "Valid"));
        assert_eq!(d.status.last_verified_time, Some(t(0)));
        assert_eq!(d.next, Next::After(DEFAULT_INTERVAL));
        assert_eq!(
            d.events.iter().map(|e| e.reason).collect::<Vec<_>>(),
            [EventReason::KeyInService]
        );
        // The reconcile our own writes trigger verifies nothing.
        assert_eq!(verification_target(&after(&obs, &d)), None);
    }

    #[test]
    fn an_invalid_new_key_writes_nothing_and_says_why() {
        let obs = observed(source("aa"), Managed::Absent, ProviderKeyStatus::default());
        let d = step(&obs, Some(failed(Reason::InvalidKey, "HTTP 401")));
        assert_eq!(d.secret, SecretWrite::Keep);
        assert_eq!(cond(&d.status, types::VERIFIED).reason, "InvalidKey");
        assert_eq!(ready(&d), ("False", "InvalidKey"));
        assert_eq!(d.status.rejected_fingerprint.as_deref(), Some("aa"));
        assert_eq!(d.events.len(), 1, "one KeyRejected Event: {:?}", d.events);
        // Rejected once: the same key is not verified again until something changes.
        assert_eq!(verification_target(&after(&obs, &d)), None);
    }

    #[test]
    fn rotation_to_a_bad_key_keeps_the_last_good_one() {
        let obs = observed(
            source("bb"),
            serving("aa", 1, 0),
            ProviderKeyStatus::default(),
        );
        let d = step(&obs, Some(failed(Reason::InvalidKey, "HTTP 401")));
        assert_eq!(d.secret, SecretWrite::Keep);
        assert_eq!(d.status.fingerprint.as_deref(), Some("aa"));
        assert_eq!(d.status.rejected_fingerprint.as_deref(), Some("bb"));
        assert_eq!(ready(&d), ("True", "PendingKeyRejected"));
        let verified = cond(&d.status, types::VERIFIED);
        assert_eq!(verified.reason, "InvalidKey");
        assert!(verified.message.contains("bb") && verified.message.contains("last good key"));
    }

    #[test]
    fn a_valid_rotation_bumps_the_version() {
        let obs = observed(
            source("bb"),
            serving("aa", 3, -100),
            ProviderKeyStatus::default(),
        );
        let d = step(&obs, Some(valid()));
        assert_eq!(d.secret, SecretWrite::PutSourceKey { key_version: 4 });
        assert_eq!(d.status.last_rotation_time, Some(t(0)));
    }

    #[test]
    fn an_outage_never_unverifies_a_verified_key() {
        let first = observed(source("aa"), Managed::Absent, ProviderKeyStatus::default());
        let good = step(&first, Some(valid()));
        let mut obs = after(&first, &good);
        obs.now = t(DEFAULT_INTERVAL.as_secs() as i64 + 5); // periodic re-verification due
        assert_eq!(verification_target(&obs), Some(Target::Source));
        let d = step(&obs, Some(failed(Reason::ProviderUnavailable, "HTTP 503")));
        assert_eq!(d.next, Next::Backoff);
        assert_eq!(cond(&d.status, types::VERIFIED).status, "True");
        assert_eq!(ready(&d), ("True", "Valid"));
        assert!(d.events.is_empty(), "{:?}", d.events);
        assert_eq!(
            verification_target(&after(&obs, &d)),
            Some(Target::Source),
            "the retry verifies again"
        );
    }

    #[test]
    fn operator_key_rotation_re_encrypts_without_verifying() {
        let first = observed(source("aa"), Managed::Absent, ProviderKeyStatus::default());
        let mut obs = after(&first, &step(&first, Some(valid())));
        obs.active_key_id = Some("k2".into());
        assert_eq!(verification_target(&obs), None);
        let d = step(&obs, None);
        assert_eq!(d.secret, SecretWrite::ReEncrypt);
        assert_eq!(d.status.encryption_key_id.as_deref(), Some("k2"));
    }

    #[test]
    fn source_problems_are_typed_reasons_with_one_event() {
        for reason in [
            Reason::SecretNotFound,
            Reason::SecretNotLabelled,
            Reason::SecretKeyMissing,
        ] {
            let obs = observed(
                Source::Unusable {
                    reason,
                    message: "why".into(),
                },
                Managed::Absent,
                ProviderKeyStatus::default(),
            );
            assert_eq!(verification_target(&obs), None);
            let d = step(&obs, None);
            assert_eq!(ready(&d), ("False", reason.as_str()));
            assert_eq!(cond(&d.status, types::VERIFIED).reason, reason.as_str());
            assert_eq!(
                d.events.iter().map(|e| e.reason).collect::<Vec<_>>(),
                [EventReason::Failed(reason)]
            );
            assert!(
                step(&after(&obs, &d), None).events.is_empty(),
                "deduplicated"
            );
        }
    }

    #[test]
    fn a_source_gone_after_import_keeps_the_key_in_service() {
        let first = observed(source("aa"), Managed::Absent, ProviderKeyStatus::default());
        let mut obs = after(&first, &step(&first, Some(valid())));
        obs.source = Source::Unusable {
            reason: Reason::SecretNotLabelled,
            message: "not labelled".into(),
        };
        let d = step(&obs, None);
        assert_eq!(ready(&d), ("True", "Valid"));
        assert_eq!(cond(&d.status, types::VERIFIED).reason, "SecretNotLabelled");
        assert_eq!(
            d.events.iter().map(|e| e.reason).collect::<Vec<_>>(),
            [EventReason::Failed(Reason::SecretNotLabelled)],
            "the source going away is worth a Warning even though the key stays in service"
        );
        obs.now = t(DEFAULT_INTERVAL.as_secs() as i64 + 1);
        assert_eq!(verification_target(&obs), Some(Target::InService));
    }

    #[test]
    fn blockers_stop_all_work_and_say_why() {
        let base = || {
            observed(
                source("aa"),
                serving("aa", 1, 0),
                ProviderKeyStatus::default(),
            )
        };
        let mut cases = Vec::new();
        let mut o = base();
        o.interval = Err("verification.interval: not a duration".into());
        cases.push((o, Reason::InvalidSpec));
        let mut o = base();
        o.managed = Managed::Conflict;
        cases.push((o, Reason::ManagedSecretConflict));
        let mut o = base();
        o.active_key_id = None;
        cases.push((o, Reason::KeyringUnavailable));
        let mut o = base();
        o.destination = Err(failed(Reason::BaseURLRejected, "port must be 443"));
        cases.push((o, Reason::BaseURLRejected));
        for (obs, reason) in cases {
            assert_eq!(verification_target(&obs), None, "{reason}");
            let d = decide(&obs, None, None);
            assert_eq!(d.secret, SecretWrite::Keep, "{reason}");
            assert_eq!(ready(&d), ("False", reason.as_str()));
            assert_eq!(d.events.len(), 1, "{reason}: one Warning Event");
            assert!(d.events[0].reason.is_warning());
            let again = decide(&after(&obs, &d), None, None);
            assert!(again.events.is_empty(), "{reason}: deduplicated");
        }
    }

    #[test]
    fn an_undecryptable_managed_secret_is_replaced_from_a_source_that_verifies() {
        let status = ProviderKeyStatus {
            key_version: Some(2),
            ..Default::default()
        };
        let obs = observed(source("aa"), Managed::Undecryptable, status);
        assert_eq!(verification_target(&obs), Some(Target::Source));
        let d = step(&obs, Some(valid()));
        assert_eq!(d.secret, SecretWrite::PutSourceKey { key_version: 3 });
        assert_eq!(ready(&d), ("True", "Valid"));

        let d = step(&obs, Some(failed(Reason::InvalidKey, "HTTP 401")));
        assert_eq!(d.secret, SecretWrite::Keep);
        assert_eq!(ready(&d), ("False", "DecryptionFailed"));
        let gone = observed(
            Source::Unusable {
                reason: Reason::SecretNotFound,
                message: "Secret raw not found".into(),
            },
            Managed::Undecryptable,
            ProviderKeyStatus::default(),
        );
        let d = step(&gone, None);
        assert_eq!(ready(&d), ("False", "DecryptionFailed"));
        assert!(
            d.events
                .iter()
                .any(|e| e.reason == EventReason::Failed(Reason::DecryptionFailed))
        );
    }

    #[test]
    fn a_key_in_service_never_goes_to_a_new_destination() {
        let first = observed(source("aa"), Managed::Absent, ProviderKeyStatus::default());
        let mut obs = after(&first, &step(&first, Some(valid())));
        obs.destination = Ok("https://elsewhere.example.com:443".into());
        // The source still holds the key: it is verified at the new destination first.
        assert_eq!(verification_target(&obs), Some(Target::Source));
        let d = step(&obs, Some(valid()));
        assert_eq!(
            d.secret,
            SecretWrite::PutSourceKey { key_version: 1 },
            "same key, same version, new origin recorded"
        );
        assert_eq!(ready(&d), ("True", "Valid"));

        // The source is gone: the key in service is not sent anywhere, and the status says so.
        obs.source = Source::Unusable {
            reason: Reason::SecretNotFound,
            message: "Secret raw not found".into(),
        };
        obs.now = t(DEFAULT_INTERVAL.as_secs() as i64 * 3);
        assert_eq!(verification_target(&obs), None);
        let d = step(&obs, None);
        assert_eq!(ready(&d), ("False", "DestinationChanged"));
        assert_eq!(d.secret, SecretWrite::Keep);
    }

    #[test]
    fn a_rejected_key_in_service_stays_out_of_service_when_a_bad_key_follows() {
        let first = observed(source("aa"), Managed::Absent, ProviderKeyStatus::default());
        let mut obs = after(&first, &step(&first, Some(valid())));
        obs.now = t(DEFAULT_INTERVAL.as_secs() as i64 + 5);
        let revoked = step(&obs, Some(failed(Reason::InvalidKey, "HTTP 401")));
        assert_eq!(ready(&revoked), ("False", "InvalidKey"));
        let mut obs = after(&obs, &revoked);
        // Nothing verifiable is due: come back a period later, not every second.
        assert_eq!(verification_target(&obs), None);
        assert_eq!(step(&obs, None).next, Next::After(DEFAULT_INTERVAL));
        // A bad key in the source does not put the revoked key back in service.
        obs.source = source("bb");
        let d = step(&obs, Some(failed(Reason::InvalidKey, "HTTP 401")));
        assert_eq!(ready(&d), ("False", "InvalidKey"));
        let d = step(&after(&obs, &d), None);
        assert_eq!(
            ready(&d),
            ("False", "InvalidKey"),
            "still out of service later"
        );
        // A good key heals it.
        obs.source = source("cc");
        obs.status.rejected_fingerprint = None;
        let d = step(&obs, Some(valid()));
        assert_eq!(ready(&d), ("True", "Valid"));
    }

    #[test]
    fn repeated_transient_failures_leave_the_status_alone() {
        let obs = observed(source("aa"), Managed::Absent, ProviderKeyStatus::default());
        let one = step(
            &obs,
            Some(failed(Reason::ProviderUnavailable, "HTTP 503 abc")),
        );
        let again = after(&obs, &one);
        let two = step(
            &again,
            Some(failed(Reason::ProviderUnavailable, "HTTP 503 xyz")),
        );
        assert_eq!(one.status, two.status, "no write, so no early wake-up");
    }

    #[test]
    fn a_restored_key_never_verified_here_is_due() {
        let obs = observed(
            Source::Unusable {
                reason: Reason::SecretNotFound,
                message: "gone".into(),
            },
            serving("aa", 3, 0),
            ProviderKeyStatus::default(),
        );
        assert_eq!(verification_target(&obs), Some(Target::InService));
    }

    #[test]
    fn reverification_is_spread_per_key_and_stable() {
        let spreads: Vec<f64> = (0..1000).map(|i| spread_for(&format!("uid-{i}"))).collect();
        assert!(spreads.iter().all(|s| s.abs() <= MAX_SPREAD));
        assert_eq!(spread_for("uid-7"), spreads[7], "stable across restarts");
        // A daily interval over 1,000 keys: no minute holds more than a handful.
        let mut per_minute = std::collections::HashMap::new();
        for s in &spreads {
            let due = DEFAULT_INTERVAL.mul_f64(1.0 + s).as_secs() / 60;
            *per_minute.entry(due).or_insert(0) += 1;
        }
        let busiest = per_minute.values().max().copied().unwrap_or(0);
        assert!(busiest <= 10, "{busiest} keys due in one minute");

        let first = observed(source("aa"), Managed::Absent, ProviderKeyStatus::default());
        let mut obs = after(&first, &step(&first, Some(valid())));
        obs.spread = -0.1;
        obs.now = t(DEFAULT_INTERVAL.mul_f64(0.9).as_secs() as i64 - 1);
        assert_eq!(verification_target(&obs), None, "not due yet");
        assert_eq!(step(&obs, None).next, Next::After(Duration::from_secs(1)));
        obs.now = t(DEFAULT_INTERVAL.mul_f64(0.9).as_secs() as i64);
        assert_eq!(verification_target(&obs), Some(Target::Source), "due");
    }

    #[test]
    fn periodic_reverification_comes_back_when_due() {
        let first = observed(source("aa"), Managed::Absent, ProviderKeyStatus::default());
        let mut obs = after(&first, &step(&first, Some(valid())));
        obs.now = t(3600);
        let d = step(&obs, None);
        assert_eq!(
            d.next,
            Next::After(DEFAULT_INTERVAL - Duration::from_secs(3600))
        );
        obs.interval = Ok(None);
        assert_eq!(step(&obs, None).next, Next::AwaitChange);
    }
}
