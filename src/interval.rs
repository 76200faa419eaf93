//! `spec.verification.interval`: the Go-style duration parser ([`byok_proxy::interval`], shared
//! with the sidecar's flags) and the interval in effect for a ProviderKey.

pub use byok_proxy::interval::*;

use std::time::Duration;

use crate::crd::VerificationSpec;

/// The re-verification interval in effect: `Ok(None)` when disabled with `0` (or `0s`, `0h`,
/// ...), the default when unset, and never shorter than the minimum.
pub fn effective_interval(
    spec: Option<&VerificationSpec>,
) -> Result<Option<Duration>, IntervalError> {
    let Some(raw) = spec.and_then(|v| v.interval.as_deref()) else {
        return Ok(Some(DEFAULT_INTERVAL));
    };
    let interval = parse(raw)?;
    Ok((!interval.is_zero()).then(|| interval.max(MIN_INTERVAL)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn effective_interval_defaults_disables_and_raises() {
        let spec = |s: &str| VerificationSpec {
            interval: Some(s.to_string()),
        };
        assert_eq!(effective_interval(None), Ok(Some(DEFAULT_INTERVAL)));
        assert_eq!(
            effective_interval(Some(&VerificationSpec { interval: None })),
            Ok(Some(DEFAULT_INTERVAL))
        );
        for off in ["0", "0s", "0h", "0.0ms"] {
            assert_eq!(effective_interval(Some(&spec(off))), Ok(None), "{off}");
        }
        for short in ["1ns", "0.1ns", "1s", "59.999s"] {
            assert_eq!(
                effective_interval(Some(&spec(short))),
                Ok(Some(MIN_INTERVAL)),
                "{short}"
            );
        }
        assert_eq!(effective_interval(Some(&spec("2h"))), Ok(Some(secs(7200))));
        assert_eq!(
            effective_interval(Some(&spec("banana"))),
            Err(IntervalError::ExpectedNumber)
        );
    }

    /// Objects stored before the schema tightened were read with kube's parser; every ordinary
    /// value must keep its meaning.
    #[test]
    fn ordinary_values_mean_what_they_meant_with_kubes_parser() {
        for input in [
            "0", "24h", "90m", "1h30m", "1.5h", "30s", "2h45m", "500ms", "168h", "1m", "45s",
            "8760h", "0s",
        ] {
            let old: kube::core::Duration = input.parse().expect("kube parses it");
            assert_eq!(parse(input), Ok(Duration::from(old)), "{input}");
        }
    }
}
