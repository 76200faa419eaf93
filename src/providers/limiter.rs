//! Politeness towards providers: every verification call to one host takes a start time
//! here, so however many keys are due at once, one provider host sees at most `rate` calls
//! started in any one-second window (a burst of up to `rate` calls may go at once, so a
//! single new key is never delayed) and at most `concurrency` calls in flight. A 429 from a
//! host halves its rate (down to 1/64 of the configured one) and spaces its calls evenly;
//! each answer that is not a 429 gives back half.
//!
//! The controller *reserves* a start time and, when it is later than now, comes back for the
//! verification then instead of waiting: a reconcile never holds one of the controller's
//! workers while it queues for a provider, so 10,000 keys due at one host never delay a key
//! of another.
//!
//! Keyed by host name, which a ProviderKey author chooses: the table forgets idle hosts once
//! it holds [`MAX_HOSTS`], so many distinct hosts cannot grow it without bound.
//!
//! Documented in `docs/providers.md`, section "Per-host limiter".

use std::collections::{HashMap, VecDeque};
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
/// The most calls one window may hold (a huge `--verify-rate-per-host` is capped here).
const MAX_PER_WINDOW: usize = 10_000;

/// Per-host concurrency and rate limits shared by every verification in the process.
#[derive(Debug)]
pub struct HostLimiter {
    concurrency: usize,
    /// At most `per_window` call starts in any `window`: `rate` per second.
    per_window: usize,
    window: Duration,
    /// 1 / rate: the even spacing used while a host is slowed down.
    spacing: Duration,
    hosts: Mutex<HashMap<String, Arc<Host>>>,
}

#[derive(Debug)]
struct Host {
    permits: Arc<Semaphore>,
    schedule: Mutex<Schedule>,
}

#[derive(Debug, Default)]
struct Schedule {
    /// The last `per_window` start times given out (some may lie ahead), oldest first.
    starts: VecDeque<Instant>,
    /// The last `per_window` calls actually started. Reserved turns are spaced, but a
    /// reconcile may come back late and meet others that did: the window holds for what is
    /// sent, not only for what was planned.
    sent: VecDeque<Instant>,
    /// 1 normally; 2, 4 ... after 429s.
    slowdown: u32,
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

/// Appends `start`, keeping the last `per_window` entries.
fn push_window(log: &mut VecDeque<Instant>, start: Instant, per_window: usize) {
    log.push_back(start);
    while log.len() > per_window {
        log.pop_front();
    }
}

impl HostLimiter {
    /// `concurrency` calls in flight and `rate_per_second` call starts per host (each at
    /// least 1 and 0.001 respectively, so a mistaken flag cannot stop verification forever).
    pub fn new(concurrency: usize, rate_per_second: f64) -> HostLimiter {
        let rate = if rate_per_second.is_finite() {
            rate_per_second.clamp(0.001, MAX_PER_WINDOW as f64)
        } else {
            DEFAULT_RATE_PER_SECOND
        };
        // Whole calls per window: `rate` per second, or one per 1/rate seconds when slower.
        let per_window = (rate.floor() as usize).max(1);
        HostLimiter {
            concurrency: concurrency.max(1),
            per_window,
            window: Duration::from_secs_f64(per_window as f64 / rate),
            spacing: Duration::from_secs_f64(1.0 / rate),
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
                let s = h.schedule.lock().unwrap_or_else(|p| p.into_inner());
                busy || s.starts.back().is_some_and(|t| *t > now) || s.slowdown > 1
            });
        }
        let h = Arc::new(Host {
            permits: Arc::new(Semaphore::new(self.concurrency)),
            schedule: Mutex::new(Schedule {
                starts: VecDeque::new(),
                sent: VecDeque::new(),
                slowdown: 1,
            }),
        });
        hosts.insert(name.to_string(), h.clone());
        h
    }

    /// Takes the next start time for a call to `host` (now, or later when the host's rate is
    /// used up). The call must not start before it.
    pub fn reserve(&self, host: &str) -> Instant {
        let h = self.host(host);
        let mut s = h.schedule.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if s.slowdown > 1 {
            // Slowed down by 429s: no burst, evenly spaced at the reduced rate.
            let spacing = self.spacing * s.slowdown;
            let start = s.starts.back().map_or(now, |t| *t + spacing).max(now);
            push_window(&mut s.starts, start, self.per_window);
            return start;
        }
        self.next_in_window(&mut s.starts, now)
    }

    /// The earliest start at or after `now` (and after every start already given) that keeps
    /// at most `per_window` starts in any window; recorded in `log`.
    fn next_in_window(&self, log: &mut VecDeque<Instant>, now: Instant) -> Instant {
        let last = log.back().copied().unwrap_or(now).max(now);
        let start = if log.len() >= self.per_window {
            (log[log.len() - self.per_window] + self.window).max(last)
        } else {
            last
        };
        push_window(log, start, self.per_window);
        start
    }

    /// Whether every in-flight slot of `host` is taken.
    pub fn busy(&self, host: &str) -> bool {
        self.host(host).permits.available_permits() == 0
    }

    /// Waits for an in-flight slot for one call to `host`, and for room in its window of
    /// calls sent (its turn is reserved separately, see [`Self::reserve`]; the wait here is
    /// only for turns that came back late together).
    pub async fn slot(&self, host: &str) -> Permit {
        let h = self.host(host);
        // A closed semaphore cannot happen (it is never closed); go ahead without a slot.
        let slot = h.permits.clone().acquire_owned().await.ok();
        let start = {
            let mut s = h.schedule.lock().unwrap_or_else(|p| p.into_inner());
            self.next_in_window(&mut s.sent, Instant::now())
        };
        tokio::time::sleep_until(start).await;
        Permit { _slot: slot }
    }

    /// Waits for a turn and a slot for one call to `host`.
    pub async fn acquire(&self, host: &str) -> Permit {
        tokio::time::sleep_until(self.reserve(host)).await;
        self.slot(host).await
    }

    /// The host answered 429: halve its rate.
    pub fn rate_limited(&self, host: &str) {
        let h = self.host(host);
        let mut s = h.schedule.lock().unwrap_or_else(|p| p.into_inner());
        s.slowdown = (s.slowdown * 2).min(MAX_SLOWDOWN);
    }

    /// The host answered something else: give back half of the slowdown.
    pub fn answered(&self, host: &str) {
        let h = self.host(host);
        let mut s = h.schedule.lock().unwrap_or_else(|p| p.into_inner());
        s.slowdown = (s.slowdown / 2).max(1);
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
    async fn no_second_sees_more_calls_than_the_rate() {
        let limiter = Arc::new(HostLimiter::new(100, 10.0));
        let s = starts(limiter.clone(), "api.example.com", 30, Duration::ZERO).await;
        // One second's worth (10) at once, then the next ten a second later, and so on.
        assert!(s[9] < Duration::from_millis(10), "{s:?}");
        assert!(s[10] >= Duration::from_millis(1000), "{s:?}");
        assert!(s[29] >= Duration::from_millis(2000), "{s:?}");
        assert!(s[29] < Duration::from_millis(2100), "{s:?}");
        for (i, start) in s.iter().enumerate() {
            let within = s[i..]
                .iter()
                .take_while(|t| **t < *start + Duration::from_secs(1))
                .count();
            assert!(within <= 10, "{within} calls within a second of {start:?}");
        }
        // After a quiet second, a single call goes at once again.
        tokio::time::advance(Duration::from_secs(2)).await;
        let t0 = Instant::now();
        drop(limiter.acquire("api.example.com").await);
        assert!(t0.elapsed() < Duration::from_millis(10));
    }

    #[tokio::test(start_paused = true)]
    async fn reservations_queue_without_waiting() {
        let limiter = HostLimiter::new(4, 10.0);
        let t0 = Instant::now();
        let at: Vec<Duration> = (0..25)
            .map(|_| limiter.reserve("api.example.com") - t0)
            .collect();
        assert_eq!(Instant::now(), t0, "reserving never waits");
        assert!(at[9] < Duration::from_millis(10), "{at:?}");
        assert!(at[10] >= Duration::from_secs(1), "{at:?}");
        assert!(at[24] >= Duration::from_secs(2), "{at:?}");
        assert!(
            limiter.reserve("other.example.com") - t0 < Duration::from_millis(10),
            "another host has its own rate"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn turns_that_come_back_late_together_are_still_spread() {
        let limiter = Arc::new(HostLimiter::new(100, 10.0));
        // Twenty turns reserved two seconds' worth apart, all coming back late at once.
        for _ in 0..20 {
            limiter.reserve("api.example.com");
        }
        tokio::time::advance(Duration::from_secs(5)).await;
        let t0 = Instant::now();
        let tasks: Vec<_> = (0..20)
            .map(|_| {
                let limiter = limiter.clone();
                tokio::spawn(async move {
                    let _slot = limiter.slot("api.example.com").await;
                    t0.elapsed()
                })
            })
            .collect();
        let mut sent = Vec::new();
        for t in tasks {
            sent.push(t.await.unwrap_or_default());
        }
        sent.sort();
        assert!(sent[9] < Duration::from_millis(10), "{sent:?}");
        assert!(sent[10] >= Duration::from_secs(1), "{sent:?}");
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
        assert_eq!(l.per_window, 1);
        let l = HostLimiter::new(1, f64::NAN);
        assert_eq!(l.spacing, Duration::from_millis(100));
        let l = HostLimiter::new(1, 1e300);
        assert_eq!(l.per_window, MAX_PER_WINDOW);
    }
}
