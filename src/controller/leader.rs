//! Leader election on a `coordination.k8s.io/v1` Lease, so that only one replica reconciles.
//! kube-rs has none built in. Optimistic concurrency (resourceVersion on replace) decides
//! races; a leader that cannot renew before its lease expires stops leading.

use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, ObjectMeta, PostParams};

pub const LEASE_DURATION: Duration = Duration::from_secs(15);
pub const RENEW_INTERVAL: Duration = Duration::from_secs(5);
const RETRY_INTERVAL: Duration = Duration::from_secs(2);

#[derive(Debug, Clone)]
pub struct LeaderConfig {
    pub lease_name: String,
    pub identity: String,
}

/// Whether `lease` is held by someone else whose term has not run out at `now`.
fn held_by_other(lease: &Lease, identity: &str, now: Timestamp) -> bool {
    let Some(spec) = &lease.spec else {
        return false;
    };
    let holder = spec.holder_identity.as_deref().unwrap_or_default();
    if holder.is_empty() || holder == identity {
        return false;
    }
    let duration = spec.lease_duration_seconds.unwrap_or(0).max(0) as i64;
    match &spec.renew_time {
        Some(renewed) => renewed.0.as_second() + duration > now.as_second(),
        None => false,
    }
}

fn our_spec(identity: &str, previous: Option<&LeaseSpec>, now: Timestamp) -> LeaseSpec {
    let was_ours = previous.and_then(|s| s.holder_identity.as_deref()) == Some(identity);
    let transitions = previous.and_then(|s| s.lease_transitions).unwrap_or(0);
    LeaseSpec {
        holder_identity: Some(identity.to_string()),
        lease_duration_seconds: Some(LEASE_DURATION.as_secs() as i32),
        acquire_time: if was_ours {
            previous.and_then(|s| s.acquire_time.clone())
        } else {
            Some(MicroTime(now))
        },
        renew_time: Some(MicroTime(now)),
        lease_transitions: Some(if was_ours {
            transitions
        } else {
            transitions + 1
        }),
        ..Default::default()
    }
}

/// Tries once to acquire or renew the lease. Ok(true): we hold it now.
async fn try_acquire(api: &Api<Lease>, cfg: &LeaderConfig) -> Result<bool, kube::Error> {
    let now = Timestamp::now();
    match api.get_opt(&cfg.lease_name).await? {
        None => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(cfg.lease_name.clone()),
                    ..Default::default()
                },
                spec: Some(our_spec(&cfg.identity, None, now)),
            };
            match api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(e),
            }
        }
        Some(existing) if held_by_other(&existing, &cfg.identity, now) => Ok(false),
        Some(mut existing) => {
            existing.spec = Some(our_spec(&cfg.identity, existing.spec.as_ref(), now));
            match api
                .replace(&cfg.lease_name, &PostParams::default(), &existing)
                .await
            {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(e),
            }
        }
    }
}

/// Waits until this replica holds the lease.
pub async fn acquire(api: &Api<Lease>, cfg: &LeaderConfig) {
    let mut announced = false;
    loop {
        match try_acquire(api, cfg).await {
            Ok(true) => {
                tracing::info!(lease = %cfg.lease_name, identity = %cfg.identity, "became leader");
                return;
            }
            Ok(false) if !announced => {
                tracing::info!(lease = %cfg.lease_name, "another replica leads; waiting");
                announced = true;
            }
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "leader election failed; retrying"),
        }
        tokio::time::sleep(RETRY_INTERVAL).await;
    }
}

/// Renews the lease until renewal has failed for a whole lease term; then returns, and the
/// caller must stop reconciling (another replica may take over).
pub async fn hold(api: &Api<Lease>, cfg: &LeaderConfig) {
    let mut last_success = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(RENEW_INTERVAL).await;
        match try_acquire(api, cfg).await {
            Ok(true) => last_success = tokio::time::Instant::now(),
            Ok(false) => {
                tracing::error!(lease = %cfg.lease_name, "lost the lease to another replica");
                return;
            }
            Err(e) => tracing::warn!(error = %e, "could not renew the lease"),
        }
        if last_success.elapsed() >= LEASE_DURATION {
            tracing::error!(lease = %cfg.lease_name, "could not renew the lease in time");
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(holder: &str, renewed_secs_ago: i64, now: Timestamp) -> Lease {
        Lease {
            metadata: Default::default(),
            spec: Some(LeaseSpec {
                holder_identity: Some(holder.into()),
                lease_duration_seconds: Some(15),
                renew_time: Some(MicroTime(
                    now - jiff::SignedDuration::from_secs(renewed_secs_ago),
                )),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn a_fresh_lease_of_another_replica_is_respected_and_an_expired_one_is_not() {
        let now = Timestamp::now();
        assert!(held_by_other(&lease("other", 5, now), "me", now));
        assert!(!held_by_other(&lease("other", 20, now), "me", now));
        assert!(!held_by_other(&lease("me", 5, now), "me", now));
    }

    #[test]
    fn taking_over_counts_a_transition_and_renewing_does_not() {
        let now = Timestamp::now();
        let taken = our_spec("me", lease("other", 20, now).spec.as_ref(), now);
        assert_eq!(taken.lease_transitions, Some(1));
        let renewed = our_spec("me", Some(&taken), now);
        assert_eq!(renewed.lease_transitions, Some(1));
        assert_eq!(renewed.acquire_time, taken.acquire_time);
    }
}
