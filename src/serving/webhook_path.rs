//! The webhook's path: a random secret, so that a pod that reaches the webhook's port cannot
//! post a made-up review and learn from the answer whether a ProviderKey exists, is Ready or
//! admits a ServiceAccount in another namespace.
//!
//! The path is 128 random bits, kept in a Secret of the operator's namespace (the TLS Secret
//! when the operator keeps its own certificate) so that every replica serves the same one. It
//! is never rendered by the chart: the operator writes it into the webhook configuration's
//! `clientConfig` with a field manager of its own, as it does the `caBundle`. Every other path
//! gets the same 404, whatever the method and body.
//!
//! The path is defence in depth, not a credential: the API server names the webhook's URL in
//! the errors it returns when a call fails (a timeout, no ready replica), and those reach
//! whoever created the pod. So it changes on a schedule ([`ROTATE_EVERY`]) and the client
//! certificate (`--webhook-client-ca`) and the NetworkPolicy remain what keeps others out.
//!
//! When the path changes (rotated, the Secret was lost, or an upgrade from a release that
//! served `/mutate`), the path the configuration carried is still accepted until [`GRACE`]
//! after the configuration carries the new one: replicas learn of the change at different
//! moments and the API server may still be sending to the old path. Only paths this
//! operator could have served are kept so: [`LEGACY_PATH`] and generated ones. A
//! configuration sending anywhere else (no path: `/`) is pointed at the current path at once.
//!
//! This module is pure (the clock is passed in); `serve` wires it to the Secret and the
//! configuration.

use std::sync::RwLock;
use std::time::{Duration, Instant};

use k8s_openapi::api::admissionregistration::v1::WebhookClientConfig;
use rand::RngCore;
use sha2::{Digest, Sha256};

/// The Secret data key that holds the path.
pub const SECRET_KEY: &str = "webhook-path";

/// The Secret data key that holds when the path was written (Unix seconds).
pub const WRITTEN_KEY: &str = "webhook-path-written";

/// How often the path is replaced by a new one.
pub const ROTATE_EVERY: Duration = Duration::from_secs(24 * 3600);

/// The path every webhook was served at before the path was random.
pub const LEGACY_PATH: &str = "/mutate";

/// How long a previous path stays accepted after the configuration carries the new one.
pub const GRACE: Duration = Duration::from_secs(5 * 60);

/// How long a replica waits, after it learns of a new path, before writing it into the
/// configuration: long enough for every replica's watch of the Secret to see it too.
pub const PUBLISH_AFTER: Duration = Duration::from_secs(10);

/// The prefix of every generated path (the rest is 128 random bits, hex).
const PREFIX: &str = "/byok/";

/// A new random path.
pub fn generate() -> String {
    let mut bits = [0u8; 16];
    rand::rng().fill_bytes(&mut bits);
    format!("{PREFIX}{}", hex::encode(bits))
}

/// Whether a path written at `written` (Unix seconds; `None`: unknown) is due for rotation at
/// `now`. A time in the future (a clock moved back) is not due: the next writer fixes it.
pub fn rotation_due(written: Option<i64>, now: i64, every: Duration) -> bool {
    let every = i64::try_from(every.as_secs()).unwrap_or(i64::MAX);
    written.is_none_or(|w| now.saturating_sub(w) >= every)
}

/// Whether the configuration may keep sending to `path` for a while: a path some replica
/// serves (a generated one, or what releases before random paths served).
pub fn servable(path: &str) -> bool {
    path == LEGACY_PATH || is_valid(path)
}

/// Whether `path` is one this operator could have generated (what the Secret may hold).
pub fn is_valid(path: &str) -> bool {
    path.strip_prefix(PREFIX).is_some_and(|rest| {
        rest.len() == 32
            && rest
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// The path a webhook's `clientConfig` sends to: `service.path` (none is `/`), or the path of
/// `url`. `None` when it has neither form or the URL does not parse.
pub fn configured(config: &WebhookClientConfig) -> Option<String> {
    if let Some(service) = &config.service {
        return Some(service.path.clone().unwrap_or_else(|| "/".to_owned()));
    }
    let url = url::Url::parse(config.url.as_deref()?).ok()?;
    Some(url.path().to_owned())
}

/// The paths the configuration's webhooks send to (those whose `clientConfig` reads).
pub fn carried(
    configuration: &k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration,
) -> Vec<String> {
    configuration
        .webhooks
        .iter()
        .flatten()
        .filter_map(|w| configured(&w.client_config))
        .collect()
}

/// The `clientConfig` fields that point the webhook at `path`, for a server-side apply that
/// owns nothing else: `service.path`, or the whole `url` with its path replaced.
pub fn client_config_patch(config: &WebhookClientConfig, path: &str) -> Option<serde_json::Value> {
    if config.service.is_some() {
        return Some(serde_json::json!({"service": {"path": path}}));
    }
    let mut url = url::Url::parse(config.url.as_deref()?).ok()?;
    url.set_path(path);
    Some(serde_json::json!({"url": url.as_str()}))
}

/// The paths this replica accepts now.
#[derive(Debug)]
pub struct WebhookPaths {
    state: RwLock<State>,
    grace: Duration,
}

#[derive(Debug, Clone)]
struct State {
    current: Digested,
    /// Paths accepted besides the current one, each until its deadline: `None` while the
    /// configuration carries it (the grace starts when it stops).
    previous: Vec<(Digested, Option<Instant>)>,
    /// Digests of paths whose grace ended (the latest [`RETIRED_KEPT`]): a configuration
    /// carrying one again (a GitOps tool or a rollback writing back an old path) does not
    /// reopen it; the operator points it at the current path instead.
    retired: std::collections::VecDeque<[u8; 32]>,
}

/// How many retired paths are remembered.
const RETIRED_KEPT: usize = 64;

/// A path and its digest: requests are compared by digest, so the comparison's time says
/// nothing about how much of a guess was right.
#[derive(Clone)]
struct Digested {
    path: String,
    digest: [u8; 32],
}

impl std::fmt::Debug for Digested {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Digested(..)")
    }
}

impl Digested {
    fn new(path: &str) -> Self {
        Self {
            path: path.to_owned(),
            digest: Sha256::digest(path.as_bytes()).into(),
        }
    }
}

impl WebhookPaths {
    /// Serving `current`; a path the configuration stops carrying stays accepted for `grace`
    /// ([`GRACE`] outside tests).
    pub fn new(current: &str, grace: Duration) -> Self {
        Self {
            state: RwLock::new(State {
                current: Digested::new(current),
                previous: Vec::new(),
                retired: std::collections::VecDeque::new(),
            }),
            grace,
        }
    }

    /// The path this replica publishes.
    pub fn current(&self) -> String {
        self.read().current.path.clone()
    }

    /// Whether a request to `path` is served.
    pub fn accepts(&self, path: &str, now: Instant) -> bool {
        let asked: [u8; 32] = Sha256::digest(path.as_bytes()).into();
        let state = self.read();
        state.current.digest == asked
            || state
                .previous
                .iter()
                .any(|(p, until)| p.digest == asked && until.is_none_or(|until| now < until))
    }

    /// The Secret holds `path`: it becomes current and the one it replaces is accepted for
    /// the grace. Returns whether anything changed.
    pub fn set_current(&self, path: &str) -> bool {
        let mut state = self.write();
        if state.current.path == path {
            return false;
        }
        let old = std::mem::replace(&mut state.current, Digested::new(path));
        state.previous.retain(|(p, _)| p.path != path);
        state.previous.push((old, None));
        true
    }

    /// The configuration's webhooks send to `paths` (as [`configured`] reads them; none when
    /// the operator does not manage a configuration). Any that is not current but
    /// [`servable`], and not retired, stays accepted while the configuration carries it, and
    /// for the grace after it stops.
    pub fn observe_configuration(&self, paths: &[String], now: Instant) {
        let mut state = self.write();
        let State {
            current,
            previous,
            retired,
        } = &mut *state;
        previous.retain(|(path, until)| {
            let open = until.is_none_or(|until| now < until);
            // `/mutate` is what a rollback to a release before random paths sends to: it may
            // always come back.
            if !open && path.path != LEGACY_PATH {
                if retired.len() == RETIRED_KEPT {
                    retired.pop_front();
                }
                retired.push_back(path.digest);
            }
            open
        });
        for path in paths
            .iter()
            .filter(|p| **p != current.path && servable(p.as_str()))
        {
            match previous.iter_mut().find(|(p, _)| p.path == *path) {
                Some((_, until)) => *until = None,
                None => {
                    let digested = Digested::new(path);
                    if !retired.contains(&digested.digest) {
                        previous.push((digested, None));
                    }
                }
            }
        }
        for (path, until) in previous.iter_mut() {
            if !paths.contains(&path.path) {
                until.get_or_insert(now + self.grace);
            }
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        // A poisoned lock only means a panic elsewhere while holding it; the state is whole.
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::admissionregistration::v1::ServiceReference;

    #[test]
    fn generated_paths_are_random_valid_and_128_bits() {
        let (a, b) = (generate(), generate());
        assert_ne!(a, b);
        assert!(is_valid(&a) && is_valid(&b), "{a} {b}");
        assert_eq!(a.len(), PREFIX.len() + 32);
        for bad in [
            "/mutate",
            "/byok/",
            "/byok/0123456789abcdef0123456789ABCDEF",
            "/byok/0123456789abcdef0123456789abcdef0",
            "/byok/0123456789abcdef0123456789abcdeg",
            "/byok/0123456789abcdef0123456789abcde/",
        ] {
            assert!(!is_valid(bad), "{bad}");
        }
    }

    #[test]
    fn rotation_is_due_after_the_period_or_when_unknown() {
        let day = Duration::from_secs(86_400);
        assert!(rotation_due(None, 1_000, day));
        assert!(!rotation_due(Some(1_000), 1_000 + 86_399, day));
        assert!(rotation_due(Some(1_000), 1_000 + 86_400, day));
        assert!(!rotation_due(Some(5_000), 1_000, day), "a clock moved back");
        assert!(rotation_due(Some(i64::MIN), i64::MAX, day), "no overflow");
        assert!(!rotation_due(Some(1), i64::MAX, Duration::MAX));
    }

    #[test]
    fn a_configuration_sending_nowhere_we_serve_opens_nothing() {
        let t0 = Instant::now();
        let paths = WebhookPaths::new(&generate(), GRACE);
        paths.observe_configuration(&["/".into(), "/admin".into(), "/byok/xyz".into()], t0);
        for path in ["/", "/admin", "/byok/xyz"] {
            assert!(!paths.accepts(path, t0), "{path}");
        }
        paths.observe_configuration(&[LEGACY_PATH.into()], t0);
        assert!(paths.accepts(LEGACY_PATH, t0));
    }

    #[test]
    fn a_path_whose_grace_ended_is_not_reopened_by_the_configuration() {
        let t0 = Instant::now();
        let (a, b) = (generate(), generate());
        let paths = WebhookPaths::new(&a, GRACE);
        paths.observe_configuration(std::slice::from_ref(&a), t0);
        assert!(paths.set_current(&b));
        paths.observe_configuration(std::slice::from_ref(&b), t0);
        let later = t0 + GRACE;
        paths.observe_configuration(std::slice::from_ref(&b), later);
        assert!(!paths.accepts(&a, later));
        // Written back (drift correction, a rollback of the configuration): stays closed.
        paths.observe_configuration(std::slice::from_ref(&a), later);
        assert!(!paths.accepts(&a, later));
        assert!(paths.accepts(&b, later));
    }

    #[test]
    fn previous_paths_the_configuration_never_carried_close_after_the_grace() {
        // No managed configuration: rotations leave nothing open for long, and nothing piles up.
        let t0 = Instant::now();
        let paths = WebhookPaths::new(&generate(), GRACE);
        let mut at = t0;
        for _ in 0..100 {
            paths.set_current(&generate());
            paths.observe_configuration(&[], at);
            at += GRACE;
        }
        paths.observe_configuration(&[], at);
        assert!(paths.read().previous.is_empty());
    }

    #[test]
    fn only_the_current_path_is_served_at_first() {
        let now = Instant::now();
        let paths = WebhookPaths::new("/byok/aa", GRACE);
        assert!(paths.accepts("/byok/aa", now));
        for other in [
            "/",
            "/mutate",
            "/byok/a",
            "/byok/aa/",
            "/BYOK/aa",
            "/byok/aa?x",
        ] {
            assert!(!paths.accepts(other, now), "{other}");
        }
    }

    #[test]
    fn the_configurations_old_path_is_served_until_grace_after_it_carries_the_new_one() {
        let t0 = Instant::now();
        let paths = WebhookPaths::new("/byok/new", GRACE);
        // Upgrade: the configuration still sends to /mutate.
        paths.observe_configuration(&["/mutate".into(), "/mutate".into()], t0);
        let late = t0 + GRACE * 10;
        assert!(
            paths.accepts("/mutate", late),
            "no deadline while the configuration still sends there"
        );
        // One webhook moved, the other not yet: still no deadline.
        paths.observe_configuration(&["/byok/new".into(), "/mutate".into()], late);
        assert!(paths.accepts("/mutate", late + GRACE * 2));
        // Both moved: the grace starts.
        let moved = late + GRACE * 2;
        paths.observe_configuration(&["/byok/new".into(), "/byok/new".into()], moved);
        assert!(paths.accepts("/mutate", moved + GRACE - Duration::from_secs(1)));
        assert!(!paths.accepts("/mutate", moved + GRACE));
        assert!(paths.accepts("/byok/new", moved + GRACE * 100));
        // Written back later (a rollback to a release that served it): accepted again.
        paths.observe_configuration(&["/mutate".into()], moved + GRACE * 3);
        assert!(paths.accepts("/mutate", moved + GRACE * 3));
    }

    #[test]
    fn a_new_path_from_the_secret_keeps_the_old_one_until_grace_after_it_is_published() {
        let t0 = Instant::now();
        let paths = WebhookPaths::new("/byok/one", GRACE);
        paths.observe_configuration(&["/byok/one".into()], t0);
        assert!(paths.set_current("/byok/two"));
        assert!(!paths.set_current("/byok/two"), "no change the second time");
        assert_eq!(paths.current(), "/byok/two");
        let later = t0 + GRACE * 4;
        assert!(paths.accepts("/byok/one", later), "not yet published");
        assert!(paths.accepts("/byok/two", later));
        paths.observe_configuration(&["/byok/two".into()], later);
        assert!(paths.accepts("/byok/one", later + GRACE - Duration::from_millis(1)));
        assert!(!paths.accepts("/byok/one", later + GRACE));
        // Back to a previous path: it is current, not also "previous".
        assert!(paths.set_current("/byok/one"));
        assert!(paths.accepts("/byok/one", later + GRACE * 9));
    }

    #[test]
    fn client_config_paths_read_and_written_in_both_forms() {
        let service = WebhookClientConfig {
            service: Some(ServiceReference {
                name: "byok".into(),
                namespace: "byok-system".into(),
                path: None,
                port: Some(443),
            }),
            ..Default::default()
        };
        assert_eq!(configured(&service).as_deref(), Some("/"));
        assert_eq!(
            client_config_patch(&service, "/byok/x"),
            Some(serde_json::json!({"service": {"path": "/byok/x"}}))
        );
        let url = WebhookClientConfig {
            url: Some("https://127.0.0.1:9443/mutate".into()),
            ..Default::default()
        };
        assert_eq!(configured(&url).as_deref(), Some("/mutate"));
        assert_eq!(
            client_config_patch(&url, "/byok/x"),
            Some(serde_json::json!({"url": "https://127.0.0.1:9443/byok/x"}))
        );
        let bad = WebhookClientConfig {
            url: Some("not a url".into()),
            ..Default::default()
        };
        assert_eq!(configured(&bad), None);
        assert_eq!(client_config_patch(&bad, "/byok/x"), None);
    }
}
