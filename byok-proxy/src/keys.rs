//! One slot per key the pod lists: the key in service, its lease, or why there is none.
//!
//! The refresher writes, the hot path reads a clone of an `Arc` under a read lock (no
//! allocation, no key copy). The decision whether a key may be used now is pure
//! ([`availability`]).

use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use super::answers::Refusal;
use super::live::Live;

#[derive(Debug, Default)]
struct State {
    live: Option<Arc<Live>>,
    /// The broker confirmed the key until then (`lease` after its last answer).
    confirmed_until: Option<Instant>,
    /// The broker said the key is not to be served (deleted, revoked, not allowed).
    closed: Option<String>,
    /// Before the first grant: what the broker last said.
    waiting: Option<String>,
    etag: Option<String>,
    /// Kept after a key is dropped, for the shape of the proxy's own errors.
    provider: Option<crate::providers::ProviderKind>,
}

/// A key of the pod, by name, with its local port.
#[derive(Debug)]
pub struct KeySlot {
    pub name: String,
    pub port: u16,
    state: RwLock<State>,
    /// What this pod used of the key in the last minute (`spec.limits.perPod`); kept
    /// across new grants, so a rotation does not reset it.
    window: Mutex<crate::limits::Window>,
}

/// Whether a key may be used at `now`.
fn availability(state: &State, now: Instant) -> Result<Arc<Live>, Refusal> {
    if let Some(why) = &state.closed {
        return Err(Refusal::KeyUnavailable(format!(
            "the key is no longer served: {why}"
        )));
    }
    let Some(live) = &state.live else {
        return Err(Refusal::KeyUnavailable(match &state.waiting {
            Some(why) => format!("the key is not loaded yet: {why}"),
            None => "the key is not loaded yet".into(),
        }));
    };
    if state.confirmed_until.is_none_or(|until| now >= until) {
        return Err(Refusal::KeyUnavailable(
            "the key's lease ended: the key broker has not confirmed it in time".into(),
        ));
    }
    if live.expires.is_some_and(|at| now >= at) {
        return Err(Refusal::KeyUnavailable(
            "the provider access token expired and no new one arrived".into(),
        ));
    }
    Ok(live.clone())
}

impl KeySlot {
    pub fn new(name: String, port: u16) -> Self {
        Self {
            name,
            port,
            state: RwLock::default(),
            window: Mutex::default(),
        }
    }

    fn window(&self) -> std::sync::MutexGuard<'_, crate::limits::Window> {
        self.window.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admits one request under `live`'s per-pod limits, reserving `estimate` tokens
    /// against a token limit (settled with [`KeySlot::settle`]).
    pub fn admit(&self, live: &Live, now: Instant, estimate: u64) -> Result<(), Refusal> {
        if !live.limits.any() {
            return Ok(());
        }
        self.window()
            .admit(&live.limits, now, estimate)
            .map_err(|e| Refusal::RateLimited {
                message: format!(
                    "this pod reached the key's limit of {} {} (spec.limits.perPod)",
                    e.limit, e.what
                ),
                retry_after: e.retry_after,
            })
    }

    /// An answer ended: its reservation goes and its tokens count against the per-pod
    /// token limit.
    pub fn settle(&self, reserved: u64, tokens: u64, now: Instant) {
        self.window().settle(reserved, tokens, now);
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The key to use now, or why not.
    pub fn current(&self, now: Instant) -> Result<Arc<Live>, Refusal> {
        availability(&self.read(), now)
    }

    /// The provider, once known (for the shape of the proxy's own errors).
    pub fn provider(&self) -> Option<crate::providers::ProviderKind> {
        self.read().provider
    }

    pub fn etag(&self) -> Option<String> {
        self.read().etag.clone()
    }

    /// The live key, whatever its lease says (for the refresher's bookkeeping).
    pub fn live(&self) -> Option<Arc<Live>> {
        self.read().live.clone()
    }

    /// A new grant; returns the key version it replaced, if any.
    pub fn granted(&self, live: Live, etag: Option<String>, now: Instant) -> Option<i64> {
        let mut s = self.write();
        let before = s.live.as_ref().map(|l| l.key_version);
        s.confirmed_until = Some(now + live.lease);
        s.provider = Some(live.provider);
        s.live = Some(Arc::new(live));
        s.closed = None;
        s.waiting = None;
        s.etag = etag;
        before
    }

    /// The broker confirmed the key in service (304).
    pub fn confirmed(&self, lease: Option<std::time::Duration>, now: Instant) {
        let mut s = self.write();
        let Some(live) = &s.live else { return };
        s.confirmed_until = Some(now + lease.unwrap_or(live.lease));
    }

    /// The broker said no for good: the key is dropped now. Returns whether a key was held.
    pub fn close(&self, why: String) -> bool {
        let mut s = self.write();
        let had = s.live.take().is_some();
        s.closed = Some(why);
        s.etag = None;
        s.confirmed_until = None;
        had
    }

    /// The broker said "not yet" (or could not be asked) and no key has been loaded.
    pub fn waiting(&self, why: String) {
        let mut s = self.write();
        if s.live.is_none() {
            s.waiting = Some(why);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::live::Egress;
    use std::time::Duration;

    fn live(expires: Option<Instant>) -> Live {
        Live {
            provider: crate::providers::ProviderKind::OpenAI,
            key_version: 1,
            fingerprint: String::new(),
            origin: "https://api.openai.com".into(),
            base_path: "/v1".into(),
            auth_name: http::header::AUTHORIZATION,
            auth_value: http::HeaderValue::from_static("Bearer x"),
            azure_api_version: None,
            inject_stream_usage: false,
            limits: Default::default(),
            models: crate::models::ModelPolicy::new(
                crate::providers::ProviderKind::OpenAI,
                None,
                Vec::new(),
            ),
            endpoints: Default::default(),
            expires,
            egress: Egress::default(),
            lease: Duration::from_secs(300),
            poll: Duration::from_secs(5),
            upstream: None,
        }
    }

    #[test]
    fn a_key_serves_within_its_lease_only() {
        let t0 = Instant::now();
        let slot = KeySlot::new("k".into(), 1);
        assert!(slot.current(t0).is_err());
        slot.waiting("the ProviderKey does not exist (yet)".into());
        let err = slot.current(t0).expect_err("not loaded");
        assert!(
            err.message().contains("does not exist"),
            "{}",
            err.message()
        );
        slot.granted(live(None), Some("\"e1\"".into()), t0);
        assert!(slot.current(t0 + Duration::from_secs(299)).is_ok());
        let err = slot
            .current(t0 + Duration::from_secs(300))
            .expect_err("lease over");
        assert!(err.message().contains("lease"));
        // A confirmation extends the lease from its own time.
        slot.confirmed(None, t0 + Duration::from_secs(200));
        assert!(slot.current(t0 + Duration::from_secs(450)).is_ok());
        // Waiting does not hide a loaded key.
        slot.waiting("x".into());
        assert!(slot.current(t0 + Duration::from_secs(450)).is_ok());
    }

    #[test]
    fn a_closed_key_is_dropped_at_once() {
        let t0 = Instant::now();
        let slot = KeySlot::new("k".into(), 1);
        slot.granted(live(None), None, t0);
        assert!(slot.close("the ProviderKey was deleted".into()));
        assert!(slot.live().is_none());
        assert_eq!(
            slot.provider(),
            Some(crate::providers::ProviderKind::OpenAI)
        );
        let err = slot.current(t0).expect_err("closed");
        assert!(err.message().contains("deleted"));
        assert_eq!(err.status(), 503);
        // A later grant (the key came back) serves again.
        slot.granted(live(None), None, t0);
        assert!(slot.current(t0).is_ok());
    }

    #[test]
    fn an_expired_access_token_is_not_used() {
        let t0 = Instant::now();
        let slot = KeySlot::new("k".into(), 1);
        slot.granted(live(Some(t0 + Duration::from_secs(60))), None, t0);
        assert!(slot.current(t0 + Duration::from_secs(59)).is_ok());
        assert!(slot.current(t0 + Duration::from_secs(60)).is_err());
    }
}
