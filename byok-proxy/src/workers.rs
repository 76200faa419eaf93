//! The request path's threads, shaped like nginx's workers.
//!
//! Each of the `--workers` threads runs a current-thread runtime with a listening socket of
//! its own per key (one `SO_REUSEPORT` group per port: the kernel spreads connections over
//! the workers) and upstream pools of its own ([`crate::upstream::pin_to_worker`]). A
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

/// How long a worker's runtime waits for its blocking tasks (a DNS lookup) at exit.
const EXIT_WAIT: Duration = Duration::from_millis(200);

/// The running workers.
pub struct Workers {
    threads: Vec<std::thread::JoinHandle<()>>,
    /// One per worker: its accept loops have ended.
    stopped: Vec<oneshot::Receiver<()>>,
    exit: watch::Sender<bool>,
}

/// A socket for `addr` that joins the port's `SO_REUSEPORT` group (nonblocking, listening).
fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    // As tokio's `TcpListener::bind` does: a restarted proxy rebinds despite TIME_WAIT.
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// Binds every worker's sockets (a port in use is a start-up error, not a half-working
/// proxy), then starts `count` workers accepting for `keys` until `stop`.
pub fn start(
    count: usize,
    keys: &[(Arc<KeySlot>, SocketAddr)],
    shared: &Arc<Shared>,
    graceful: &Arc<GracefulShutdown>,
    stop: &watch::Receiver<bool>,
) -> anyhow::Result<Workers> {
    let mut bound = Vec::new();
    for _ in 0..count.max(1) {
        let mut listeners = Vec::new();
        for (slot, addr) in keys {
            let listener = bind(*addr)
                .map_err(|e| anyhow::anyhow!("listening on {addr} for key {}: {e}", slot.name))?;
            listeners.push((listener, slot.clone()));
        }
        bound.push(listeners);
    }
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
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.wait_for(|stop| *stop) => return,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(key = %slot.name, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
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

    /// Sharing a port is opt-in on both sides: a port another socket holds (without
    /// `SO_REUSEPORT`, as an application's server binds) is a start-up error naming the key,
    /// never a silently shared port; a free one is bound by every worker.
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
        // Both workers hold the port: connections are accepted.
        for _ in 0..4 {
            std::net::TcpStream::connect(addr).expect("connect");
        }
        let _ = stop_tx.send(true);
        workers.exit();
    }
}
