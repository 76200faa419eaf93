//! Keeping each key current: ask the broker, with the pod's projected token (read again on
//! every request: the kubelet rotates it), until it grants the key; then poll with the ETag.
//!
//! | broker answer | the proxy |
//! |---|---|
//! | 200 | checks the grant ([`Live::from_grant`]) and serves it from now; the lease restarts |
//! | 304 | the key it has is confirmed; the lease restarts |
//! | 403, 404, 503 `KeyNotReady`: the key is deleted, revoked, not Ready or not this pod's | drops the key at once: 503 to the application |
//! | 401, 503 otherwise, 5xx, no answer | keeps the key it has until its lease ends, then 503 |
//!
//! Before the first grant every answer is retried, with exponential backoff from 100 ms to
//! the broker's poll period, with jitter.
//!
//! Whom it trusts as the broker comes from a file the kubelet keeps current (the namespace's
//! trust-bundle ConfigMap, mounted): it is read again before every request, and a changed
//! bundle is used from that request on, so a new CA reaches a running sidecar within its
//! lease. Each request names the bundle's digest, so the broker knows who still holds an old
//! one.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use super::keys::KeySlot;
use super::live::{Grant, Live};
use super::metrics::{KeyLabel, ProxyMetrics};
use super::upstream::Pools;
use crate::grant::{TRUST_BUNDLE_HEADER, trust_bundle_digest};

const FIRST_RETRY: Duration = Duration::from_millis(100);
/// The longest wait between tries before a grant, and the poll period before the broker
/// named one.
const DEFAULT_POLL: Duration = Duration::from_secs(5);
const BROKER_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the sidecar's trust in the broker comes from.
#[derive(Debug, Clone)]
pub enum Trust {
    /// A PEM fixed for the process's life: `BYOK_BROKER_CA`, as releases before trust
    /// bundles injected it.
    Fixed(String),
    /// A bundle file read again before every request (`BYOK_BROKER_CA_FILE`, by default the
    /// mounted trust-bundle ConfigMap).
    File(PathBuf),
}

/// The HTTP client for one trust bundle.
struct Trusting {
    digest: String,
    http: reqwest::Client,
}

/// How the proxy reaches the broker.
pub struct BrokerClient {
    trust: Trust,
    /// The client for the bundle last read; kept when a later read fails or is not a bundle.
    current: Mutex<Option<Arc<Trusting>>>,
    /// `https://host:port` without a trailing slash.
    base: String,
    namespace: String,
    token_file: PathBuf,
}

/// What one broker request came to.
#[derive(Debug)]
pub enum Answer {
    Granted {
        grant: Box<Grant>,
        etag: Option<String>,
    },
    NotModified {
        lease: Option<Duration>,
    },
    /// The key is not to be served (final) or not yet/not now (`final_ == false`).
    Denied {
        status: u16,
        reason: String,
        message: String,
        final_: bool,
    },
    /// No usable answer (network, TLS, token file, garbage).
    Failed(String),
}

#[derive(Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Deserialize)]
struct ErrorDetail {
    #[serde(default)]
    reason: String,
    #[serde(default)]
    message: String,
}

/// Whether a refusal means the key must not be used any more.
pub fn is_final(status: u16, reason: &str) -> bool {
    match status {
        403 | 404 => true,
        503 => reason == "KeyNotReady",
        _ => false,
    }
}

impl BrokerClient {
    /// Fails only on what no later read can fix (the URL); an unreadable bundle file is
    /// retried before every request.
    pub fn new(
        base: &str,
        trust: Trust,
        namespace: String,
        token_file: PathBuf,
    ) -> anyhow::Result<Self> {
        let base = base.trim_end_matches('/').to_owned();
        anyhow::ensure!(base.starts_with("https://"), "--broker-url must be https");
        let client = Self {
            trust,
            current: Mutex::new(None),
            base,
            namespace,
            token_file,
        };
        if let Trust::Fixed(_) = &client.trust {
            // A fixed PEM never changes: a bad one is a start-up error.
            client.trusting().map_err(|e| anyhow::anyhow!(e))?;
        }
        Ok(client)
    }

    /// The client for the bundle as it is now: the file read again, a new client only when
    /// its bytes changed. A missing or bad file keeps the last good client (the kubelet
    /// swaps the mount's files in one rename, so a read sees the old or the new bundle).
    fn trusting(&self) -> Result<Arc<Trusting>, String> {
        let (pem, source) = match &self.trust {
            Trust::Fixed(pem) => (pem.clone().into_bytes(), "BYOK_BROKER_CA"),
            Trust::File(path) => match std::fs::read(path) {
                Ok(pem) => (pem, "the trust bundle"),
                Err(e) => {
                    return self.last_good().ok_or_else(|| {
                        format!("reading the trust bundle {}: {e}", path.display())
                    });
                }
            },
        };
        let digest = trust_bundle_digest(&pem);
        let mut current = self
            .current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(c) = current.as_ref().filter(|c| c.digest == digest) {
            return Ok(c.clone());
        }
        match build_client(&pem, source) {
            Ok(http) => {
                if current.is_some() {
                    tracing::info!(bundle = %digest, "the broker's trust bundle changed; using it from now on");
                }
                let fresh = Arc::new(Trusting { digest, http });
                *current = Some(fresh.clone());
                Ok(fresh)
            }
            Err(e) => match current.as_ref() {
                Some(c) => {
                    tracing::warn!(error = %e, "keeping the previous trust bundle");
                    Ok(c.clone())
                }
                None => Err(e),
            },
        }
    }

    fn last_good(&self) -> Option<Arc<Trusting>> {
        self.current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn token(&self) -> Result<SecretString, String> {
        let raw = std::fs::read_to_string(&self.token_file)
            .map_err(|e| format!("reading the pod token {}: {e}", self.token_file.display()))?;
        let token = raw.trim();
        if token.is_empty() {
            return Err(format!(
                "the pod token {} is empty",
                self.token_file.display()
            ));
        }
        Ok(SecretString::from(token.to_owned()))
    }

    /// Asks for `key`, conditionally on `etag`.
    pub async fn fetch(&self, key: &str, etag: Option<&str>) -> Answer {
        let token = match self.token() {
            Ok(t) => t,
            Err(e) => return Answer::Failed(e),
        };
        let trusting = match self.trusting() {
            Ok(t) => t,
            Err(e) => return Answer::Failed(e),
        };
        let url = format!("{}/v1/keys/{}/{key}", self.base, self.namespace);
        let mut req = trusting
            .http
            .get(&url)
            .bearer_auth(token.expose_secret())
            .header(TRUST_BUNDLE_HEADER, &trusting.digest);
        if let Some(etag) = etag {
            req = req.header(reqwest::header::IF_NONE_MATCH, etag);
        }
        let res = match req.send().await {
            Ok(r) => r,
            Err(e) => {
                return Answer::Failed(format!(
                    "the key broker did not answer: {}",
                    without_url(&e)
                ));
            }
        };
        let status = res.status().as_u16();
        let header_secs = |name: &str| {
            res.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok())
                .map(Duration::from_secs)
        };
        let lease = header_secs(crate::grant::LEASE_SECONDS_HEADER);
        let etag = res
            .headers()
            .get(reqwest::header::ETAG)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        match status {
            304 => Answer::NotModified { lease },
            200 => {
                let body = match res.bytes().await {
                    Ok(b) => secrecy::zeroize::Zeroizing::new(b.to_vec()),
                    Err(e) => {
                        return Answer::Failed(format!(
                            "reading the broker's answer: {}",
                            without_url(&e)
                        ));
                    }
                };
                match serde_json::from_slice::<Grant>(&body) {
                    Ok(grant) => Answer::Granted {
                        grant: Box::new(grant),
                        etag,
                    },
                    // serde's message may quote the input: say where, not what.
                    Err(e) => Answer::Failed(format!(
                        "the broker's answer is not a grant (line {}, column {})",
                        e.line(),
                        e.column()
                    )),
                }
            }
            _ => {
                let body: Option<ErrorBody> = res.json().await.ok();
                let (reason, message) = body
                    .map(|b| (b.error.reason, b.error.message))
                    .unwrap_or_default();
                Answer::Denied {
                    status,
                    final_: is_final(status, &reason),
                    reason,
                    message,
                }
            }
        }
    }
}

/// A client trusting only the certificates in `pem` (`source` names it in errors).
fn build_client(pem: &[u8], source: &str) -> Result<reqwest::Client, String> {
    let certs = reqwest::Certificate::from_pem_bundle(pem)
        .map_err(|e| format!("{source} is not valid PEM: {e}"))?;
    if certs.is_empty() {
        return Err(format!("{source} holds no certificate"));
    }
    reqwest::Client::builder()
        .tls_certs_only(certs)
        .https_only(true)
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(BROKER_TIMEOUT)
        .timeout(BROKER_TIMEOUT)
        .user_agent(concat!("byok-proxy/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| format!("building the broker client: {e}"))
}

/// reqwest's error text with the URL left out (it is not secret, but it is noise).
fn without_url(e: &reqwest::Error) -> String {
    let mut out = e.without_url_ref().to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

trait WithoutUrlRef {
    fn without_url_ref(&self) -> String;
}

impl WithoutUrlRef for reqwest::Error {
    fn without_url_ref(&self) -> String {
        let text = self.to_string();
        match self.url() {
            Some(url) => text.replace(&format!(" for url ({url})"), ""),
            None => text,
        }
    }
}

/// `base` with ±20 % jitter.
fn jittered(base: Duration) -> Duration {
    let factor = rand::rng().random_range(0.8..1.2);
    base.mul_f64(factor)
}

/// Keeps `slot` current until the process ends.
pub async fn keep_current(
    slot: Arc<KeySlot>,
    broker: Arc<BrokerClient>,
    pools: Arc<Pools>,
    metrics: Arc<ProxyMetrics>,
    namespace: String,
) {
    let mut keeper = Keeper {
        label: KeyLabel {
            key: slot.name.clone(),
        },
        slot,
        pools,
        metrics,
        namespace,
        retry: FIRST_RETRY,
        poll: DEFAULT_POLL,
    };
    loop {
        let answer = broker
            .fetch(&keeper.slot.name, keeper.slot.etag().as_deref())
            .await;
        let wait = keeper.take(answer);
        tokio::time::sleep(jittered(wait)).await;
    }
}

/// One key's refresh state: what the broker's answers change, and when to ask again.
struct Keeper {
    slot: Arc<KeySlot>,
    pools: Arc<Pools>,
    metrics: Arc<ProxyMetrics>,
    namespace: String,
    label: KeyLabel,
    /// The next retry delay after a failure (doubles up to `poll`).
    retry: Duration,
    /// The broker's poll interval.
    poll: Duration,
}

impl Keeper {
    /// Applies one answer of the broker; returns how long to wait before the next.
    fn take(&mut self, answer: Answer) -> Duration {
        let now = Instant::now();
        let loaded = self.slot.live().is_some();
        let wait = match answer {
            Answer::Granted { grant, etag } => self.granted(*grant, etag, now),
            Answer::NotModified { lease } => {
                self.metrics.refresh(&self.slot.name, "unchanged");
                self.slot.confirmed(lease, now);
                self.retry = FIRST_RETRY;
                self.poll
            }
            Answer::Denied {
                status,
                reason,
                message,
                final_,
            } => self.denied(status, &reason, &message, final_, loaded),
            Answer::Failed(why) => {
                self.metrics.refresh(&self.slot.name, "failed");
                tracing::warn!(key = %self.slot.name, error = %why, "asking the key broker failed");
                self.slot.waiting(why);
                if loaded {
                    self.poll
                } else {
                    backoff(&mut self.retry, self.poll)
                }
            }
        };
        let metrics = &self.metrics;
        metrics
            .key_ready
            .get_or_create(&self.label)
            .set(i64::from(self.slot.current(Instant::now()).is_ok()));
        if self.slot.live().is_none() {
            metrics.key_version.get_or_create(&self.label).set(0);
        }
        wait
    }

    /// A grant: checked, and served if it passes.
    fn granted(&mut self, grant: Grant, etag: Option<String>, now: Instant) -> Duration {
        let (slot, metrics) = (&self.slot, &self.metrics);
        let checked =
            Live::from_grant(grant, &self.namespace, &slot.name, now).and_then(|mut live| {
                live.upstream = Some(self.pools.get(&live.egress).map_err(|e| e.to_string())?);
                Ok(live)
            });
        let live = match checked {
            Ok(live) => live,
            Err(why) => {
                metrics.refresh(&slot.name, "refused");
                tracing::error!(key = %slot.name, error = %why, "the broker's grant was refused; the key is not served");
                slot.close(format!("the grant was refused: {why}"));
                return backoff(&mut self.retry, self.poll);
            }
        };
        let version = live.key_version;
        let fingerprint = live.fingerprint.clone();
        self.poll = live.poll;
        let before = slot.granted(live, etag, now);
        metrics.refresh(&slot.name, "updated");
        metrics.key_version.get_or_create(&self.label).set(version);
        match before {
            None => {
                tracing::info!(key = %slot.name, key_version = version, %fingerprint, "key loaded")
            }
            Some(v) if v != version => {
                tracing::info!(key = %slot.name, key_version = version, previous = v, %fingerprint, "key rotated")
            }
            Some(_) => tracing::debug!(key = %slot.name, "grant renewed"),
        }
        self.retry = FIRST_RETRY;
        self.poll
    }

    /// A refusal: final ones close a loaded key, others leave it waiting.
    fn denied(
        &mut self,
        status: u16,
        reason: &str,
        message: &str,
        final_: bool,
        loaded: bool,
    ) -> Duration {
        let (slot, metrics) = (&self.slot, &self.metrics);
        let why = format!("the key broker answered {status} {reason}: {message}");
        if final_ && loaded {
            metrics.refresh(&slot.name, "closed");
            tracing::warn!(key = %slot.name, status, %reason, %message, "the key is no longer served; dropped");
            slot.close(why);
        } else {
            metrics.refresh(&slot.name, if loaded { "failed" } else { "waiting" });
            tracing::info!(key = %slot.name, status, %reason, %message, "the key broker refused the key for now");
            slot.waiting(why);
        }
        if loaded && !final_ {
            self.poll
        } else {
            backoff(&mut self.retry, self.poll)
        }
    }
}

/// The next retry delay: doubles up to `ceiling`.
fn backoff(retry: &mut Duration, ceiling: Duration) -> Duration {
    let now = (*retry).min(ceiling);
    *retry = (*retry * 2).min(ceiling);
    now
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn which_refusals_drop_a_key() {
        assert!(is_final(404, "ProviderKeyNotFound"));
        assert!(is_final(404, "ProviderKeyDeleting"));
        assert!(is_final(403, "Forbidden"));
        assert!(is_final(503, "KeyNotReady"));
        assert!(!is_final(503, "KeyUnavailable"));
        assert!(!is_final(503, "ReviewFailed"));
        assert!(!is_final(401, "Unauthenticated"));
        assert!(!is_final(500, "Internal"));
    }

    #[test]
    fn retries_back_off_to_the_poll_period() {
        let mut r = FIRST_RETRY;
        let waits: Vec<u128> = (0..8)
            .map(|_| backoff(&mut r, Duration::from_secs(5)).as_millis())
            .collect();
        assert_eq!(waits, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
        let j = jittered(Duration::from_secs(5));
        assert!(j >= Duration::from_secs(4) && j <= Duration::from_secs(6));
    }
}
