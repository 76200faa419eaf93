//! Per-pod limits (`spec.limits.perPod`): requests and tokens per minute, over a sliding
//! 60 s window, kept by each sidecar for its own pod. Pure: the clock is passed in.
//!
//! - Requests per minute are exact: a request is admitted while fewer than the limit were
//!   admitted in the 60 s before it.
//! - Tokens per minute are counted when an answer ends (its usage is known only then). On
//!   admission a request reserves an estimate of its input (its body's bytes / 4), settled
//!   with the real count when its answer ends; a request is admitted while the tokens
//!   counted in the last 60 s plus those reserved are under the limit. So the window can
//!   overshoot the limit by the output (and the misestimated input) of the requests in
//!   flight when it was reached (`docs/limits.md`).
//!
//! A refusal says how long until a request would be admitted again (at most 60 s).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// The window limits are counted over.
pub const WINDOW: Duration = Duration::from_secs(60);

/// The most one answer counts (a hostile upstream's `u64::MAX` would saturate the sum).
pub const MAX_ANSWER_TOKENS: u64 = 1_000_000_000_000;

/// A key's per-pod limits, from its grant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    pub requests_per_minute: Option<u32>,
    pub tokens_per_minute: Option<u64>,
}

impl Limits {
    pub fn any(&self) -> bool {
        self.requests_per_minute.is_some() || self.tokens_per_minute.is_some()
    }
}

/// Which limit refused a request, and when to try again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exceeded {
    pub what: &'static str,
    pub limit: u64,
    /// Whole seconds, 1 to 60.
    pub retry_after: u64,
}

/// What a pod used of one key in the last minute.
#[derive(Debug, Default)]
pub struct Window {
    /// When each admitted request was admitted (at most `requests_per_minute` kept).
    requests: VecDeque<Instant>,
    /// Tokens of answers that ended, and when.
    tokens: VecDeque<(Instant, u64)>,
    token_sum: u64,
    /// Estimates reserved by requests in flight.
    reserved: u64,
}

fn retry_after(at: Instant, now: Instant) -> u64 {
    let wait = (at + WINDOW).saturating_duration_since(now);
    // Whole seconds, rounded up: a client that waits that long is admitted.
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    secs.clamp(1, WINDOW.as_secs())
}

impl Window {
    fn expire(&mut self, now: Instant) {
        while self.requests.front().is_some_and(|t| *t + WINDOW <= now) {
            self.requests.pop_front();
        }
        while let Some((t, n)) = self.tokens.front().copied() {
            if t + WINDOW > now {
                break;
            }
            self.tokens.pop_front();
            self.token_sum = self.token_sum.saturating_sub(n);
        }
    }

    /// Admits one request at `now` reserving `estimate` tokens (settle them with
    /// [`Window::settle`]), or says which limit refuses it.
    pub fn admit(&mut self, limits: &Limits, now: Instant, estimate: u64) -> Result<(), Exceeded> {
        self.expire(now);
        if let Some(limit) = limits.tokens_per_minute
            && self.token_sum < limit
            && self.token_sum.saturating_add(self.reserved) >= limit
        {
            // Held back by requests in flight: their answers settle within seconds.
            return Err(Exceeded {
                what: "tokens per minute",
                limit,
                retry_after: 1,
            });
        }
        if let Some(limit) = limits.tokens_per_minute
            && self.token_sum >= limit
        {
            // The first time the window's sum falls under the limit.
            let mut sum = self.token_sum;
            let mut at = now;
            for (t, n) in &self.tokens {
                sum = sum.saturating_sub(*n);
                at = *t;
                if sum < limit {
                    break;
                }
            }
            return Err(Exceeded {
                what: "tokens per minute",
                limit,
                retry_after: retry_after(at, now),
            });
        }
        if let Some(limit) = limits.requests_per_minute {
            let limit_len = usize::try_from(limit).unwrap_or(usize::MAX);
            // After a lowered limit more may be kept: the one to wait for is the one whose
            // leaving brings the count under the limit.
            if self.requests.len() >= limit_len {
                let index = self.requests.len() - limit_len;
                let oldest = self.requests.get(index).copied().unwrap_or(now);
                return Err(Exceeded {
                    what: "requests per minute",
                    limit: u64::from(limit),
                    retry_after: retry_after(oldest, now),
                });
            }
            self.requests.push_back(now);
        }
        if limits.tokens_per_minute.is_some() {
            self.reserved = self.reserved.saturating_add(estimate);
        }
        Ok(())
    }

    /// An answer ended at `now`: its reservation goes, its `tokens` are counted.
    pub fn settle(&mut self, reserved: u64, tokens: u64, now: Instant) {
        self.reserved = self.reserved.saturating_sub(reserved);
        let tokens = tokens.min(MAX_ANSWER_TOKENS);
        if tokens == 0 {
            return;
        }
        self.expire(now);
        self.tokens.push_back((now, tokens));
        self.token_sum = self.token_sum.saturating_add(tokens);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(start: Instant, ms: u64) -> Instant {
        start + Duration::from_millis(ms)
    }

    /// Exactly `limit` requests in any 60 s: the next one is admitted the moment the oldest
    /// leaves the window, and the refusal says so.
    #[test]
    fn requests_per_minute_are_exact_over_a_sliding_window() {
        let limits = Limits {
            requests_per_minute: Some(3),
            tokens_per_minute: None,
        };
        let t0 = Instant::now();
        let mut w = Window::default();
        for ms in [0, 10_000, 20_000] {
            assert_eq!(w.admit(&limits, at(t0, ms), 0), Ok(()));
        }
        let refused = w.admit(&limits, at(t0, 30_000), 0).expect_err("a fourth");
        assert_eq!(refused.what, "requests per minute");
        assert_eq!(refused.retry_after, 30);
        // 1 ms before the first leaves: still refused, retry in 1 s (rounded up).
        assert_eq!(
            w.admit(&limits, at(t0, 59_999), 0)
                .map_err(|e| e.retry_after),
            Err(1)
        );
        assert_eq!(w.admit(&limits, at(t0, 60_000), 0), Ok(()));
        assert!(w.admit(&limits, at(t0, 60_001), 0).is_err());
        assert_eq!(w.admit(&limits, at(t0, 70_000), 0), Ok(()));
        // Refusals are not counted: over any 60 s, at most 3 were admitted.
    }

    #[test]
    fn tokens_per_minute_admit_until_counted_tokens_reach_the_limit() {
        let limits = Limits {
            requests_per_minute: None,
            tokens_per_minute: Some(100),
        };
        let t0 = Instant::now();
        let mut w = Window::default();
        // Three requests in flight together: all admitted (nothing counted yet).
        for ms in [0, 1, 2] {
            assert_eq!(w.admit(&limits, at(t0, ms), 0), Ok(()));
        }
        // They end: 3 × 60 = 180 tokens, an overshoot of the requests in flight.
        for ms in [1000, 1001, 1002] {
            w.settle(0, 60, at(t0, ms));
        }
        let refused = w.admit(&limits, at(t0, 5_000), 0).expect_err("over");
        assert_eq!(refused.what, "tokens per minute");
        // Under 100 once the first two leave (180 - 60 - 60 = 60), at 61.001 s.
        assert_eq!(refused.retry_after, 57);
        assert!(w.admit(&limits, at(t0, 61_000), 0).is_err());
        assert_eq!(w.admit(&limits, at(t0, 61_002), 0), Ok(()));
    }

    #[test]
    fn a_lowered_limit_applies_at_once_and_retry_after_stays_within_a_minute() {
        let t0 = Instant::now();
        let mut w = Window::default();
        let five = Limits {
            requests_per_minute: Some(5),
            tokens_per_minute: None,
        };
        for ms in 0..5 {
            assert_eq!(w.admit(&five, at(t0, ms), 0), Ok(()));
        }
        let one = Limits {
            requests_per_minute: Some(1),
            tokens_per_minute: Some(1),
        };
        let e = w.admit(&one, at(t0, 10), 0).expect_err("lowered");
        assert!((1..=60).contains(&e.retry_after));
        w.settle(0, u64::MAX, at(t0, 20));
        w.settle(0, u64::MAX, at(t0, 30));
        let e = w.admit(&one, at(t0, 40), 0).expect_err("tokens");
        assert!((1..=60).contains(&e.retry_after));
        assert_eq!(w.admit(&Limits::default(), at(t0, 50), 0), Ok(()));
    }

    /// Attacker review: concurrency cannot take the window far past the limit, since each
    /// request in flight reserves its input; a limit lowered then raised forgets nothing.
    #[test]
    fn reservations_hold_back_concurrent_requests_and_history_is_kept() {
        let t0 = Instant::now();
        let tokens = Limits {
            requests_per_minute: None,
            tokens_per_minute: Some(1000),
        };
        let mut w = Window::default();
        let mut admitted = 0;
        for ms in 0..5000 {
            if w.admit(&tokens, at(t0, ms), 300).is_ok() {
                admitted += 1;
            }
        }
        // 300 + 300 + 300 reserved < 1000; the fourth reaches it: then no more.
        assert_eq!(admitted, 4);
        assert_eq!(
            w.admit(&tokens, at(t0, 5000), 300)
                .map_err(|e| e.retry_after),
            Err(1)
        );
        for _ in 0..4 {
            w.settle(300, 250, at(t0, 6000));
        }
        assert_eq!(
            w.admit(&tokens, at(t0, 6001), 300).map(|()| "ok"),
            Err(Exceeded {
                what: "tokens per minute",
                limit: 1000,
                retry_after: 60,
            })
        );

        let five = Limits {
            requests_per_minute: Some(5),
            tokens_per_minute: None,
        };
        let one = Limits {
            requests_per_minute: Some(1),
            tokens_per_minute: None,
        };
        let mut w = Window::default();
        for ms in 0..5 {
            assert_eq!(w.admit(&five, at(t0, ms), 0), Ok(()));
        }
        assert!(w.admit(&one, at(t0, 10), 0).is_err());
        // Raised again within the minute: still five in the window.
        assert!(w.admit(&five, at(t0, 20), 0).is_err());
        // A limit of 0 (no broker of ours sends it) refuses everything.
        let zero = Limits {
            requests_per_minute: Some(0),
            tokens_per_minute: None,
        };
        assert!(Window::default().admit(&zero, t0, 0).is_err());
    }
}
