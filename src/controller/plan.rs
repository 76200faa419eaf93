//! The pure heart of reconciliation: from what was observed (and, when one ran, the result of a
//! verification) to the desired managed Secret and status. No IO, no clock: `now` comes in.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::crd::ProviderKeyStatus;
use crate::reason::Reason;
use crate::status::{self, Decided, Status, ready_reasons, types};

/// Shortest periodic re-verification interval; anything lower would hammer the provider.
pub const MIN_INTERVAL: Duration = Duration::from_secs(60);
/// Used when `spec.verification.interval` is not set.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(24 * 3600);

/// The key currently in service, as recorded on the managed Secret (non-secret facts only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InService {
    pub fingerprint: String,
    pub masked_key: String,
    pub key_version: i64,
    pub encryption_key_id: String,
    pub rotated_at: Option<Time>,
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
    pub source: Source,
    pub in_service: Option<InService>,
    pub active_key_id: String,
    pub interval: Option<Duration>,
    pub now: Time,
}

/// Which key a verification call checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The key in the source Secret (new, rotated, or after a spec change).
    Source,
    /// The key in service, for periodic re-verification when the source is unchanged or gone.
    InService,
}

/// The outcome of a verification call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub reason: Reason,
    pub message: String,
}

/// What the managed Secret should become.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretWrite {
    /// Leave it as it is.
    Keep,
    /// Put the source key in service (encrypted with the active operator key).
    PutSourceKey { key_version: i64 },
    /// Same key, re-encrypted with the active operator key (after an operator key rotation).
    ReEncrypt,
}

/// A Kubernetes Event to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventNote {
    pub warning: bool,
    pub reason: &'static str,
    pub note: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Desired {
    pub secret: SecretWrite,
    pub status: ProviderKeyStatus,
    pub events: Vec<EventNote>,
    /// Retry with backoff (a transient failure).
    pub transient: bool,
    /// When to look again when nothing changes (periodic re-verification).
    pub requeue_after: Option<Duration>,
}

fn interval_elapsed(obs: &Observed) -> bool {
    let (Some(interval), Some(last)) = (obs.interval, obs.status.last_verified_time.as_ref())
    else {
        return false;
    };
    let elapsed = obs.now.0.duration_since(last.0);
    elapsed.as_secs() >= interval.as_secs() as i64
}

fn condition_is(obs: &Observed, type_: &str, status: Status) -> bool {
    status::find(&obs.status.conditions, type_).is_some_and(|c| c.status == status.as_str())
}

/// A `Verified=False` condition for a rejected key, with a warning Event unless the same
/// rejection is already on the status (so a repeat says nothing new).
fn rejection(
    previous: Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>,
    reason: Reason,
    message: String,
    events: &mut Vec<EventNote>,
) -> Decided {
    let repeated = previous.is_some_and(|c| {
        c.status == "False" && c.reason == reason.as_str() && c.message == message
    });
    if !repeated {
        events.push(EventNote {
            warning: true,
            reason: "KeyRejected",
            note: message.clone(),
        });
    }
    Decided::new(types::VERIFIED, Status::False, reason.as_str(), message)
}

/// Decides whether a live verification is needed, and of which key.
pub fn verification_target(obs: &Observed) -> Option<Target> {
    let spec_changed = obs.status.observed_generation != obs.generation;
    match (&obs.source, &obs.in_service) {
        (Source::Present { fingerprint, .. }, in_service) => {
            let is_in_service = in_service
                .as_ref()
                .is_some_and(|s| &s.fingerprint == fingerprint);
            let already_rejected =
                obs.status.rejected_fingerprint.as_deref() == Some(fingerprint.as_str());
            let verified_ok = condition_is(obs, types::VERIFIED, Status::True);
            if !is_in_service {
                // A new or rotated key; a key we already rejected waits for a change.
                (!already_rejected || spec_changed).then_some(Target::Source)
            } else if spec_changed || !verified_ok || interval_elapsed(obs) {
                Some(Target::Source)
            } else {
                None
            }
        }
        (Source::Unusable { .. }, Some(_)) => interval_elapsed(obs).then_some(Target::InService),
        (Source::Unusable { .. }, None) => None,
    }
}

/// Builds the desired state from the observation and the verification result (if one ran).
pub fn decide(obs: &Observed, target: Option<Target>, result: Option<&Verified>) -> Desired {
    let mut status = ProviderKeyStatus {
        observed_generation: obs.generation,
        last_verified_time: obs.status.last_verified_time.clone(),
        ..Default::default()
    };
    let mut events = Vec::new();
    let mut secret = SecretWrite::Keep;
    let mut transient = false;
    let mut rejected_fingerprint = obs.status.rejected_fingerprint.clone();
    let mut in_service = obs.in_service.clone();
    let previous_verified = status::find(&obs.status.conditions, types::VERIFIED);
    // Carry the Verified condition forward unless something new is learned.
    let mut verified = previous_verified.map(|c| {
        let s = match c.status.as_str() {
            "True" => Status::True,
            "False" => Status::False,
            _ => Status::Unknown,
        };
        Decided::new(types::VERIFIED, s, c.reason.clone(), c.message.clone())
    });

    match (&obs.source, target, result) {
        (Source::Unusable { reason, message }, _, _) if target.is_none() || result.is_none() => {
            verified = Some(Decided::new(
                types::VERIFIED,
                Status::False,
                reason.as_str(),
                message.clone(),
            ));
        }
        (
            Source::Present {
                fingerprint,
                masked_key,
            },
            Some(Target::Source),
            Some(v),
        ) => {
            let is_new = in_service
                .as_ref()
                .is_none_or(|s| &s.fingerprint != fingerprint);
            if v.reason == Reason::Valid {
                status.last_verified_time = Some(obs.now.clone());
                rejected_fingerprint = None;
                verified = Some(Decided::new(
                    types::VERIFIED,
                    Status::True,
                    Reason::Valid.as_str(),
                    v.message.clone(),
                ));
                if is_new {
                    let key_version = in_service.as_ref().map_or(1, |s| s.key_version + 1);
                    secret = SecretWrite::PutSourceKey { key_version };
                    in_service = Some(InService {
                        fingerprint: fingerprint.clone(),
                        masked_key: masked_key.clone(),
                        key_version,
                        encryption_key_id: obs.active_key_id.clone(),
                        rotated_at: Some(obs.now.clone()),
                    });
                    let note = if key_version == 1 {
                        format!("key {fingerprint} verified and put in service")
                    } else {
                        format!("key rotated to {fingerprint} (version {key_version})")
                    };
                    events.push(EventNote {
                        warning: false,
                        reason: "KeyInService",
                        note,
                    });
                }
            } else if v.reason.is_transient() {
                transient = true;
                if is_new {
                    let msg = format!(
                        "could not verify key {fingerprint} yet: {}; retrying",
                        v.message
                    );
                    verified = Some(Decided::new(
                        types::VERIFIED,
                        Status::Unknown,
                        v.reason.as_str(),
                        msg,
                    ));
                }
                // A transient failure never turns a verified key invalid: Verified stays as it was.
            } else {
                let msg = if is_new && in_service.is_some() {
                    rejected_fingerprint = Some(fingerprint.clone());
                    format!(
                        "new key {fingerprint} rejected: {}; the last good key stays in service",
                        v.message
                    )
                } else {
                    if is_new {
                        rejected_fingerprint = Some(fingerprint.clone());
                    }
                    format!("key {fingerprint} rejected: {}", v.message)
                };
                verified = Some(rejection(previous_verified, v.reason, msg, &mut events));
            }
        }
        (_, Some(Target::InService), Some(v)) => {
            if v.reason == Reason::Valid {
                status.last_verified_time = Some(obs.now.clone());
            } else if v.reason.is_transient() {
                transient = true;
            } else {
                let msg = format!("key in service rejected on re-verification: {}", v.message);
                verified = Some(rejection(previous_verified, v.reason, msg, &mut events));
            }
            if let Source::Unusable { reason, message } = &obs.source
                && v.reason == Reason::Valid
            {
                verified = Some(Decided::new(
                    types::VERIFIED,
                    Status::False,
                    reason.as_str(),
                    message.clone(),
                ));
            }
        }
        _ => {}
    }

    // The operator key was rotated: re-encrypt what is in service (no verification needed).
    if let (SecretWrite::Keep, Some(s)) = (&secret, in_service.as_mut())
        && s.encryption_key_id != obs.active_key_id
    {
        secret = SecretWrite::ReEncrypt;
        events.push(EventNote {
            warning: false,
            reason: "ReEncrypted",
            note: format!(
                "managed Secret re-encrypted with operator key {}",
                obs.active_key_id
            ),
        });
        s.encryption_key_id = obs.active_key_id.clone();
    }

    let verified = verified.unwrap_or_else(|| {
        Decided::new(
            types::VERIFIED,
            Status::Unknown,
            ready_reasons::PENDING,
            "verification has not run yet",
        )
    });
    let in_service_rejected = verified.status == Status::False
        && rejected_fingerprint.is_none()
        && matches!(&obs.source, Source::Present { .. });
    let ready = match &in_service {
        None => {
            let (reason, message) = if verified.status == Status::Unknown && !transient {
                (
                    ready_reasons::PENDING.to_string(),
                    "waiting for the first verification".to_string(),
                )
            } else {
                (verified.reason.clone(), verified.message.clone())
            };
            Decided::new(types::READY, Status::False, reason, message)
        }
        Some(_) if in_service_rejected => Decided::new(
            types::READY,
            Status::False,
            verified.reason.clone(),
            verified.message.clone(),
        ),
        Some(s) if rejected_fingerprint.is_some() => Decided::new(
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
    };

    // A generation whose verification failed transiently is not observed yet: keeping the old
    // observedGeneration makes the retry verify again.
    // (Nor is the status changed for it, so the retry is not re-triggered early by our own write.)
    if transient {
        status.observed_generation = obs.status.observed_generation;
    }
    status.conditions = status::merge(
        &obs.status.conditions,
        &[ready, verified],
        status.observed_generation,
        &obs.now,
    );
    status.rejected_fingerprint = rejected_fingerprint;
    if let Some(s) = &in_service {
        status.fingerprint = Some(s.fingerprint.clone());
        status.masked_key = Some(s.masked_key.clone());
        status.key_version = Some(s.key_version);
        status.encryption_key_id = Some(s.encryption_key_id.clone());
        status.last_rotation_time = s.rotated_at.clone();
    }

    let requeue_after = match (obs.interval, &status.last_verified_time) {
        (Some(interval), Some(last)) => {
            let elapsed = obs.now.0.duration_since(last.0).as_secs().max(0) as u64;
            Some(Duration::from_secs(
                interval.as_secs().saturating_sub(elapsed).max(1),
            ))
        }
        _ => None,
    };
    Desired {
        secret,
        status,
        events,
        transient,
        requeue_after,
    }
}

/// The effective re-verification interval: `Ok(None)` when disabled with `0`; an error is a
/// bad `spec.verification.interval`, to be reported as `InvalidSpec`.
pub fn effective_interval(
    spec: Option<&crate::crd::VerificationSpec>,
) -> Result<Option<Duration>, crate::interval::IntervalError> {
    crate::interval::effective_interval(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: i64) -> Time {
        Time(jiff::Timestamp::from_second(1_700_000_000 + secs).expect("valid"))
    }

    fn source(fp: &str) -> Source {
        Source::Present {
            fingerprint: fp.into(),
            masked_key: format!("sk-...{fp}"),
        }
    }

    fn observed(
        source: Source,
        in_service: Option<InService>,
        status: ProviderKeyStatus,
    ) -> Observed {
        Observed {
            generation: Some(1),
            status,
            source,
            in_service,
            active_key_id: "k1".into(),
            interval: Some(DEFAULT_INTERVAL),
            now: t(0),
        }
    }

    /// The key `fp` in service as version `version`, encrypted with k1, rotated at `t(at)`.
    fn serving(fp: &str, version: i64, at: i64) -> InService {
        InService {
            fingerprint: fp.into(),
            masked_key: format!("sk-...{fp}"),
            key_version: version,
            encryption_key_id: "k1".into(),
            rotated_at: Some(t(at)),
        }
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

    fn cond<'a>(
        s: &'a ProviderKeyStatus,
        type_: &str,
    ) -> &'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
        status::find(&s.conditions, type_).expect("condition present")
    }

    /// Runs one full reconcile step and returns the desired state.
    fn step(obs: &Observed, result: Option<Verified>) -> Desired {
        let target = verification_target(obs);
        decide(obs, target, result.as_ref().filter(|_| target.is_some()))
    }

    #[test]
    fn a_new_valid_key_goes_in_service_as_version_1() {
        let obs = observed(source("aa"), None, ProviderKeyStatus::default());
        assert_eq!(verification_target(&obs), Some(Target::Source));
        let d = step(&obs, Some(valid()));
        assert_eq!(d.secret, SecretWrite::PutSourceKey { key_version: 1 });
        assert_eq!(d.status.key_version, Some(1));
        assert_eq!(d.status.fingerprint.as_deref(), Some("aa"));
        assert_eq!(cond(&d.status, types::READY).status, "True");
        assert_eq!(cond(&d.status, types::READY).reason, "Valid");
        assert_eq!(d.status.last_verified_time, Some(t(0)));
        assert_eq!(d.requeue_after, Some(DEFAULT_INTERVAL));
    }

    #[test]
    fn an_invalid_new_key_writes_nothing_and_says_why() {
        let obs = observed(source("aa"), None, ProviderKeyStatus::default());
        let d = step(&obs, Some(failed(Reason::InvalidKey, "HTTP 401")));
        assert_eq!(d.secret, SecretWrite::Keep);
        assert_eq!(cond(&d.status, types::VERIFIED).reason, "InvalidKey");
        assert_eq!(cond(&d.status, types::READY).status, "False");
        assert_eq!(d.status.rejected_fingerprint.as_deref(), Some("aa"));
        // Rejected once: the same key is not verified again until something changes.
        let again = observed(source("aa"), None, d.status.clone());
        assert_eq!(verification_target(&again), None);
    }

    #[test]
    fn rotation_to_a_bad_key_keeps_the_last_good_one() {
        let good = step(
            &observed(source("aa"), None, ProviderKeyStatus::default()),
            Some(valid()),
        );
        let in_service = serving("aa", 1, 0);
        let obs = observed(source("bb"), Some(in_service), good.status);
        let d = step(&obs, Some(failed(Reason::InvalidKey, "HTTP 401")));
        assert_eq!(d.secret, SecretWrite::Keep);
        assert_eq!(
            d.status.fingerprint.as_deref(),
            Some("aa"),
            "old key still in service"
        );
        assert_eq!(d.status.rejected_fingerprint.as_deref(), Some("bb"));
        let ready = cond(&d.status, types::READY);
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("True", "PendingKeyRejected")
        );
        let verified = cond(&d.status, types::VERIFIED);
        assert_eq!(verified.reason, "InvalidKey");
        assert!(verified.message.contains("bb") && verified.message.contains("last good key"));
    }

    #[test]
    fn a_valid_rotation_bumps_the_version() {
        let in_service = serving("aa", 3, -100);
        let d = step(
            &observed(source("bb"), Some(in_service), ProviderKeyStatus::default()),
            Some(valid()),
        );
        assert_eq!(d.secret, SecretWrite::PutSourceKey { key_version: 4 });
        assert_eq!(d.status.last_rotation_time, Some(t(0)));
    }

    #[test]
    fn an_outage_never_unverifies_a_verified_key() {
        let good = step(
            &observed(source("aa"), None, ProviderKeyStatus::default()),
            Some(valid()),
        );
        let in_service = serving("aa", 1, 0);
        let mut obs = observed(source("aa"), Some(in_service), good.status);
        obs.now = t(DEFAULT_INTERVAL.as_secs() as i64 + 5); // periodic re-verification due
        assert_eq!(verification_target(&obs), Some(Target::Source));
        let d = step(&obs, Some(failed(Reason::ProviderUnavailable, "HTTP 503")));
        assert!(d.transient);
        assert_eq!(cond(&d.status, types::VERIFIED).status, "True");
        assert_eq!(cond(&d.status, types::READY).status, "True");
        let mut retry = obs.clone();
        retry.status = d.status.clone();
        assert_eq!(
            verification_target(&retry),
            Some(Target::Source),
            "the retry verifies again"
        );
    }

    #[test]
    fn operator_key_rotation_re_encrypts_without_verifying() {
        let good = step(
            &observed(source("aa"), None, ProviderKeyStatus::default()),
            Some(valid()),
        );
        let in_service = serving("aa", 1, 0);
        let mut obs = observed(source("aa"), Some(in_service), good.status);
        obs.active_key_id = "k2".into();
        assert_eq!(verification_target(&obs), None);
        let d = step(&obs, None);
        assert_eq!(d.secret, SecretWrite::ReEncrypt);
        assert_eq!(d.status.encryption_key_id.as_deref(), Some("k2"));
    }

    #[test]
    fn a_missing_secret_is_a_typed_reason() {
        let obs = observed(
            Source::Unusable {
                reason: Reason::SecretNotFound,
                message: "Secret raw not found".into(),
            },
            None,
            ProviderKeyStatus::default(),
        );
        assert_eq!(verification_target(&obs), None);
        let d = step(&obs, None);
        assert_eq!(cond(&d.status, types::READY).reason, "SecretNotFound");
        assert_eq!(cond(&d.status, types::VERIFIED).reason, "SecretNotFound");
    }

    #[test]
    fn interval_zero_disables_and_small_intervals_are_raised() {
        let spec = |s: &str| crate::crd::VerificationSpec {
            interval: Some(s.to_string()),
        };
        assert_eq!(effective_interval(Some(&spec("0"))), Ok(None));
        assert_eq!(
            effective_interval(Some(&spec("1s"))),
            Ok(Some(MIN_INTERVAL))
        );
        assert_eq!(
            effective_interval(Some(&spec("2h"))),
            Ok(Some(Duration::from_secs(7200)))
        );
        assert_eq!(effective_interval(None), Ok(Some(DEFAULT_INTERVAL)));
        assert!(effective_interval(Some(&spec("1h-1h"))).is_err());
    }
}
