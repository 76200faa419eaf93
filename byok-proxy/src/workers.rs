//! The request path's threads, shaped like nginx's workers.
//!
//! Each of the `--workers` threads runs a current-thread runtime that accepts on every key's
//! listening socket (one socket per key, bound once, a duplicate of it per worker: whichever
//! worker is free takes the next connection) and has upstream pools of its own
//! ([`crate::upstream::pin_to_worker`]). Not `SO_REUSEPORT`: any process of the same UID
//! could join such a port's group and receive a share of the application's connections. A
//! request is read, checked, forwarded, answered and logged on one thread: no work stealing,
//! and no thread wake-up between the steps of a request. With one multi-thread runtime for
//! everything, every request at one connection bounced between the two workers (a futex
//! wake and wait each way, seen with `strace -f`), which cost more CPU than the proxy's own
//! work. Keys' refreshes, the admin listener and signals stay on the control thread.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};

use crate::forward::{self, Shared};
use crate::keys::KeySlot;
use crate::metrics::KeyMetrics;

/// After a failed accept, the first wait and the longest.
const ACCEPT_BACKOFF_FIRST: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// How long a worker's runtime waits for its blocking tasks (a DNS lookup) at exit.
const EXIT_WAIT: Duration = Duration::from_millis(200);

/// The running workers.
pub struct Workers {
    threads: Vec<std::thread::JoinHandle<()>>,
    /// One per worker: its accept loops have ended.
    stopped: Vec<oneshot::Receiver<()>>,
    exit: watch::Sender<bool>,
}

/// The listening socket for `addr` (nonblocking), bound once: while the proxy holds it, no
/// other socket can bind the port.
fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    // As tokio's `TcpListener::bind` does: a restarted proxy rebinds despite TIME_WAIT.
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// Binds every key's socket (a port in use is a start-up error, not a half-working proxy),
/// then starts `count` workers accepting for `keys` until `stop`.
pub fn start(
    count: usize,
    keys: &[(Arc<KeySlot>, SocketAddr)],
    shared: &Arc<Shared>,
    graceful: &Arc<GracefulShutdown>,
    stop: &watch::Receiver<bool>,
) -> anyhow::Result<Workers> {
    let mut sockets = Vec::new();
    for (slot, addr) in keys {
        let listener = bind(*addr)
            .map_err(|e| anyhow::anyhow!("listening on {addr} for key {}: {e}", slot.name))?;
        sockets.push((listener, slot.clone()));
    }
    // Each worker registers a duplicate of every socket with its own event loop.
    let mut bound = Vec::new();
    for _ in 0..count.max(1) {
        let mut listeners = Vec::new();
        for (listener, slot) in &sockets {
            listeners.push((listener.try_clone()?, slot.clone()));
        }
        bound.push(listeners);
    }
    drop(sockets);
    let (exit, exit_rx) = watch::channel(false);
    let mut workers = Workers {
        threads: Vec::new(),
        stopped: Vec::new(),
        exit,
    };
    // Each key's metrics handles, shared by the workers.
    let metrics: Vec<Arc<KeyMetrics>> = keys
        .iter()
        .map(|(slot, _)| Arc::new(KeyMetrics::new(&slot.name)))
        .collect();
    for (index, listeners) in bound.into_iter().enumerate() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (stopped_tx, stopped_rx) = oneshot::channel();
        let (shared, graceful, stop, mut exit_rx) = (
            shared.clone(),
            graceful.clone(),
            stop.clone(),
            exit_rx.clone(),
        );
        let metrics = metrics.clone();
        let thread = std::thread::Builder::new()
            .name(format!("worker-{index}"))
            .spawn(move || {
                crate::upstream::pin_to_worker(index);
                runtime.block_on(async move {
                    let loops: Vec<_> = listeners
                        .into_iter()
                        .zip(metrics)
                        .map(|((listener, slot), key)| {
                            tokio::spawn(accept_loop(
                                listener,
                                slot,
                                key,
                                shared.clone(),
                                graceful.clone(),
                                stop.clone(),
                            ))
                        })
                        .collect();
                    drop(graceful);
                    for accepting in loops {
                        let _ = accepting.await;
                    }
                    let _ = stopped_tx.send(());
                    // Connections keep being served until the drain ends.
                    let _ = exit_rx.wait_for(|exit| *exit).await;
                });
                runtime.shutdown_timeout(EXIT_WAIT);
            })?;
        workers.threads.push(thread);
        workers.stopped.push(stopped_rx);
    }
    Ok(workers)
}

impl Workers {
    /// Waits until every worker stopped accepting (once `stop` was sent).
    pub async fn stopped(&mut self) {
        for stopped in self.stopped.drain(..) {
            let _ = stopped.await;
        }
    }

    /// Ends the workers (what they still serve is dropped) and waits for their threads.
    pub fn exit(self) {
        let _ = self.exit.send(true);
        for thread in self.threads {
            let _ = thread.join();
        }
    }
}

async fn accept_loop(
    listener: std::net::TcpListener,
    slot: Arc<KeySlot>,
    key: Arc<KeyMetrics>,
    shared: Arc<Shared>,
    graceful: Arc<GracefulShutdown>,
    mut stop: watch::Receiver<bool>,
) {
    let listener = match TcpListener::from_std(listener) {
        Ok(listener) => listener,
        Err(e) => {
            tracing::error!(key = %slot.name, error = %e, "a worker could not listen");
            return;
        }
    };
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    let mut backoff = ACCEPT_BACKOFF_FIRST;
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.wait_for(|stop| *stop) => return,
        };
        let stream = match accepted {
            Ok((stream, _)) => {
                backoff = ACCEPT_BACKOFF_FIRST;
                stream
            }
            Err(e) => {
                // Out of file descriptors, say: one line per run of failures, not one per
                // retry of every worker (the log's backpressure would stall the workers).
                if backoff == ACCEPT_BACKOFF_FIRST {
                    tracing::warn!(key = %slot.name, error = %e, "accept failed; retrying with backoff");
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let slot = slot.clone();
        let shared = shared.clone();
        let key = key.clone();
        let service =
            service_fn(move |req| forward::handle(slot.clone(), key.clone(), shared.clone(), req));
        let conn = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU64;

    use super::*;

    fn shared() -> Arc<Shared> {
        Arc::new(Shared {
            metrics: Arc::default(),
            max_inspected_body: 1024,
            inspect_budget: forward::InspectBudget::new(4096),
            access_log: false,
            in_flight: AtomicU64::new(0),
        })
    }

    /// A port another socket holds is a start-up error naming the key; once the proxy holds
    /// a port, no other socket can bind it, not even one of the same UID asking for
    /// `SO_REUSEPORT` (which would receive a share of the application's connections).
    #[test]
    fn a_port_in_use_is_a_start_up_error() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = taken.local_addr().expect("addr");
        let slot = Arc::new(KeySlot::new("team-claude".into(), addr.port()));
        let graceful = Arc::new(GracefulShutdown::new());
        let (stop_tx, stop) = watch::channel(false);
        let keys = [(slot.clone(), addr)];
        let Err(e) = start(2, &keys, &shared(), &graceful, &stop) else {
            panic!("a taken port was bound");
        };
        let message = e.to_string();
        assert!(
            message.contains(&format!("listening on {addr} for key team-claude")),
            "{message}"
        );

        drop(taken);
        let workers = start(2, &keys, &shared(), &graceful, &stop).expect("a free port");
        let joiner = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        joiner.set_reuse_address(true).expect("reuseaddr");
        joiner.set_reuse_port(true).expect("reuseport");
        let joined = joiner.bind(&addr.into()).and_then(|()| joiner.listen(16));
        assert!(joined.is_err(), "another socket joined the key's port");
        for _ in 0..4 {
            std::net::TcpStream::connect(addr).expect("connect");
        }
        let _ = stop_tx.send(true);
        workers.exit();
    }
}
