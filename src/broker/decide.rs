//! Whether a caller gets a key: a pure function of who the token says it is, the pod cache and
//! the ProviderKey cache. The HTTP status of every answer is decided here too.
//!
//! When the broker serves (the one table, also in DESIGN.md and the README):
//!
//! | the ProviderKey                                  | answer                      |
//! |--------------------------------------------------|-----------------------------|
//! | in another namespace than the caller's pod       | 403, whether it exists or not |
//! | not listed in the pod's annotation, or the pod is gone, recreated, not opted in | 403 |
//! | the token is not the injected sidecar's alone (pod created past the webhook, sidecar image swapped, ephemeral container) | 403 |
//! | does not exist                                   | 404 `ProviderKeyNotFound`, Warning Event on the pod |
//! | being deleted                                    | 404 `ProviderKeyDeleting`   |
//! | `consumers` set and the pod's ServiceAccount not in it | 403                   |
//! | exists, `Ready` is not `True`                    | 503 `KeyNotReady`, Warning Event on the pod |
//! | exists, `Ready=True` (a key in service)          | 200 with the key and a lease |

use super::jwt::TokenFault;
use crate::crd::ProviderKey;
use crate::names;

/// Who the token belongs to, from the TokenReview: a pod-bound ServiceAccount token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub namespace: String,
    pub service_account: String,
    pub pod_name: String,
    pub pod_uid: String,
}

/// What the pod cache holds about the caller's pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodFacts {
    pub uid: String,
    pub opted_in: bool,
    /// Its `byok.dev` token is readable only by the sidecar the webhook injected (see
    /// `webhook::patch::token_held_only_by_sidecar`): the key goes to that proxy, never to
    /// an application container.
    pub injected: bool,
    pub deleting: bool,
    /// Its sidecar trusts the broker through the namespace's trust bundle (this release on),
    /// not a CA in its env: served only while that bundle is the operator's.
    pub trusts_namespace_bundle: bool,
    /// When the pod was created (a bundle replaced later may not be what it mounted).
    pub created: Option<jiff::Timestamp>,
    /// The names in its `byok.dev/provider-keys` annotation (empty when malformed: the
    /// webhook refused such pods, so only a pod edited afterwards can have one).
    pub keys: Vec<String>,
}

/// The ProviderKey as the broker sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum KeyFacts<'a> {
    Missing,
    /// Stored but not readable as a ProviderKey (an object the schema let through).
    Unreadable,
    Present(&'a ProviderKey),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Serve,
    Deny(Denial),
}

/// Why not. `status()` is the HTTP status, `reason()` the word in the JSON answer and the
/// metric label, `message()` what the sidecar logs (no fact about another namespace).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denial {
    Unauthenticated,
    WrongAudience,
    NotPodBound,
    /// Refused by the broker's own checks before any TokenReview ([`super::jwt`]).
    TokenRejected(TokenFault),
    /// Too many TokenReviews in flight, for the token's namespace or in all: retry shortly.
    /// Only an uncached token gets it; cached answers never wait for a review.
    TooBusy,
    /// The TokenReview could not be made (the API server did not answer): retry.
    ReviewFailed,
    OtherNamespace,
    PodNotFound,
    PodNotOptedIn,
    PodNotInjected,
    KeyNotListed,
    ServiceAccountNotConsumer {
        service_account: String,
    },
    KeyNotFound,
    KeyDeleting,
    KeyNotReady {
        reason: String,
    },
    /// The key is Ready but the operator cannot hand it out right now (keyring, Secret read,
    /// Vertex token mint): a sidecar keeps the key it has until its lease ends.
    KeyUnavailable {
        reason: String,
    },
}

impl Denial {
    pub fn status(&self) -> u16 {
        match self {
            Denial::Unauthenticated
            | Denial::WrongAudience
            | Denial::NotPodBound
            | Denial::TokenRejected(_) => 401,
            Denial::KeyNotFound | Denial::KeyDeleting => 404,
            Denial::KeyNotReady { .. }
            | Denial::KeyUnavailable { .. }
            | Denial::TooBusy
            | Denial::ReviewFailed => 503,
            _ => 403,
        }
    }

    pub fn reason(&self) -> &'static str {
        match self {
            // Which local check refused a token is in the metric label, not the answer.
            Denial::Unauthenticated | Denial::TokenRejected(_) => "Unauthenticated",
            Denial::WrongAudience => "WrongAudience",
            Denial::NotPodBound => "NotPodBound",
            // One word for every refusal across namespaces and about other pods' keys:
            // the answer must not tell what exists.
            Denial::OtherNamespace
            | Denial::PodNotFound
            | Denial::PodNotOptedIn
            | Denial::PodNotInjected => "Forbidden",
            Denial::KeyNotListed => "Forbidden",
            Denial::ServiceAccountNotConsumer { .. } => "ServiceAccountNotAllowed",
            Denial::KeyNotFound => "ProviderKeyNotFound",
            Denial::KeyDeleting => "ProviderKeyDeleting",
            Denial::KeyNotReady { .. } => "KeyNotReady",
            Denial::KeyUnavailable { .. } => "KeyUnavailable",
            Denial::TooBusy => "TooBusy",
            Denial::ReviewFailed => "ReviewFailed",
        }
    }

    /// The label the answer is counted and logged by (finer than `reason()`).
    pub fn metric_label(&self) -> &'static str {
        match self {
            Denial::Unauthenticated => "unauthenticated",
            Denial::WrongAudience => "wrong_audience",
            Denial::NotPodBound => "not_pod_bound",
            Denial::TokenRejected(fault) => fault.metric_label(),
            Denial::TooBusy => "too_busy",
            Denial::ReviewFailed => "review_failed",
            Denial::OtherNamespace => "other_namespace",
            Denial::PodNotFound => "pod_not_found",
            Denial::PodNotOptedIn => "pod_not_opted_in",
            Denial::PodNotInjected => "pod_not_injected",
            Denial::KeyNotListed => "key_not_listed",
            Denial::ServiceAccountNotConsumer { .. } => "service_account_not_consumer",
            Denial::KeyNotFound => "key_not_found",
            Denial::KeyDeleting => "key_deleting",
            Denial::KeyNotReady { .. } => "key_not_ready",
            Denial::KeyUnavailable { .. } => "key_unavailable",
        }
    }

    pub fn message(&self) -> String {
        match self {
            Denial::Unauthenticated => "the token was not accepted (TokenReview)".into(),
            Denial::WrongAudience => format!(
                "the token is not for audience {}; mount a projected ServiceAccount token with that audience",
                names::TOKEN_AUDIENCE
            ),
            Denial::NotPodBound => "the token is not bound to a pod".into(),
            Denial::TokenRejected(fault) => fault.message().into(),
            Denial::TooBusy => "too many tokens are being reviewed right now; retry shortly".into(),
            Denial::ReviewFailed => "the token could not be reviewed; retry".into(),
            Denial::OtherNamespace
            | Denial::PodNotFound
            | Denial::PodNotOptedIn
            | Denial::PodNotInjected
            | Denial::KeyNotListed => format!(
                "forbidden: a pod gets only the ProviderKeys of its own namespace that it lists in {}, while it carries {}={}, and only through the sidecar the webhook injected",
                names::PROVIDER_KEYS_ANNOTATION,
                names::INJECT_LABEL,
                names::INJECT_VALUE
            ),
            Denial::ServiceAccountNotConsumer { service_account } => format!(
                "ServiceAccount {service_account:?} is not among the ProviderKey's spec.consumers.serviceAccounts"
            ),
            Denial::KeyNotFound => "the ProviderKey does not exist (yet); waiting for it".into(),
            Denial::KeyDeleting => "the ProviderKey is being deleted".into(),
            Denial::KeyNotReady { reason } => {
                format!(
                    "the ProviderKey has no key in service (Ready is not True: {reason}); waiting for it"
                )
            }
            Denial::KeyUnavailable { reason } => {
                format!("the key cannot be served right now ({reason}); retry")
            }
        }
    }

    /// Whether a sidecar must drop the key on this answer (as `proxy::refresh::is_final`
    /// reads it): the others are transient, the sidecar keeps its key until its lease ends.
    pub fn is_final(&self) -> bool {
        matches!(self.status(), 403 | 404) || matches!(self, Denial::KeyNotReady { .. })
    }

    /// Seconds for a `Retry-After` header, on answers a caller should retry soon.
    pub fn retry_after(&self) -> Option<u64> {
        matches!(self, Denial::TooBusy | Denial::ReviewFailed).then_some(1)
    }

    /// Whether the pod is waiting for its key, which the broker says on the pod as a
    /// Warning Event.
    pub fn is_waiting(&self) -> bool {
        matches!(
            self,
            Denial::KeyNotFound | Denial::KeyNotReady { .. } | Denial::KeyUnavailable { .. }
        )
    }
}

/// The decision, in the order that leaks nothing: the namespace first (before any lookup),
/// then the pod (exists with the token's uid, opted in, lists the key), then the key.
pub fn authorize(
    caller: &Caller,
    namespace: &str,
    name: &str,
    pod: Option<&PodFacts>,
    key: KeyFacts<'_>,
) -> Decision {
    use Decision::Deny;
    let pod = match check_pod(caller, namespace, pod) {
        Ok(pod) => pod,
        Err(denial) => return Deny(denial),
    };
    if !pod.injected {
        return Deny(Denial::PodNotInjected);
    }
    if !pod.keys.iter().any(|k| k == name) {
        return Deny(Denial::KeyNotListed);
    }
    let pk = match key {
        KeyFacts::Missing => return Deny(Denial::KeyNotFound),
        KeyFacts::Unreadable => {
            return Deny(Denial::KeyNotReady {
                reason: "the ProviderKey cannot be read".into(),
            });
        }
        KeyFacts::Present(pk) => pk,
    };
    if pk.metadata.deletion_timestamp.is_some() {
        return Deny(Denial::KeyDeleting);
    }
    if !pk.spec.admits_service_account(&caller.service_account) {
        return Deny(Denial::ServiceAccountNotConsumer {
            service_account: caller.service_account.clone(),
        });
    }
    match crate::status::ready_condition(pk) {
        Some((true, _)) => Decision::Serve,
        Some((false, reason)) => Deny(Denial::KeyNotReady { reason }),
        None => Deny(Denial::KeyNotReady {
            reason: "not reconciled yet".into(),
        }),
    }
}

/// The caller's namespace first (`pod` is not looked at for another one), then the pod its
/// token is bound to: in the pod cache with the token's uid (not a pod recreated under the
/// same name), not being deleted, opted in. Also the token pre-check's
/// ([`super::jwt::precheck`]), so a made-up token naming a pod is refused as a real one
/// would be, before any TokenReview.
pub fn check_pod<'a>(
    caller: &Caller,
    namespace: &str,
    pod: Option<&'a PodFacts>,
) -> Result<&'a PodFacts, Denial> {
    if caller.namespace != namespace {
        return Err(Denial::OtherNamespace);
    }
    let pod = pod
        .filter(|p| p.uid == caller.pod_uid && !p.deleting)
        .ok_or(Denial::PodNotFound)?;
    if !pod.opted_in {
        return Err(Denial::PodNotOptedIn);
    }
    Ok(pod)
}

/// The answer to a caller whose token cannot be reviewed right now (`transient`: `TooBusy`
/// or `ReviewFailed`), given the decision made on the token's locally verified claims: a
/// final refusal stays final (a flood of reviews must not keep a revoked key alive in a
/// sidecar until its lease ends); anything else, `Serve` included, is `transient`. Never
/// the key without a review.
pub fn unreviewed(decision: Decision, transient: Denial) -> Denial {
    match decision {
        Decision::Deny(denial) if denial.is_final() => denial,
        _ => transient,
    }
}

/// The caller behind a TokenReview's user, when the token is a pod-bound ServiceAccount
/// token: `system:serviceaccount:<ns>:<sa>` with the pod name and uid in `extra`.
pub fn caller_from_user(
    username: &str,
    extra: &std::collections::BTreeMap<String, Vec<String>>,
) -> Option<Caller> {
    let rest = username.strip_prefix("system:serviceaccount:")?;
    let (namespace, service_account) = rest.split_once(':')?;
    let one = |key: &str| {
        extra
            .get(key)
            .and_then(|v| v.first())
            .filter(|v| !v.is_empty())
            .cloned()
    };
    Some(Caller {
        namespace: namespace.to_string(),
        service_account: service_account.to_string(),
        pod_name: one("authentication.kubernetes.io/pod-name")?,
        pod_uid: one("authentication.kubernetes.io/pod-uid")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller() -> Caller {
        Caller {
            namespace: "team".into(),
            service_account: "app".into(),
            pod_name: "p".into(),
            pod_uid: "u1".into(),
        }
    }

    fn pod(keys: &[&str]) -> PodFacts {
        PodFacts {
            uid: "u1".into(),
            opted_in: true,
            injected: true,
            deleting: false,
            trusts_namespace_bundle: true,
            created: None,
            keys: keys.iter().map(|k| k.to_string()).collect(),
        }
    }

    fn pk(ready: Option<&str>, consumers: &[&str]) -> ProviderKey {
        let mut value = serde_json::json!({
            "apiVersion": "byok.dev/v1alpha1", "kind": "ProviderKey",
            "metadata": {"name": "k", "namespace": "team"},
            "spec": {"provider": "anthropic", "secretRef": {"name": "raw"},
                     "consumers": {"serviceAccounts": consumers}},
        });
        if let Some(status) = ready {
            value["status"] = serde_json::json!({"conditions": [{
                "type": "Ready", "status": status, "reason": "Verified", "message": "",
                "lastTransitionTime": "2026-01-01T00:00:00Z"}]});
        }
        serde_json::from_value(value).expect("ProviderKey")
    }

    #[test]
    fn the_right_pod_gets_a_ready_key() {
        let k = pk(Some("True"), &[]);
        let d = authorize(
            &caller(),
            "team",
            "k",
            Some(&pod(&["k"])),
            KeyFacts::Present(&k),
        );
        assert_eq!(d, Decision::Serve);
    }

    #[test]
    fn another_namespace_is_refused_the_same_whether_the_key_exists_or_not() {
        let k = pk(Some("True"), &[]);
        let p = pod(&["k"]);
        let exists = authorize(&caller(), "other", "k", Some(&p), KeyFacts::Present(&k));
        let missing = authorize(&caller(), "other", "k", Some(&p), KeyFacts::Missing);
        assert_eq!(exists, Decision::Deny(Denial::OtherNamespace));
        assert_eq!(exists, missing);
        let Decision::Deny(d) = exists else {
            unreachable!()
        };
        assert_eq!((d.status(), d.reason()), (403, "Forbidden"));
    }

    #[test]
    fn pod_checks_come_before_the_key() {
        let k = pk(Some("True"), &[]);
        let present = KeyFacts::Present(&k);
        let deny = |p: Option<&PodFacts>| authorize(&caller(), "team", "k", p, present);
        assert_eq!(deny(None), Decision::Deny(Denial::PodNotFound));
        let recreated = PodFacts {
            uid: "u2".into(),
            ..pod(&["k"])
        };
        assert_eq!(deny(Some(&recreated)), Decision::Deny(Denial::PodNotFound));
        let deleting = PodFacts {
            deleting: true,
            ..pod(&["k"])
        };
        assert_eq!(deny(Some(&deleting)), Decision::Deny(Denial::PodNotFound));
        let unlabelled = PodFacts {
            opted_in: false,
            ..pod(&["k"])
        };
        assert_eq!(
            deny(Some(&unlabelled)),
            Decision::Deny(Denial::PodNotOptedIn)
        );
        // Labelled, listing the key, but its token is not the injected sidecar's alone.
        let past_the_webhook = PodFacts {
            injected: false,
            ..pod(&["k"])
        };
        let refused = deny(Some(&past_the_webhook));
        assert_eq!(refused, Decision::Deny(Denial::PodNotInjected));
        if let Decision::Deny(d) = refused {
            assert_eq!((d.status(), d.reason()), (403, "Forbidden"));
            assert_eq!(
                d.message(),
                Denial::KeyNotListed.message(),
                "one refusal for all"
            );
        }
        assert_eq!(
            deny(Some(&pod(&["other"]))),
            Decision::Deny(Denial::KeyNotListed)
        );
        // A key the pod did not list is refused alike whether it exists or not.
        assert_eq!(
            authorize(
                &caller(),
                "team",
                "k",
                Some(&pod(&["x"])),
                KeyFacts::Missing
            ),
            Decision::Deny(Denial::KeyNotListed)
        );
    }

    #[test]
    fn key_state_decides_last() {
        let p = pod(&["k"]);
        let decide = |k: KeyFacts<'_>| authorize(&caller(), "team", "k", Some(&p), k);
        assert_eq!(
            decide(KeyFacts::Missing),
            Decision::Deny(Denial::KeyNotFound)
        );
        let not_ready = pk(Some("False"), &[]);
        assert!(matches!(
            decide(KeyFacts::Present(&not_ready)),
            Decision::Deny(Denial::KeyNotReady { .. })
        ));
        let fresh = pk(None, &[]);
        assert!(matches!(
            decide(KeyFacts::Present(&fresh)),
            Decision::Deny(Denial::KeyNotReady { .. })
        ));
        let mut deleting = pk(Some("True"), &[]);
        deleting.metadata.deletion_timestamp = Some(
            k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff::Timestamp::UNIX_EPOCH),
        );
        assert_eq!(
            decide(KeyFacts::Present(&deleting)),
            Decision::Deny(Denial::KeyDeleting)
        );
        let narrowed = pk(Some("True"), &["batch"]);
        assert_eq!(
            decide(KeyFacts::Present(&narrowed)),
            Decision::Deny(Denial::ServiceAccountNotConsumer {
                service_account: "app".into()
            })
        );
        let listed = pk(Some("True"), &["batch", "app"]);
        assert_eq!(decide(KeyFacts::Present(&listed)), Decision::Serve);
    }

    /// What the broker calls final is what makes a sidecar drop its key, for every refusal;
    /// the ones about the token alone, or about being busy, never are.
    #[test]
    fn final_refusals_are_the_ones_the_sidecar_drops_its_key_on() {
        use super::super::jwt::TokenFault::*;
        let reason = || "r".to_string();
        let all = [
            Denial::Unauthenticated,
            Denial::WrongAudience,
            Denial::NotPodBound,
            Denial::TooBusy,
            Denial::ReviewFailed,
            Denial::OtherNamespace,
            Denial::PodNotFound,
            Denial::PodNotOptedIn,
            Denial::PodNotInjected,
            Denial::KeyNotListed,
            Denial::ServiceAccountNotConsumer {
                service_account: "a".into(),
            },
            Denial::KeyNotFound,
            Denial::KeyDeleting,
            Denial::KeyNotReady { reason: reason() },
            Denial::KeyUnavailable { reason: reason() },
        ]
        .into_iter()
        .chain(
            [
                Malformed,
                Algorithm,
                Expired,
                NotYetValid,
                WrongIssuer,
                UnknownKey,
                BadSignature,
            ]
            .map(Denial::TokenRejected),
        );
        for d in all {
            assert_eq!(
                d.is_final(),
                crate::proxy::refresh::is_final(d.status(), d.reason()),
                "{d:?}"
            );
            let about_the_token = d.status() == 401;
            let transient = matches!(d, Denial::TooBusy | Denial::ReviewFailed);
            if about_the_token || transient {
                assert!(!d.is_final(), "{d:?}");
            }
            assert_eq!(d.retry_after().is_some(), transient, "{d:?}");
            if let Denial::TokenRejected(fault) = &d {
                assert_eq!((d.status(), d.reason()), (401, "Unauthenticated"));
                assert!(d.metric_label().starts_with("token_"), "{d:?}");
                assert!(!d.message().contains(fault.metric_label()));
            }
        }
    }

    #[test]
    fn an_unreviewed_caller_gets_final_refusals_never_the_key() {
        let busy = || Denial::TooBusy;
        assert_eq!(unreviewed(Decision::Serve, busy()), Denial::TooBusy);
        for final_ in [
            Denial::KeyNotFound,
            Denial::KeyDeleting,
            Denial::PodNotFound,
            Denial::KeyNotListed,
            Denial::KeyNotReady { reason: "r".into() },
        ] {
            assert_eq!(unreviewed(Decision::Deny(final_.clone()), busy()), final_);
        }
        let transient = Denial::KeyUnavailable { reason: "r".into() };
        assert_eq!(
            unreviewed(Decision::Deny(transient), Denial::ReviewFailed),
            Denial::ReviewFailed
        );
    }

    #[test]
    fn only_pod_bound_service_account_tokens_are_callers() {
        let extra = std::collections::BTreeMap::from([
            (
                "authentication.kubernetes.io/pod-name".to_string(),
                vec!["p".to_string()],
            ),
            (
                "authentication.kubernetes.io/pod-uid".to_string(),
                vec!["u1".to_string()],
            ),
        ]);
        assert_eq!(
            caller_from_user("system:serviceaccount:team:app", &extra),
            Some(caller())
        );
        assert_eq!(caller_from_user("alice", &extra), None);
        assert_eq!(
            caller_from_user("system:serviceaccount:team:app", &Default::default()),
            None
        );
    }
}
