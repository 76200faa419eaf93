//! Streamed answers: an actix streaming body that hands each event to the connection on its
//! own, paced by [`FakeProvider::set_stream_plan`](super::FakeProvider::set_stream_plan), and
//! the [`StreamRecord`] of every stream.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use actix_web::HttpResponse;
use actix_web::web::Bytes;
use byok_operator::providers::ProviderKind;
use futures::Stream;

use super::{Shared, lock};

/// One streamed answer as the fake sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamRecord {
    pub provider: ProviderKind,
    /// Path without the query, e.g. `/anthropic/v1/messages`.
    pub path: String,
    /// When each delta event (`chunk-0`, `chunk-1`, …) was handed to the connection, in
    /// order. The framing events before the first delta go out just before it, the ones
    /// after the last delta just after it; they have no entry here.
    pub sent: Vec<Instant>,
    /// The last event (of the framing too) was handed to the connection.
    pub completed: bool,
    /// The stream was dropped before its last event: the client went away.
    pub cancelled: bool,
}

/// The events of one streamed answer, in order: framing events, then the deltas, then
/// framing events.
pub(crate) struct Events {
    before: Vec<Bytes>,
    deltas: Vec<Bytes>,
    after: Vec<Bytes>,
}

impl Events {
    /// `delta(i)` renders delta `i` of `count`.
    pub(crate) fn new(
        before: Vec<Bytes>,
        count: usize,
        delta: impl FnMut(usize) -> Bytes,
        after: Vec<Bytes>,
    ) -> Events {
        Events {
            before,
            deltas: (0..count).map(delta).collect(),
            after,
        }
    }
}

/// An SSE (`data: …` / `event: …`) event: `event` is the `event:` line, if any.
pub(crate) fn sse(event: Option<&str>, data: &str) -> Bytes {
    match event {
        Some(name) => Bytes::from(format!("event: {name}\ndata: {data}\n\n")),
        None => Bytes::from(format!("data: {data}\n\n")),
    }
}

/// The body of a streamed answer. Dropping it before the end marks its record cancelled.
struct Body {
    shared: Arc<Shared>,
    /// Id in the stream log, when recording.
    record: Option<u64>,
    parts: std::vec::IntoIter<(bool, Bytes)>,
    interval: Duration,
    /// Deltas not yet sent.
    deltas_left: usize,
    /// The wait before the next delta.
    pause: Option<Pin<Box<tokio::time::Sleep>>>,
    completed: bool,
}

impl Body {
    fn update(&self, f: impl FnOnce(&mut StreamRecord)) {
        if let Some(id) = self.record
            && let Some(r) = lock(&self.shared.streams).get_mut(id)
        {
            f(r);
        }
    }
}

impl Stream for Body {
    type Item = Result<Bytes, std::convert::Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if let Some(pause) = this.pause.as_mut() {
            if pause.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            this.pause = None;
        }
        let Some((is_delta, bytes)) = this.parts.next() else {
            return Poll::Ready(None);
        };
        let last = this.parts.len() == 0;
        if is_delta {
            let now = Instant::now();
            this.deltas_left -= 1;
            if this.deltas_left > 0 && !this.interval.is_zero() {
                this.pause = Some(Box::pin(tokio::time::sleep(this.interval)));
            }
            this.update(|r| {
                r.sent.push(now);
                r.completed = last;
            });
        } else if last {
            this.update(|r| r.completed = true);
        }
        if last {
            this.completed = true;
            this.shared.open_streams.fetch_sub(1, Ordering::SeqCst);
        }
        Poll::Ready(Some(Ok(bytes)))
    }
}

impl Drop for Body {
    fn drop(&mut self) {
        if !self.completed {
            self.shared.open_streams.fetch_sub(1, Ordering::SeqCst);
            self.update(|r| r.cancelled = true);
        }
    }
}

/// A 200 streaming `events` with the current plan's pacing.
pub(crate) fn respond(
    shared: &Arc<Shared>,
    provider: ProviderKind,
    path: &str,
    content_type: &str,
    events: Events,
    interval: Duration,
) -> HttpResponse {
    let deltas = events.deltas.len();
    let parts: Vec<(bool, Bytes)> = events
        .before
        .into_iter()
        .map(|b| (false, b))
        .chain(events.deltas.into_iter().map(|b| (true, b)))
        .chain(events.after.into_iter().map(|b| (false, b)))
        .collect();
    let record = shared.recording().then(|| {
        lock(&shared.streams).push(StreamRecord {
            provider,
            path: path.to_owned(),
            sent: Vec::with_capacity(deltas),
            completed: false,
            cancelled: false,
        })
    });
    shared.open_streams.fetch_add(1, Ordering::SeqCst);
    let mut body = Body {
        shared: shared.clone(),
        record,
        parts: parts.into_iter(),
        interval,
        deltas_left: deltas,
        pause: None,
        completed: false,
    };
    if body.parts.len() == 0 {
        // Nothing to send: complete already.
        body.completed = true;
        body.shared.open_streams.fetch_sub(1, Ordering::SeqCst);
        body.update(|r| r.completed = true);
    }
    HttpResponse::Ok()
        .content_type(content_type)
        .insert_header((actix_web::http::header::CACHE_CONTROL, "no-cache"))
        .streaming(body)
}
