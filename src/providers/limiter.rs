//! Politeness towards providers: every verification call to one host waits for a slot here,
//! so however many keys are due at once, one provider host sees at most `concurrency` calls
//! in flight and `rate` calls per second, after a burst of up to one second's worth (so a
//! single new key is never delayed). A 429 from a host halves its rate (down to 1/64 of the
//! configured one) and takes the burst away; each answer that is not a 429 gives back half.
//!
//! Keyed by host name, which a ProviderKey author chooses: the table forgets idle hosts once
//! it holds [`MAX_HOSTS`], so many distinct hosts cannot grow it without bound.
//!
//! Documented in `docs/providers.md`, section "Per-host limiter".

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// Defaults for `--verify-concurrency-per-host` and `--verify-rate-per-host`.
pub const DEFAULT_CONCURRENCY: usize = 4;
pub const DEFAULT_RATE_PER_SECOND: f64 = 10.0;
/// Hosts remembered before idle ones are forgotten.
pub const MAX_HOSTS: usize = 1024;
/// How far 429s can slow a host down: its rate divided by this at most.
const MAX_SLOWDOWN: u32 = 64;

/// Per-host concurrency and rate limits shared by every verification in the process.
#[derive(Debug)]
pub struct HostLimiter {
    concurrency: usize,
    spacing: Duration,
    /// How far ahead of its schedule a host may run: a burst of one second's worth of calls.
    burst: Duration,
    hosts: Mutex<HashMap<String, Arc<Host>>>,
}

#[derive(Debug)]
struct Host {
    permits: Arc<Semaphore>,
    /// The earliest instant the next call may start, and the current slowdown factor.
    schedule: Mutex<(Instant, u32)>,
}

/// Held for the duration of one call; dropping it frees the host's slot.
#[derive(Debug)]
pub struct Permit {
    _slot: Option<OwnedSemaphorePermit>,
}

impl Default for HostLimiter {
    fn default() -> Self {
        HostLimiter::new(DEFAULT_CONCURRENCY, DEFAULT_RATE_PER_SECOND)
    }
}

impl HostLimiter {
    /// `concurrency` calls in flight and `rate_per_second` call starts per host (each at
    /// least 1 and 0.001 respectively, so a mistaken flag cannot stop verification forever).
    pub fn new(concurrency: usize, rate_per_second: f64) -> HostLimiter {
        let rate = if rate_per_second.is_finite() {
            rate_per_second.max(0.001)
        } else {
            DEFAULT_RATE_PER_SECOND
        };
        let spacing = Duration::from_secs_f64(1.0 / rate);
        HostLimiter {
            concurrency: concurrency.max(1),
            spacing,
            burst: spacing.mul_f64((rate - 1.0).max(0.0)),
            hosts: Mutex::new(HashMap::new()),
        }
    }

    fn host(&self, name: &str) -> Arc<Host> {
        let mut hosts = self.hosts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(h) = hosts.get(name) {
            return h.clone();
        }
        if hosts.len() >= MAX_HOSTS {
            let now = Instant::now();
            hosts.retain(|_, h| {
                let busy = h.permits.available_permits() < self.concurrency;
                let (next, slowdown) = *h.schedule.lock().unwrap_or_else(|p| p.into_inner());
                busy || next > now || slowdown > 1
            });
        }
        let h = Arc::new(Host {
            permits: Arc::new(Semaphore::new(self.concurrency)),
            schedule: Mutex::new((Instant::now(), 1)),
        });
        hosts.insert(name.to_string(), h.clone());
        h
    }

    /// Waits for a slot for one call to `host`.
    pub async fn acquire(&self, host: &str) -> Permit {
        let h = self.host(host);
        // A closed semaphore cannot happen (it is never closed); go ahead without a slot.
        let slot = h.permits.clone().acquire_owned().await.ok();
        // A virtual schedule (GCRA): each call moves it one spacing ahead; a call may start
        // as long as the schedule is no further ahead of now than the burst allows.
        let start = {
            let mut schedule = h.schedule.lock().unwrap_or_else(|p| p.into_inner());
            let (scheduled, slowdown) = *schedule;
            let now = Instant::now();
            let due = scheduled.max(now);
            let burst = if slowdown > 1 {
                Duration::ZERO
            } else {
                self.burst
            };
            schedule.0 = due + self.spacing * slowdown;
            due.checked_sub(burst).map_or(now, |t| t.max(now))
        };
        tokio::time::sleep_until(start).await;
        Permit { _slot: slot }
    }

    /// The host answered 429: halve its rate.
    pub fn rate_limited(&self, host: &str) {
        let h = self.host(host);
        let mut schedule = h.schedule.lock().unwrap_or_else(|p| p.into_inner());
        schedule.1 = (schedule.1 * 2).min(MAX_SLOWDOWN);
    }

    /// The host answered something else: give back half of the slowdown.
    pub fn answered(&self, host: &str) {
        let h = self.host(host);
        let mut schedule = h.schedule.lock().unwrap_or_else(|p| p.into_inner());
        schedule.1 = (schedule.1 / 2).max(1);
    }

    /// How many hosts are remembered (for tests).
    pub fn hosts(&self) -> usize {
        self.hosts.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Starts `n` calls to `host` at once and returns when each one got its slot, relative to
    /// the start; each call holds its slot for `hold`.
    async fn starts(
        limiter: Arc<HostLimiter>,
        host: &str,
        n: usize,
        hold: Duration,
    ) -> Vec<Duration> {
        let t0 = Instant::now();
        let tasks: Vec<_> = (0..n)
            .map(|_| {
                let limiter = limiter.clone();
                let host = host.to_string();
                tokio::spawn(async move {
                    let _permit = limiter.acquire(&host).await;
                    let started = t0.elapsed();
                    tokio::time::sleep(hold).await;
                    started
                })
            })
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap_or_default());
        }
        out.sort();
        out
    }

    #[tokio::test(start_paused = true)]
    async fn calls_to_one_host_are_spaced_by_the_rate_after_a_burst() {
        let limiter = Arc::new(HostLimiter::new(100, 10.0));
        let s = starts(limiter.clone(), "api.example.com", 30, Duration::ZERO).await;
        // One second's worth (10) at once, then 10/s: the 30th starts 2 s in.
        assert!(s[9] < Duration::from_millis(10), "{s:?}");
        assert!(s[10] >= Duration::from_millis(100), "{s:?}");
        assert!(s[29] >= Duration::from_millis(2000), "{s:?}");
        assert!(s[29] < Duration::from_millis(2100), "{s:?}");
        // No window of one second sees more than twice the rate.
        for (i, start) in s.iter().enumerate() {
            let within = s[i..]
                .iter()
                .take_while(|t| **t < *start + Duration::from_secs(1))
                .count();
            assert!(within <= 20, "{within} calls within a second of {start:?}");
        }
        // After a quiet second, a single call goes at once again.
        tokio::time::advance(Duration::from_secs(2)).await;
        let t0 = Instant::now();
        drop(limiter.acquire("api.example.com").await);
        assert!(t0.elapsed() < Duration::from_millis(10));
    }

    #[tokio::test(start_paused = true)]
    async fn at_most_concurrency_calls_are_in_flight() {
        let limiter = Arc::new(HostLimiter::new(2, 1000.0));
        let s = starts(limiter, "api.example.com", 6, Duration::from_secs(1)).await;
        // Two at a time, each holding its slot for a second: three waves.
        assert!(s[1] < Duration::from_millis(100), "{s:?}");
        assert!(s[2] >= Duration::from_secs(1), "{s:?}");
        assert!(s[5] >= Duration::from_secs(2), "{s:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn hosts_do_not_wait_for_each_other() {
        let limiter = Arc::new(HostLimiter::new(1, 1.0));
        let _slow = limiter.acquire("slow.example.com").await;
        let t0 = Instant::now();
        let _other = limiter.acquire("other.example.com").await;
        assert!(t0.elapsed() < Duration::from_millis(10));
    }

    #[tokio::test(start_paused = true)]
    async fn a_429_halves_the_rate_and_answers_restore_it() {
        let limiter = Arc::new(HostLimiter::new(100, 10.0));
        limiter.rate_limited("api.example.com");
        limiter.rate_limited("api.example.com");
        let s = starts(limiter.clone(), "api.example.com", 3, Duration::ZERO).await;
        // A quarter of the rate and no burst: 400 ms apart.
        assert!(s[2] >= Duration::from_millis(800), "{s:?}");
        limiter.answered("api.example.com");
        limiter.answered("api.example.com");
        tokio::time::advance(Duration::from_secs(2)).await;
        let s = starts(limiter, "api.example.com", 3, Duration::ZERO).await;
        assert!(
            s[2] - s[0] < Duration::from_millis(10),
            "the burst is back: {s:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn many_hosts_do_not_grow_the_table_without_bound() {
        let limiter = Arc::new(HostLimiter::new(4, 1000.0));
        for i in 0..(3 * MAX_HOSTS) {
            drop(limiter.acquire(&format!("h{i}.example.com")).await);
            tokio::time::advance(Duration::from_millis(2)).await;
        }
        assert!(limiter.hosts() <= MAX_HOSTS + 1, "{}", limiter.hosts());
    }

    #[test]
    fn silly_flags_still_let_calls_through() {
        let l = HostLimiter::new(0, 0.0);
        assert_eq!(l.concurrency, 1);
        assert!(l.spacing <= Duration::from_secs(1000));
        let l = HostLimiter::new(1, f64::NAN);
        assert_eq!(l.spacing, Duration::from_millis(100));
    }
}
