//! Who a bearer token belongs to: a TokenReview, whose result is cached by the token's hash
//! until the token expires or for [`REVIEW_TTL`], whichever comes first. Only the review is
//! cached: pod existence is checked against the pod cache on every request, so a deleted or
//! recreated pod is refused at once.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use base64::Engine;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::{Api, PostParams};
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use super::decide::{Caller, Denial, caller_from_user};
use crate::names;

/// The longest a review is trusted.
pub const REVIEW_TTL: Duration = Duration::from_secs(60);
/// A refused token is remembered this long, so a caller retrying a bad token costs the API
/// server one review per this period.
const REFUSAL_TTL: Duration = Duration::from_secs(10);
/// Reviews remembered before the cache starts over.
const MAX_ENTRIES: usize = 65_536;

/// A review's answer and until when it is trusted, by SHA-256 of the token.
type ReviewCache = HashMap<[u8; 32], (Instant, Result<Caller, Denial>)>;

pub struct TokenReviews {
    api: Api<TokenReview>,
    cache: Mutex<ReviewCache>,
}

impl TokenReviews {
    pub fn new(client: kube::Client) -> Self {
        Self {
            api: Api::all(client),
            cache: Mutex::default(),
        }
    }

    /// The caller behind `token`, or why the token is refused. `Err` of the outer result:
    /// the API server could not be asked (the answer is 503, and nothing is cached).
    pub async fn review(
        &self,
        token: &SecretString,
    ) -> Result<Result<Caller, Denial>, kube::Error> {
        let hash: [u8; 32] = Sha256::digest(token.expose_secret().as_bytes()).into();
        let now = Instant::now();
        if let Some((until, answer)) = self
            .cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&hash)
            && *until > now
        {
            return Ok(answer.clone());
        }
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: token.expose_secret().to_string(),
                audiences: Some(vec![names::TOKEN_AUDIENCE.to_string()]),
            },
            ..Default::default()
        };
        let reviewed = self.api.create(&PostParams::default(), &review).await?;
        let answer = judge(&reviewed);
        let ttl = match &answer {
            Ok(_) => token_lifetime(token.expose_secret(), jiff::Timestamp::now())
                .map_or(REVIEW_TTL, |left| left.min(REVIEW_TTL)),
            Err(_) => REFUSAL_TTL,
        };
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= MAX_ENTRIES {
            cache.retain(|_, (until, _)| *until > now);
            if cache.len() >= MAX_ENTRIES {
                cache.clear();
            }
        }
        cache.insert(hash, (now + ttl, answer.clone()));
        Ok(answer)
    }
}

/// The review's verdict: authenticated, for our audience, and a pod-bound ServiceAccount.
fn judge(review: &TokenReview) -> Result<Caller, Denial> {
    let status = review.status.as_ref().ok_or(Denial::Unauthenticated)?;
    if status.authenticated != Some(true) {
        return Err(Denial::Unauthenticated);
    }
    // The API server echoes the audiences the token is valid for among those we asked
    // about; an empty list would mean it ignored ours.
    if !status
        .audiences
        .as_ref()
        .is_some_and(|a| a.iter().any(|a| a == names::TOKEN_AUDIENCE))
    {
        return Err(Denial::WrongAudience);
    }
    let user = status.user.as_ref().ok_or(Denial::Unauthenticated)?;
    caller_from_user(
        user.username.as_deref().unwrap_or_default(),
        &user.extra.clone().unwrap_or_default(),
    )
    .ok_or(Denial::NotPodBound)
}

/// How long until the JWT's `exp`, read without checking the signature (the TokenReview
/// did that): only to not trust a review past the token's own end.
fn token_lifetime(token: &str, now: jiff::Timestamp) -> Option<Duration> {
    let payload = token.split('.').nth(1)?;
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let exp = serde_json::from_slice::<serde_json::Value>(&json)
        .ok()?
        .get("exp")?
        .as_i64()?;
    let left = exp.checked_sub(now.as_second())?;
    Some(Duration::from_secs(u64::try_from(left).unwrap_or(0)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::authentication::v1::{TokenReviewStatus, UserInfo};

    fn review(authenticated: bool, audiences: &[&str], username: &str, bound: bool) -> TokenReview {
        let extra = bound.then(|| {
            std::collections::BTreeMap::from([
                (
                    "authentication.kubernetes.io/pod-name".to_string(),
                    vec!["p".to_string()],
                ),
                (
                    "authentication.kubernetes.io/pod-uid".to_string(),
                    vec!["u".to_string()],
                ),
            ])
        });
        TokenReview {
            status: Some(TokenReviewStatus {
                authenticated: Some(authenticated),
                audiences: Some(audiences.iter().map(|a| a.to_string()).collect()),
                user: Some(UserInfo {
                    username: Some(username.into()),
                    extra,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_review_is_trusted_only_when_everything_holds() {
        let sa = "system:serviceaccount:team:app";
        assert!(judge(&review(true, &["byok.dev"], sa, true)).is_ok());
        assert_eq!(
            judge(&review(false, &["byok.dev"], sa, true)),
            Err(Denial::Unauthenticated)
        );
        assert_eq!(
            judge(&review(true, &[], sa, true)),
            Err(Denial::WrongAudience)
        );
        assert_eq!(
            judge(&review(true, &["https://kubernetes.default.svc"], sa, true)),
            Err(Denial::WrongAudience)
        );
        assert_eq!(
            judge(&review(true, &["byok.dev"], sa, false)),
            Err(Denial::NotPodBound)
        );
        assert_eq!(
            judge(&review(true, &["byok.dev"], "alice", true)),
            Err(Denial::NotPodBound)
        );
        assert_eq!(judge(&TokenReview::default()), Err(Denial::Unauthenticated));
    }

    #[test]
    fn token_lifetime_reads_exp_and_tolerates_garbage() {
        let now = jiff::Timestamp::from_second(1_000).expect("ts");
        let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(r#"{"exp":1600}"#);
        let jwt = format!("h.{payload}.s");
        assert_eq!(token_lifetime(&jwt, now), Some(Duration::from_secs(600)));
        let expired = format!(
            "h.{}.s",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(r#"{"exp":10}"#)
        );
        assert_eq!(token_lifetime(&expired, now), Some(Duration::ZERO));
        for garbage in ["", "a", "a.b.c", "a.!!!.c", "a.e30.c"] {
            assert_eq!(token_lifetime(garbage, now), None, "{garbage}");
        }
    }
}
