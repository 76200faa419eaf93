//! Which trust bundle the served sidecars hold, as they report it on each poll
//! ([`crate::grant::TRUST_BUNDLE_HEADER`]).
//!
//! After the broker's CA changes, a running sidecar trusts the new one only once the kubelet
//! has refreshed its mounted bundle. These counts say how many pods are still waiting for
//! that (`byok_broker_trust_bundle_pods{bundle="outdated"}`), and how many hold a CA in env
//! that can never change (`unreported`: sidecars injected before trust bundles, which a CA
//! change cuts off; `docs/upgrade.md`). Per replica: a pod polls whichever replica its
//! connection reaches, so sum over replicas for an upper bound.
//!
//! Pure apart from the lock: the clock is passed in.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// What a sidecar said about its bundle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Held {
    /// The bundle the operator publishes now.
    Current,
    /// Another bundle: the kubelet has not refreshed its mount yet.
    Outdated,
    /// No report: a sidecar from before trust bundles (its CA is fixed in env).
    Unreported,
}

impl Held {
    /// From the reported digest and the digest of the bundle published now.
    pub fn of(reported: Option<&str>, current: &str) -> Self {
        match reported {
            Some(d) if d == current => Self::Current,
            Some(_) => Self::Outdated,
            None => Self::Unreported,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Self::Current => "current",
            Self::Outdated => "outdated",
            Self::Unreported => "unreported",
        }
    }
}

/// Pods served within the last `window`, by what they hold.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub current: u64,
    pub outdated: u64,
    pub unreported: u64,
}

impl Counts {
    /// Each count with its metric label ([`Held::label`]).
    pub fn labelled(&self) -> [(&'static str, u64); 3] {
        [
            (Held::Current.label(), self.current),
            (Held::Outdated.label(), self.outdated),
            (Held::Unreported.label(), self.unreported),
        ]
    }
}

/// The last report of each served pod, by UID.
pub struct Reports {
    window: Duration,
    by_pod: Mutex<HashMap<String, (Held, Instant)>>,
}

impl Reports {
    /// Counts cover pods served within `window` (the key lease: a pod not served for that
    /// long has stopped using its key).
    pub fn new(window: Duration) -> Self {
        Self {
            window,
            by_pod: Mutex::default(),
        }
    }

    /// Records one served poll; returns the counts when `recount` is due (the caller
    /// publishes them), pruning pods not served within the window.
    pub fn record(&self, pod_uid: &str, held: Held, now: Instant, recount: bool) -> Option<Counts> {
        let mut by_pod = self
            .by_pod
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match by_pod.get_mut(pod_uid) {
            Some(entry) => *entry = (held, now),
            None => {
                by_pod.insert(pod_uid.to_owned(), (held, now));
            }
        }
        if !recount {
            return None;
        }
        by_pod.retain(|_, (_, at)| now.saturating_duration_since(*at) <= self.window);
        let mut counts = Counts::default();
        for (held, _) in by_pod.values() {
            match held {
                Held::Current => counts.current += 1,
                Held::Outdated => counts.outdated += 1,
                Held::Unreported => counts.unreported += 1,
            }
        }
        Some(counts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_is_current_only_when_it_names_the_published_bundle() {
        assert_eq!(Held::of(Some("sha256:a"), "sha256:a"), Held::Current);
        assert_eq!(Held::of(Some("sha256:b"), "sha256:a"), Held::Outdated);
        assert_eq!(Held::of(None, "sha256:a"), Held::Unreported);
    }

    #[test]
    fn counts_follow_each_pods_latest_report_within_the_window() {
        let t0 = Instant::now();
        let minute = Duration::from_secs(60);
        let reports = Reports::new(5 * minute);
        assert_eq!(reports.record("a", Held::Outdated, t0, false), None);
        reports.record("b", Held::Unreported, t0, false);
        let counts = reports.record("c", Held::Current, t0, true);
        assert_eq!(
            counts,
            Some(Counts {
                current: 1,
                outdated: 1,
                unreported: 1
            })
        );
        // The kubelet refreshed a's bundle.
        let counts = reports.record("a", Held::Current, t0 + minute, true);
        assert_eq!(
            counts,
            Some(Counts {
                current: 2,
                outdated: 0,
                unreported: 1
            })
        );
        // b and c not seen for longer than the lease: gone from the counts.
        let counts = reports.record("a", Held::Current, t0 + 6 * minute, true);
        assert_eq!(
            counts,
            Some(Counts {
                current: 1,
                outdated: 0,
                unreported: 0
            })
        );
    }
}
