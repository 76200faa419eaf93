//! Conditions on a ProviderKey's status, cert-manager style: a list keyed on `type` whose
//! `lastTransitionTime` moves only when the status flips, so watchers are not woken by
//! reconciles that changed nothing.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// Condition types.
pub mod types {
    /// A verified key is in service (the managed Secret holds it).
    pub const READY: &str = "Ready";
    /// Result of the last verification of the key in the source Secret.
    pub const VERIFIED: &str = "Verified";
}

/// `Ready`'s status and reason, for the generation the status describes.
pub fn ready_condition(pk: &crate::crd::ProviderKey) -> Option<(bool, String)> {
    let status = pk.status.as_ref()?;
    let ready = status.conditions.iter().find(|c| c.type_ == types::READY)?;
    Some((ready.status == "True", ready.reason.clone()))
}

/// Reasons that only the `Ready` condition uses; the verification reasons come from
/// [`crate::reason::Reason`].
pub mod ready_reasons {
    /// The key in service passed verification, but a newer key in the source Secret was
    /// rejected; the older key stays in service (see the `Verified` condition for why).
    pub const PENDING_KEY_REJECTED: &str = "PendingKeyRejected";
    /// No verification has finished yet.
    pub const PENDING: &str = "Pending";
}

/// Condition status values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    True,
    False,
    Unknown,
}

impl Status {
    /// Reads a condition's status; anything but `True`/`False` is `Unknown`.
    pub fn parse(s: &str) -> Status {
        match s {
            "True" => Status::True,
            "False" => Status::False,
            _ => Status::Unknown,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Status::True => "True",
            Status::False => "False",
            Status::Unknown => "Unknown",
        }
    }
}

/// A condition as decided by the controller, before timestamps are applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decided {
    pub type_: &'static str,
    pub status: Status,
    pub reason: String,
    pub message: String,
}

impl Decided {
    pub fn new(
        type_: &'static str,
        status: Status,
        reason: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            type_,
            status,
            reason: reason.into(),
            message: message.into(),
        }
    }
}

/// Merges decided conditions into the previous ones: `lastTransitionTime` is kept unless the
/// status flips; conditions of other types are kept untouched.
pub fn merge(
    previous: &[Condition],
    decided: &[Decided],
    generation: Option<i64>,
    now: &Time,
) -> Vec<Condition> {
    let mut out: Vec<Condition> = previous
        .iter()
        .filter(|c| !decided.iter().any(|d| d.type_ == c.type_))
        .cloned()
        .collect();
    for d in decided {
        let prior = previous.iter().find(|c| c.type_ == d.type_);
        let last_transition_time = match prior {
            Some(p) if p.status == d.status.as_str() => p.last_transition_time.clone(),
            _ => now.clone(),
        };
        out.push(Condition {
            type_: d.type_.to_string(),
            status: d.status.as_str().to_string(),
            reason: d.reason.clone(),
            message: d.message.clone(),
            observed_generation: generation,
            last_transition_time,
        });
    }
    out.sort_by(|a, b| a.type_.cmp(&b.type_));
    out
}

/// The condition of `type_`, if present.
pub fn find<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn time(secs: i64) -> Time {
        Time(jiff::Timestamp::from_second(secs).expect("valid"))
    }

    #[test]
    fn transition_time_moves_only_on_a_flip() {
        let first = merge(
            &[],
            &[Decided::new(types::READY, Status::False, "Pending", "")],
            Some(1),
            &time(100),
        );
        assert_eq!(first[0].last_transition_time, time(100));

        // Same status, new reason and message: the transition time stays.
        let same = merge(
            &first,
            &[Decided::new(
                types::READY,
                Status::False,
                "InvalidKey",
                "rejected",
            )],
            Some(2),
            &time(200),
        );
        assert_eq!(same[0].last_transition_time, time(100));
        assert_eq!(same[0].reason, "InvalidKey");
        assert_eq!(same[0].observed_generation, Some(2));

        let flipped = merge(
            &same,
            &[Decided::new(types::READY, Status::True, "Valid", "")],
            Some(2),
            &time(300),
        );
        assert_eq!(flipped[0].last_transition_time, time(300));
    }

    #[test]
    fn other_condition_types_are_kept_and_order_is_stable() {
        let both = merge(
            &[],
            &[
                Decided::new(types::VERIFIED, Status::True, "Valid", ""),
                Decided::new(types::READY, Status::True, "Valid", ""),
            ],
            Some(1),
            &time(1),
        );
        let only_ready = merge(
            &both,
            &[Decided::new(types::READY, Status::False, "X", "")],
            Some(1),
            &time(2),
        );
        let types: Vec<_> = only_ready.iter().map(|c| c.type_.as_str()).collect();
        assert_eq!(types, ["Ready", "Verified"]);
    }
}
