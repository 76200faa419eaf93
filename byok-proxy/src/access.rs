//! The access log: one line per request, written by hand into the log writer.
//!
//! The line is exactly the one `tracing-subscriber` writes for the same event (text or JSON,
//! see `docs/proxy.md`; a test compares the two), and `BYOK_LOG` filters it the same way
//! (target `byok_proxy::access`). Formatting it through `tracing-subscriber` cost ~17 k
//! instructions a request, a sixth of the proxy's whole work (field visitors, `fmt`
//! machinery, a calendar computation per line); this writes the same bytes in a tenth of
//! that: the date is formatted once a second per thread, numbers with `itoa` and `ryu`,
//! into a buffer each thread reuses. On a terminal (colours), or before the log writer is
//! installed, the line goes through `tracing` as any other event.

use std::cell::RefCell;
use std::io::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::telemetry::{self, Format};

/// The log target of access lines.
pub const TARGET: &str = "byok_proxy::access";

/// One request's access line. `path` never holds the query.
#[derive(Debug, Clone, Copy)]
pub struct Line<'a> {
    pub key: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    pub status: u16,
    pub upstream_ms: Option<f64>,
    pub duration_ms: f64,
    pub bytes: u64,
    /// Tokens the answer reported (`docs/usage.md`); absent when it reported none.
    pub input_tokens: Option<u64>,
    pub output_tokens: Option<u64>,
    pub model: Option<&'a str>,
    pub key_version: i64,
    pub outcome: &'static str,
}

/// Writes `line` to the log, if `BYOK_LOG` lets `byok_proxy::access` through at INFO.
pub fn log(line: &Line<'_>) {
    if !tracing::enabled!(target: "byok_proxy::access", tracing::Level::INFO) {
        return;
    }
    let Some(sink) = telemetry::sink() else {
        return through_tracing(line);
    };
    BUFFER.with_borrow_mut(|buf| {
        buf.clear();
        match sink.format {
            Format::Text => text(buf, line),
            Format::Json => json(buf, line),
        }
        sink.write(buf);
    });
}

fn through_tracing(line: &Line<'_>) {
    tracing::info!(
        target: "byok_proxy::access",
        key = %line.key,
        method = %line.method,
        path = %line.path,
        status = line.status,
        upstream_ms = line.upstream_ms,
        duration_ms = line.duration_ms,
        bytes = line.bytes,
        input_tokens = line.input_tokens,
        output_tokens = line.output_tokens,
        model = line.model,
        key_version = line.key_version,
        outcome = line.outcome,
        "request"
    );
}

thread_local! {
    static BUFFER: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(512));
    /// The second last formatted and its `YYYY-MM-DDTHH:MM:SS`.
    static SECOND: RefCell<(u64, [u8; 19])> = const { RefCell::new((u64::MAX, [0; 19])) };
}

/// `2026-12-07T22:31:18.123456Z`, as `tracing-subscriber` writes it (UTC, microseconds).
fn timestamp(buf: &mut Vec<u8>, now: SystemTime) {
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    SECOND.with_borrow_mut(|(cached, text)| {
        if *cached != secs {
            let at = i64::try_from(secs)
                .ok()
                .and_then(|s| jiff::Timestamp::from_second(s).ok())
                .unwrap_or(jiff::Timestamp::UNIX_EPOCH);
            let mut formatted = Vec::with_capacity(19);
            let _ = write!(formatted, "{}", at.strftime("%Y-%m-%dT%H:%M:%S"));
            if let Ok(fixed) = <[u8; 19]>::try_from(formatted.as_slice()) {
                *text = fixed;
                *cached = secs;
            }
        }
        buf.extend_from_slice(text);
    });
    let micros = since.subsec_micros();
    let mut digits = [b'0'; 6];
    let mut n = micros;
    for d in digits.iter_mut().rev() {
        *d = b'0' + (n % 10) as u8;
        n /= 10;
    }
    buf.push(b'.');
    buf.extend_from_slice(&digits);
    buf.push(b'Z');
}

/// `tracing-subscriber`'s default text format: `TIME  INFO target: message field=value ...`,
/// `%` fields bare, strings quoted (`Debug`), floats as `Debug` prints them.
fn text(buf: &mut Vec<u8>, line: &Line<'_>) {
    timestamp(buf, SystemTime::now());
    buf.extend_from_slice(b"  INFO byok_proxy::access: request key=");
    buf.extend_from_slice(line.key.as_bytes());
    buf.extend_from_slice(b" method=");
    buf.extend_from_slice(line.method.as_bytes());
    buf.extend_from_slice(b" path=");
    buf.extend_from_slice(line.path.as_bytes());
    buf.extend_from_slice(b" status=");
    buf.extend_from_slice(itoa::Buffer::new().format(line.status).as_bytes());
    if let Some(ms) = line.upstream_ms {
        buf.extend_from_slice(b" upstream_ms=");
        float(buf, ms);
    }
    buf.extend_from_slice(b" duration_ms=");
    float(buf, line.duration_ms);
    buf.extend_from_slice(b" bytes=");
    buf.extend_from_slice(itoa::Buffer::new().format(line.bytes).as_bytes());
    if let Some(n) = line.input_tokens {
        buf.extend_from_slice(b" input_tokens=");
        buf.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
    }
    if let Some(n) = line.output_tokens {
        buf.extend_from_slice(b" output_tokens=");
        buf.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
    }
    if let Some(model) = line.model {
        let _ = write!(buf, " model={model:?}");
    }
    buf.extend_from_slice(b" key_version=");
    buf.extend_from_slice(itoa::Buffer::new().format(line.key_version).as_bytes());
    let _ = write!(buf, " outcome={:?}", line.outcome);
    buf.push(b'\n');
}

/// `tracing-subscriber`'s JSON format: `timestamp`, `level`, `fields` (the message first),
/// `target`; strings escaped as `serde_json` escapes them.
fn json(buf: &mut Vec<u8>, line: &Line<'_>) {
    buf.extend_from_slice(b"{\"timestamp\":\"");
    timestamp(buf, SystemTime::now());
    buf.extend_from_slice(b"\",\"level\":\"INFO\",\"fields\":{\"message\":\"request\",\"key\":");
    string(buf, line.key);
    buf.extend_from_slice(b",\"method\":");
    string(buf, line.method);
    buf.extend_from_slice(b",\"path\":");
    string(buf, line.path);
    buf.extend_from_slice(b",\"status\":");
    buf.extend_from_slice(itoa::Buffer::new().format(line.status).as_bytes());
    if let Some(ms) = line.upstream_ms {
        buf.extend_from_slice(b",\"upstream_ms\":");
        json_float(buf, ms);
    }
    buf.extend_from_slice(b",\"duration_ms\":");
    json_float(buf, line.duration_ms);
    buf.extend_from_slice(b",\"bytes\":");
    buf.extend_from_slice(itoa::Buffer::new().format(line.bytes).as_bytes());
    if let Some(n) = line.input_tokens {
        buf.extend_from_slice(b",\"input_tokens\":");
        buf.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
    }
    if let Some(n) = line.output_tokens {
        buf.extend_from_slice(b",\"output_tokens\":");
        buf.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
    }
    if let Some(model) = line.model {
        buf.extend_from_slice(b",\"model\":");
        string(buf, model);
    }
    buf.extend_from_slice(b",\"key_version\":");
    buf.extend_from_slice(itoa::Buffer::new().format(line.key_version).as_bytes());
    buf.extend_from_slice(b",\"outcome\":");
    string(buf, line.outcome);
    buf.extend_from_slice(b"},\"target\":\"byok_proxy::access\"}\n");
}

/// A float as `{:?}` prints it: the shortest round trip, in decimal from 1e-4 to 1e16
/// (where `ryu` writes the same) and in exponent form beyond (rare: left to `fmt`).
fn float(buf: &mut Vec<u8>, f: f64) {
    if f == 0.0 || (1e-4..1e16).contains(&f.abs()) {
        buf.extend_from_slice(ryu::Buffer::new().format_finite(f).as_bytes());
    } else {
        let _ = write!(buf, "{f:?}");
    }
}

fn json_float(buf: &mut Vec<u8>, f: f64) {
    let _ = serde_json::to_writer(&mut *buf, &f);
}

fn string(buf: &mut Vec<u8>, s: &str) {
    let _ = serde_json::to_writer(&mut *buf, s);
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::fmt::MakeWriter;
    use tracing_subscriber::prelude::*;

    use super::*;

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("captured").extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Captured {
        type Writer = Captured;
        fn make_writer(&'a self) -> Captured {
            self.clone()
        }
    }

    /// What `tracing-subscriber` writes for `line`, timestamp and all.
    fn by_tracing(line: &Line<'_>, json: bool) -> String {
        let out = Captured::default();
        let layer = tracing_subscriber::fmt::layer()
            .with_ansi(false)
            .with_writer(out.clone());
        let subscriber = tracing_subscriber::registry();
        if json {
            let s = subscriber.with(layer.json());
            tracing::subscriber::with_default(s, || through_tracing(line));
        } else {
            let s = subscriber.with(layer);
            tracing::subscriber::with_default(s, || through_tracing(line));
        }
        let bytes = out.0.lock().expect("captured").clone();
        String::from_utf8(bytes).expect("utf-8")
    }

    fn ours(line: &Line<'_>, json: bool) -> String {
        let mut buf = Vec::new();
        if json {
            self::json(&mut buf, line);
        } else {
            text(&mut buf, line);
        }
        String::from_utf8(buf).expect("utf-8")
    }

    /// The timestamp (up to the first `Z`) differs by the instant each was written.
    fn without_time(line: &str) -> String {
        let z = line.find('Z').expect("a timestamp");
        let start = line.find("20").expect("a year");
        format!("{}{}", &line[..start], &line[z + 1..])
    }

    #[test]
    fn the_lines_are_those_tracing_subscriber_writes() {
        let lines = [
            Line {
                key: "team-claude",
                method: "POST",
                path: "/v1/messages",
                status: 200,
                upstream_ms: Some(0.512_345_678),
                duration_ms: 12.0,
                bytes: 1234,
                input_tokens: Some(3695),
                output_tokens: Some(0),
                model: Some("claude-sonnet-4-5"),
                key_version: 3,
                outcome: "complete",
            },
            Line {
                key: "gpt",
                method: "GET",
                path: "/v1/models/a%22b",
                status: 503,
                upstream_ms: None,
                duration_ms: 0.000_012_5,
                bytes: 0,
                input_tokens: None,
                output_tokens: None,
                model: None,
                key_version: 0,
                outcome: "refused",
            },
            Line {
                key: "g",
                method: "POST",
                path: "/v1beta/models/gemini:streamGenerateContent",
                status: 403,
                upstream_ms: Some(61_234.5),
                duration_ms: 1e17,
                bytes: u64::MAX,
                input_tokens: Some(u64::MAX),
                output_tokens: None,
                // What an application may send as the model: quotes, escapes, control
                // characters and non-ASCII.
                model: Some("a\"b\\c\nd\u{7f}é\u{200b}"),
                key_version: i64::MAX,
                outcome: "client_closed",
            },
        ];
        for line in &lines {
            for json in [false, true] {
                let theirs = by_tracing(line, json);
                let ours = ours(line, json);
                assert_eq!(without_time(&ours), without_time(&theirs), "json: {json}");
                if json {
                    let v: serde_json::Value = serde_json::from_str(&ours).expect("json");
                    assert_eq!(v["fields"]["key"], line.key);
                }
            }
        }
    }

    #[test]
    fn floats_are_written_as_debug_writes_them() {
        for f in [
            0.0,
            -0.0,
            1.0,
            0.1,
            1e-4,
            9.999e-5,
            1.25e-5,
            123.456,
            9.99e15,
            1e16,
            1e17,
            -2.5,
            f64::MAX,
            f64::MIN_POSITIVE,
            f64::NAN,
            f64::INFINITY,
        ] {
            let mut buf = Vec::new();
            float(&mut buf, f);
            assert_eq!(String::from_utf8(buf).expect("utf-8"), format!("{f:?}"));
        }
    }

    #[test]
    fn timestamps_are_utc_with_microseconds() {
        let at = |secs: u64, micros: u32| {
            let mut buf = Vec::new();
            timestamp(
                &mut buf,
                UNIX_EPOCH + std::time::Duration::new(secs, micros * 1000 + 999),
            );
            String::from_utf8(buf).expect("utf-8")
        };
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(at(951_782_400, 7), "2000-02-29T00:00:00.000007Z");
        // The cache of the second is per second: the next one is formatted anew.
        assert_eq!(at(1_796_682_678, 123_456), "2026-12-07T22:31:18.123456Z");
        assert_eq!(at(1_796_682_679, 0), "2026-12-07T22:31:19.000000Z");
        assert_eq!(at(4_107_542_399, 999_999), "2100-02-28T23:59:59.999999Z");
    }
}
