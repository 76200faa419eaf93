//! Temporary stand-in; replaced by the checked parser from the schema branch.
use std::time::Duration;

pub const MIN_INTERVAL: Duration = Duration::from_secs(60);
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct IntervalError(String);

pub fn parse(s: &str) -> Result<Duration, IntervalError> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| IntervalError("not a duration".into()))?;
    let mult = match unit {
        "" if n == 0 => 0,
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        _ => return Err(IntervalError("not a duration".into())),
    };
    n.checked_mul(mult)
        .map(Duration::from_secs)
        .ok_or(IntervalError("too long".into()))
}

pub fn effective_interval(
    spec: Option<&crate::crd::VerificationSpec>,
) -> Result<Option<Duration>, IntervalError> {
    match spec.and_then(|v| v.interval.as_deref()) {
        None => Ok(Some(DEFAULT_INTERVAL)),
        Some(s) => {
            let d = parse(s)?;
            Ok((!d.is_zero()).then(|| d.max(MIN_INTERVAL)))
        }
    }
}
