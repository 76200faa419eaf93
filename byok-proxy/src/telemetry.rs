//! Logging setup shared by every subcommand.

use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use clap::Args;
use tracing_subscriber::{EnvFilter, fmt, prelude::*};

/// Log options, common to all subcommands.
#[derive(Debug, Args)]
pub struct LogArgs {
    /// Log filter in `RUST_LOG` syntax (e.g. `info,byok_operator=debug`).
    #[arg(long, env = "BYOK_LOG", default_value = "info", global = true)]
    pub log_filter: String,

    /// Emit logs as JSON lines instead of human-readable text.
    #[arg(long, env = "BYOK_LOG_JSON", global = true)]
    pub log_json: bool,
}

/// How long the writer gathers lines after the first of a batch before writing them: at
/// thousands of requests a second, one wake-up and one write for tens of lines.
const BATCH_EVERY: Duration = Duration::from_millis(5);
/// Lines waiting beyond this make a logging thread wait (backpressure, never loss); half of
/// it makes the writer write at once.
const BATCH_MAX: usize = 256 * 1024;

/// Log lines of every thread, written to stderr by one thread in batches.
#[derive(Default)]
pub struct Batch {
    state: Mutex<State>,
    /// Lines arrived (the first of a batch, or half of `BATCH_MAX`), or closing.
    more: Condvar,
    /// The lines were taken.
    room: Condvar,
}

#[derive(Default)]
struct State {
    lines: Vec<u8>,
    closed: bool,
}

impl Batch {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The writer thread: waits for a first line, gathers for `BATCH_EVERY` (less when
    /// lines pile up), writes them all with one call.
    fn write_out(&self, out: &mut impl std::io::Write) {
        let mut spare = Vec::new();
        loop {
            let mut state = self.lock();
            while state.lines.is_empty() && !state.closed {
                state = self.more.wait(state).unwrap_or_else(|p| p.into_inner());
            }
            let deadline = Instant::now() + BATCH_EVERY;
            while !state.closed && state.lines.len() < BATCH_MAX / 2 {
                let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                    break;
                };
                state = self
                    .more
                    .wait_timeout(state, left)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
            std::mem::swap(&mut state.lines, &mut spare);
            let closed = state.closed;
            drop(state);
            self.room.notify_all();
            let _ = out.write_all(&spare).and_then(|()| out.flush());
            spare.clear();
            if closed && self.lock().lines.is_empty() {
                return;
            }
        }
    }
}

impl std::io::Write for &Batch {
    /// Takes a whole line (the fmt layer writes each event with one call).
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        let mut state = self.lock();
        while state.lines.len() >= BATCH_MAX && !state.closed {
            state = self.room.wait(state).unwrap_or_else(|p| p.into_inner());
        }
        let first = state.lines.is_empty();
        state.lines.extend_from_slice(line);
        let full = state.lines.len() >= BATCH_MAX / 2;
        drop(state);
        if first || full {
            self.more.notify_one();
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The log format, for lines written without `tracing` (the access log).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
}

/// Where lines written without `tracing` go: the same writer, in the same format.
pub struct Sink {
    batch: Arc<Batch>,
    pub format: Format,
}

impl Sink {
    /// Writes one whole line.
    pub fn write(&self, line: &[u8]) {
        let _ = std::io::Write::write(&mut &*self.batch, line);
    }
}

static SINK: OnceLock<Sink> = OnceLock::new();

/// The installed log writer and format, unless logs go to a terminal (in colour) or
/// [`init`] has not run.
pub fn sink() -> Option<&'static Sink> {
    SINK.get()
}

/// Writes the lines still waiting when dropped (keep it until exit).
pub struct LogGuard {
    batch: Arc<Batch>,
    writer: Option<std::thread::JoinHandle<()>>,
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        self.batch.lock().closed = true;
        self.batch.more.notify_one();
        self.batch.room.notify_all();
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

/// Installs the global tracing subscriber. Logs go to stderr so stdout stays machine-readable
/// (the operator's `crd` prints YAML, `verify` prints its result). Lines are written by a
/// background thread in batches (the proxy logs every request: a write per line on the
/// request path cost it ~8 % of its CPU, and waking a writer thread per line about as
/// much), with backpressure rather than loss; keep the guard until exit, its drop flushes.
/// Colours only on a terminal: container logs are files.
pub fn init(args: &LogArgs) -> anyhow::Result<LogGuard> {
    let filter = EnvFilter::try_new(&args.log_filter)?;
    let registry = tracing_subscriber::registry().with(filter);
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let batch = Arc::new(Batch::default());
    let writer = {
        let batch = batch.clone();
        std::thread::Builder::new()
            .name("log-writer".into())
            .spawn(move || batch.write_out(&mut std::io::stderr()))?
    };
    let guard = LogGuard {
        batch: batch.clone(),
        writer: Some(writer),
    };
    let format = if args.log_json {
        registry
            .with(fmt::layer().json().with_writer(batch.clone()))
            .try_init()?;
        Some(Format::Json)
    } else {
        registry
            .with(fmt::layer().with_ansi(ansi).with_writer(batch.clone()))
            .try_init()?;
        (!ansi).then_some(Format::Text)
    };
    if let Some(format) = format {
        let _ = SINK.set(Sink { batch, format });
    }
    Ok(guard)
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;

    /// Every line arrives, whole and in order, and the guard's drop writes the last ones.
    #[test]
    fn batched_lines_are_all_written() {
        #[derive(Clone, Default)]
        struct Sink(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Sink {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().expect("sink").extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let batch = Arc::new(Batch::default());
        let sink = Sink::default();
        let writer = {
            let (batch, mut sink) = (batch.clone(), sink.clone());
            std::thread::spawn(move || batch.write_out(&mut sink))
        };
        let guard = LogGuard {
            batch: batch.clone(),
            writer: Some(writer),
        };
        for i in 0..5 {
            (&*batch)
                .write_all(format!("early {i}\n").as_bytes())
                .expect("write");
            std::thread::sleep(BATCH_EVERY * 3);
            let seen = String::from_utf8_lossy(&sink.0.lock().expect("sink")).into_owned();
            assert!(seen.contains(&format!("early {i}\n")), "{seen:?}");
        }
        sink.0.lock().expect("sink").clear();
        let mut expected = Vec::new();
        for i in 0..20_000 {
            let line = format!("line {i} {}\n", "x".repeat(i % 50));
            (&*batch).write_all(line.as_bytes()).expect("write");
            expected.extend_from_slice(line.as_bytes());
        }
        drop(guard);
        assert_eq!(*sink.0.lock().expect("sink"), expected);
    }
}
