//! Go-style durations (`spec.verification.interval`, the proxy's `--drain-timeout`): durations as users write them (`24h`, `90m`,
//! `1h30m`, `1.5h`, `500ms`, `0`), the format Kubernetes users know from `metav1.Duration`
//! fields and command-line flags.
//!
//! Our own parser rather than `kube::core::Duration`, which panics on inputs such as `1h-1h`
//! and `99999999999999999h`: the value comes from any user who can write a ProviderKey, so it
//! must never be able to take down the controller. Every step here is checked integer
//! arithmetic on nanoseconds (no floats, so `0.1s` is exactly 100ms), and anything unusual is a
//! typed error that the controller reports as `InvalidSpec` on that one object.
//!
//! The grammar is Go's `time.ParseDuration`: a bare `0`, or one or more `<number><unit>` pairs,
//! where a number is ASCII digits with an optional fraction (`1.5`, `.5`, `1.`) and a unit is
//! `ns`, `us` (also `µs`, `μs`), `ms`, `s`, `m` or `h`. Two differences, both refusals: a sign
//! (an interval has no direction, and Go's `-` would make the value negative) and anything
//! longer than [`MAX_INTERVAL`]. There is no `d`: Go has none, and the same YAML must mean the
//! same thing to Go tooling that reads it.

use std::time::Duration;

/// Shortest periodic re-verification interval; anything lower would hammer the provider.
pub const MIN_INTERVAL: Duration = Duration::from_secs(60);
/// Used when `spec.verification.interval` is not set.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(24 * 3600);

/// The longest interval accepted. Anything longer is almost certainly a typo, and a bound keeps
/// every computation with the interval far from overflow.
pub const MAX_INTERVAL: Duration = Duration::from_secs(8760 * 3600);

const NANOS_PER_SECOND: u128 = 1_000_000_000;
/// Fraction digits past this many change a value by less than a nanosecond even in hours
/// (3.6e12 ns), so they are read (they must be digits) but not added.
const MAX_FRACTION_DIGITS: usize = 18;
/// Unknown units are echoed to help the user, but never more than this many characters of them.
const MAX_ECHOED_UNIT_CHARS: usize = 8;

/// Why an interval was refused. The messages are short and read well after the field name
/// (`spec.verification.interval: <message>`); they echo at most a few characters of the input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IntervalError {
    #[error("empty; write a duration such as 24h, or 0 to disable")]
    Empty,
    #[error("a sign (+ or -) is not allowed; write a duration such as 24h")]
    Signed,
    #[error("spaces are not allowed; write a duration such as 1h30m")]
    Space,
    #[error("expected a number (digits 0-9) before each unit, as in 24h or 1h30m")]
    ExpectedNumber,
    #[error("a number needs a unit: h, m, s, ms, us or ns (only a bare 0 needs none)")]
    MissingUnit,
    #[error("unknown unit {0:?}; use h, m, s, ms, us or ns (a day is 24h)")]
    UnknownUnit(String),
    #[error("longer than 8760h (one year)")]
    TooLong,
}

/// Parses a Go-style duration (see the module docs). Never panics, whatever the input.
pub fn parse(s: &str) -> Result<Duration, IntervalError> {
    if s.is_empty() {
        return Err(IntervalError::Empty);
    }
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    let max = MAX_INTERVAL.as_nanos();
    let mut total: u128 = 0;
    let mut any_nonzero_digit = false;
    let mut rest = s;
    while !rest.is_empty() {
        let (whole, fraction, after) = split_number(rest)?;
        let (unit, after) = split_unit(after)?;
        any_nonzero_digit |= whole.bytes().chain(fraction.bytes()).any(|b| b != b'0');
        total = total
            .checked_add(term(whole, fraction, unit)?)
            .ok_or(IntervalError::TooLong)?;
        // Checked on every term, so a long chain of terms can never build up to an overflow.
        if total > max {
            return Err(IntervalError::TooLong);
        }
        rest = after;
    }
    // A non-zero value that truncates to 0ns (`0.1ns`) would otherwise read as "disabled",
    // the opposite of what its author asked for; 1ns is then raised to the minimum interval.
    if total == 0 && any_nonzero_digit {
        total = 1;
    }
    let nanos = u64::try_from(total).map_err(|_| IntervalError::TooLong)?;
    Ok(Duration::from_nanos(nanos))
}

/// Splits a leading number into its whole and fraction digits and what follows.
fn split_number(s: &str) -> Result<(&str, &str, &str), IntervalError> {
    let (whole, after) = split_digits(s);
    let (fraction, after) = match after.strip_prefix('.') {
        Some(after_dot) => split_digits(after_dot),
        None => ("", after),
    };
    if whole.is_empty() && fraction.is_empty() {
        return Err(match s.chars().next() {
            Some('+' | '-') => IntervalError::Signed,
            Some(c) if c.is_whitespace() => IntervalError::Space,
            _ => IntervalError::ExpectedNumber,
        });
    }
    Ok((whole, fraction, after))
}

fn split_digits(s: &str) -> (&str, &str) {
    // Counting ASCII bytes keeps the split on a char boundary.
    let len = s.bytes().take_while(u8::is_ascii_digit).count();
    s.split_at(len)
}

/// Splits a leading unit off and returns its length in nanoseconds.
fn split_unit(s: &str) -> Result<(u128, &str), IntervalError> {
    let len = s.find(|c: char| !c.is_alphabetic()).unwrap_or(s.len());
    let (unit, after) = s.split_at(len);
    let nanos = match unit {
        "ns" => 1,
        // U+00B5 MICRO SIGN and U+03BC GREEK SMALL LETTER MU, as Go accepts both.
        "us" | "\u{b5}s" | "\u{3bc}s" => 1_000,
        "ms" => 1_000_000,
        "s" => NANOS_PER_SECOND,
        "m" => 60 * NANOS_PER_SECOND,
        "h" => 3600 * NANOS_PER_SECOND,
        "" if after.starts_with(char::is_whitespace) => return Err(IntervalError::Space),
        "" => return Err(IntervalError::MissingUnit),
        other => {
            let echoed = other.chars().take(MAX_ECHOED_UNIT_CHARS).collect();
            return Err(IntervalError::UnknownUnit(echoed));
        }
    };
    Ok((nanos, after))
}

/// `whole.fraction` units in nanoseconds, the fraction truncated toward zero as Go does.
fn term(whole: &str, fraction: &str, unit_nanos: u128) -> Result<u128, IntervalError> {
    let whole = digits_value(whole)?;
    let fraction = fraction.get(..MAX_FRACTION_DIGITS).unwrap_or(fraction);
    let numerator = digits_value(fraction)?;
    let len = u32::try_from(fraction.len()).map_err(|_| IntervalError::TooLong)?;
    let scale = 10u128.checked_pow(len).ok_or(IntervalError::TooLong)?;
    let fraction_nanos = numerator
        .checked_mul(unit_nanos)
        .ok_or(IntervalError::TooLong)?
        .checked_div(scale)
        .ok_or(IntervalError::TooLong)?;
    whole
        .checked_mul(unit_nanos)
        .and_then(|n| n.checked_add(fraction_nanos))
        .ok_or(IntervalError::TooLong)
}

/// The value of a run of ASCII digits; too many to fit is, for an interval, too long.
fn digits_value(digits: &str) -> Result<u128, IntervalError> {
    digits.bytes().try_fold(0u128, |acc, b| {
        let digit = char::from(b)
            .to_digit(10)
            .ok_or(IntervalError::ExpectedNumber)?;
        acc.checked_mul(10)
            .and_then(|v| v.checked_add(u128::from(digit)))
            .ok_or(IntervalError::TooLong)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SECOND: u64 = 1_000_000_000;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn accepts_what_users_write() {
        for (input, expected) in [
            ("0", Duration::ZERO),
            ("0s", Duration::ZERO),
            ("0h", Duration::ZERO),
            ("0.0m", Duration::ZERO),
            ("90s", secs(90)),
            ("1m30s", secs(90)),
            ("24h", secs(24 * 3600)),
            ("1.5h", secs(5400)),
            (".5h", secs(1800)),
            ("1.h", secs(3600)),
            ("500ms", Duration::from_millis(500)),
            ("0.1s", Duration::from_millis(100)),
            ("1h0m0s", secs(3600)),
            ("2h45m", secs(2 * 3600 + 45 * 60)),
            ("1us", Duration::from_micros(1)),
            ("1\u{b5}s", Duration::from_micros(1)),
            ("1\u{3bc}s", Duration::from_micros(1)),
            ("7ns", Duration::from_nanos(7)),
            ("8760h", MAX_INTERVAL),
            ("525600m", MAX_INTERVAL),
            ("0000000000000000000000000000000000000000001h", secs(3600)),
            ("1.0000000000000000000000000000001h", secs(3600)),
            // Sub-nanosecond but not zero: must not read as "disabled".
            ("0.1ns", Duration::from_nanos(1)),
        ] {
            assert_eq!(parse(input), Ok(expected), "{input}");
        }
    }

    #[test]
    fn refuses_everything_else_with_a_specific_error() {
        use IntervalError::*;
        let long_digits = "9".repeat(10_000);
        let long_digits_h = format!("{long_digits}h");
        let long_unit = format!("1{}", "x".repeat(10_000));
        for (input, expected) in [
            ("", Empty),
            ("1h-1h", Signed),
            ("-1h", Signed),
            ("+1h", Signed),
            ("-0", Signed),
            ("99999999999999999h", TooLong),
            ("8760h1ns", TooLong),
            ("8761h", TooLong),
            ("4380h4380h1s", TooLong),
            (long_digits.as_str(), MissingUnit),
            (long_digits_h.as_str(), TooLong),
            ("banana", ExpectedNumber),
            ("h", ExpectedNumber),
            (".h", ExpectedNumber),
            (".", ExpectedNumber),
            ("1e3s", UnknownUnit("e".into())),
            ("1d", UnknownUnit("d".into())),
            ("1H", UnknownUnit("H".into())),
            (long_unit.as_str(), UnknownUnit("xxxxxxxx".into())),
            ("1h 30m", Space),
            (" 1h", Space),
            ("1h ", Space),
            ("1 h", Space),
            ("\u{663}h", ExpectedNumber), // ARABIC-INDIC DIGIT THREE
            ("1", MissingUnit),
            ("00", MissingUnit),
            ("1h0", MissingUnit),
            ("1%", MissingUnit),
            ("1h%", ExpectedNumber),
            ("1..5h", MissingUnit),
        ] {
            assert_eq!(parse(input), Err(expected), "{:.40}", input);
        }
    }

    #[test]
    fn error_messages_stay_short_whatever_the_input() {
        for input in [
            format!("1{}", "\u{e9}".repeat(10_000)),
            format!("1{}", "\u{1f600}a".repeat(5_000)),
            format!("1{}\u{202e}", "\u{5d0}".repeat(10)),
        ] {
            let err = parse(&input).expect_err("not a duration");
            assert!(err.to_string().chars().count() < 100, "{err}");
        }
        let err = parse(&"7".repeat(100_000)).expect_err("no unit");
        assert!(!err.to_string().contains("777"), "{err}");
    }

    const UNITS: [(&str, u64); 8] = [
        ("ns", 1),
        ("us", 1_000),
        ("\u{b5}s", 1_000),
        ("\u{3bc}s", 1_000),
        ("ms", 1_000_000),
        ("s", SECOND),
        ("m", 60 * SECOND),
        ("h", 3600 * SECOND),
    ];

    /// One `<number><unit>` term: whole part, fraction digits (maybe none, maybe a bare dot),
    /// and an index into [`UNITS`].
    fn term_strategy() -> impl Strategy<Value = (u64, Option<String>, usize)> {
        (
            0u64..100_000,
            proptest::option::of("[0-9]{0,12}"),
            0..UNITS.len(),
        )
    }

    /// Go's `Duration.String()` format, which is also what `kubectl` prints.
    fn go_format(d: Duration) -> String {
        let nanos = d.as_nanos();
        if nanos == 0 {
            return "0s".into();
        }
        let with_fraction = |value: u128, per: u128, unit: &str| {
            let (whole, rest) = (value / per, value % per);
            let width = per.ilog10() as usize;
            let fraction = format!("{rest:0width$}");
            let fraction = fraction.trim_end_matches('0');
            if fraction.is_empty() {
                format!("{whole}{unit}")
            } else {
                format!("{whole}.{fraction}{unit}")
            }
        };
        if nanos < 1_000 {
            return format!("{nanos}ns");
        }
        if nanos < 1_000_000 {
            return with_fraction(nanos, 1_000, "\u{b5}s");
        }
        if nanos < u128::from(SECOND) {
            return with_fraction(nanos, 1_000_000, "ms");
        }
        let hour = 3600 * u128::from(SECOND);
        let minute = 60 * u128::from(SECOND);
        let (h, rest) = (nanos / hour, nanos % hour);
        let (m, rest) = (rest / minute, rest % minute);
        let s = with_fraction(rest, u128::from(SECOND), "s");
        match (h, m) {
            (0, 0) => s,
            (0, m) => format!("{m}m{s}"),
            (h, m) => format!("{h}h{m}m{s}"),
        }
    }

    proptest! {
        #[test]
        fn never_panics_on_any_text(s in "\\PC{0,64}") {
            if let Ok(d) = parse(&s) {
                prop_assert!(d <= MAX_INTERVAL);
            }
        }

        #[test]
        fn never_panics_on_near_misses(s in "[0-9.hmsnuµμ+\\- 0-9a-z]{0,64}") {
            if let Ok(d) = parse(&s) {
                prop_assert!(d <= MAX_INTERVAL);
            }
        }

        #[test]
        fn sums_the_terms(terms in proptest::collection::vec(term_strategy(), 1..6)) {
            let mut text = String::new();
            let mut expected: u128 = 0;
            let mut nonzero = false;
            for (whole, fraction, unit) in &terms {
                let (name, per) = UNITS[*unit];
                text.push_str(&whole.to_string());
                let digits = match fraction {
                    Some(digits) => {
                        text.push('.');
                        digits.as_str()
                    }
                    None => "",
                };
                text.push_str(digits);
                text.push_str(name);
                // Independently: (whole * 10^k + fraction) * unit / 10^k, truncated.
                let k = u32::try_from(digits.len()).expect("short");
                let scaled: u128 = format!("{whole}{digits}").parse().expect("digits");
                expected += scaled * u128::from(per) / 10u128.pow(k);
                nonzero |= scaled != 0;
            }
            if expected == 0 && nonzero {
                expected = 1;
            }
            let parsed = parse(&text);
            if expected > MAX_INTERVAL.as_nanos() {
                prop_assert_eq!(parsed, Err(IntervalError::TooLong), "{}", text);
            } else {
                let expected = Duration::from_nanos(u64::try_from(expected).expect("fits"));
                prop_assert_eq!(parsed, Ok(expected), "{}", text);
            }
        }

        #[test]
        fn go_formatted_durations_round_trip(nanos in 0..=MAX_INTERVAL.as_nanos() as u64) {
            let d = Duration::from_nanos(nanos);
            prop_assert_eq!(parse(&go_format(d)), Ok(d), "{}", go_format(d));
        }

        #[test]
        fn unit_by_unit_formatting_round_trips(
            h in 0u64..8760, m in 0u64..60, s in 0u64..60, ms in 0u64..1000, ns in 0u64..1000
        ) {
            let text = format!("{h}h{m}m{s}s{ms}ms{ns}ns");
            let expected = Duration::from_secs(h * 3600 + m * 60 + s)
                + Duration::from_millis(ms)
                + Duration::from_nanos(ns);
            prop_assert_eq!(parse(&text), Ok(expected), "{}", text);
        }
    }
}
