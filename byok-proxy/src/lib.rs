//! `byok-proxy`: the sidecar every opted-in pod runs (see `docs/proxy.md`), and the
//! Kubernetes-free facts the operator shares with it.
//!
//! One loopback listener per key (HTTP/1.1 and h2c), each forwarding only to its key's
//! verified origin with the provider's auth header set and every client credential removed;
//! an admin listener for the kubelet's probes and Prometheus. Keys come from the operator's
//! broker ([`refresh`]) and are never written to disk, a log or an error.
//!
//! Layout: [`routes`] (the path table, pure), [`endpoints`] (what a key never reaches, pure),
//! [`models`] (defaultModel/allowedModels, pure) over [`inspect`] (one walk of a JSON body),
//! [`answers`] (the proxy's own errors in each provider's shape, pure), [`live`] and
//! [`keys`] (what the broker sent and whether it may be used now), [`refresh`] (the broker
//! client), [`upstream`] (the pool to providers, egress policy), [`forward`] (the hot path),
//! [`access`] (the access line), [`workers`] (the threads that serve requests), [`cli`] (the
//! flags).
//!
//! Shared with the operator, which depends on this crate (never the other way): [`grant`]
//! (the broker <-> sidecar wire format), [`providers`] (each provider's name and credential
//! header), [`egress`] (which provider addresses may be dialled), [`sidecar`] (ports, token
//! path, key names), [`interval`] (Go-style durations), [`telemetry`] (logging).
#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::too_many_lines))]

pub mod access;
pub mod answers;
pub mod cli;
pub mod egress;
pub mod endpoints;
pub mod forward;
pub mod grant;
pub mod inspect;
pub mod interval;
pub mod keys;
pub mod limits;
pub mod live;
pub mod metrics;
pub mod models;
pub mod providers;
pub mod refresh;
pub mod routes;
pub mod sidecar;
pub mod telemetry;
pub mod upstream;
pub mod usage;
pub mod workers;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;

use forward::Shared;
use keys::KeySlot;

/// Everything the sidecar is started with.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    pub admin_addr: SocketAddr,
    pub broker_url: String,
    pub broker_trust: refresh::Trust,
    pub namespace: String,
    pub token_file: PathBuf,
    /// (key name, loopback port).
    pub keys: Vec<(String, u16)>,
    /// Where the key listeners bind (loopback).
    pub listen_ip: std::net::IpAddr,
    pub max_inspected_body: u64,
    pub drain_timeout: Duration,
    pub access_log: bool,
    /// Worker threads (see [`workers`]).
    pub workers: usize,
}

/// The memory bodies read for their model may hold at once, in bodies of the largest size:
/// one such body with its parser scratch and a filled copy (see `InspectBudget`). With the
/// 16 MiB default, 48 MiB beside the idle proxy's ~13 MiB (the static musl build) fits the
/// sidecar's 64 MiB limit.
const INSPECT_BUDGET_BODIES: u64 = 3;

/// Parses `NAME=PORT`.
pub fn parse_key_arg(arg: &str) -> Result<(String, u16), String> {
    let (name, port) = arg
        .split_once('=')
        .ok_or_else(|| format!("--key {arg:?}: expected NAME=PORT"))?;
    crate::sidecar::parse_key_names(name)
        .ok()
        .filter(|names| names.len() == 1 && names[0] == name)
        .ok_or_else(|| format!("--key {arg:?}: {name:?} is not a ProviderKey name"))?;
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("--key {arg:?}: {port:?} is not a port"))?;
    Ok((name.to_owned(), port))
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<forward::OutBody> {
    let mut res = Response::new(
        Full::new(body.into())
            .map_err(|e| match e {})
            .boxed_unsync(),
    );
    *res.status_mut() = status;
    res.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    res
}

/// `/livez`, `/readyz` (every key loaded and current; the body names those that are not)
/// and `/metrics`.
fn admin(
    req: &Request<Incoming>,
    slots: &[Arc<KeySlot>],
    metrics: &metrics::ProxyMetrics,
) -> Response<forward::OutBody> {
    match req.uri().path() {
        "/livez" => text(StatusCode::OK, "ok\n"),
        "/readyz" => {
            let now = Instant::now();
            let missing: Vec<String> = slots
                .iter()
                .filter_map(|s| {
                    s.current(now)
                        .err()
                        .map(|e| format!("{}: {}\n", s.name, e.message()))
                })
                .collect();
            if missing.is_empty() {
                text(StatusCode::OK, "ok\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, missing.concat())
            }
        }
        "/metrics" => {
            let mut res = text(StatusCode::OK, metrics.encode());
            res.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            res
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// Runs the proxy until SIGTERM or SIGINT, then drains. The calling thread is the control
/// thread (key refreshes, the admin listener, signals); requests are served by
/// `cfg.workers` threads of their own ([`workers`]).
pub fn run(cfg: ProxyConfig) -> anyhow::Result<()> {
    let control = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let workers = control.block_on(serve(cfg))?;
    workers.exit();
    Ok(())
}

async fn serve(cfg: ProxyConfig) -> anyhow::Result<workers::Workers> {
    let started = Instant::now();
    // The key and the token live in this process: a debug container or any process of the
    // same UID joining its PID namespace must not read its memory or /proc/<pid>/root.
    if let Err(e) = nix::sys::prctl::set_dumpable(false) {
        tracing::warn!(error = %e, "could not make the proxy non-dumpable");
    }
    anyhow::ensure!(!cfg.keys.is_empty(), "no --key given");
    anyhow::ensure!(
        !cfg.namespace.is_empty(),
        "the pod namespace is unknown (POD_NAMESPACE)"
    );
    let broker = Arc::new(refresh::BrokerClient::new(
        &cfg.broker_url,
        cfg.broker_trust.clone(),
        cfg.namespace.clone(),
        cfg.token_file.clone(),
    )?);
    let metrics = Arc::new(metrics::ProxyMetrics::default());
    let pools = Arc::new(upstream::Pools::new(cfg.workers));
    let shared = Arc::new(Shared {
        metrics: metrics.clone(),
        max_inspected_body: cfg.max_inspected_body,
        inspect_budget: forward::InspectBudget::new(
            cfg.max_inspected_body.saturating_mul(INSPECT_BUDGET_BODIES),
        ),
        access_log: cfg.access_log,
        in_flight: AtomicU64::new(0),
    });
    let keys: Vec<(Arc<KeySlot>, SocketAddr)> = cfg
        .keys
        .iter()
        .map(|(name, port)| {
            let slot = Arc::new(KeySlot::new(name.clone(), *port));
            (slot, SocketAddr::new(cfg.listen_ip, *port))
        })
        .collect();
    let slots: Vec<Arc<KeySlot>> = keys.iter().map(|(slot, _)| slot.clone()).collect();

    // Bind everything first: a port in use is a start-up error, not a half-working proxy.
    let admin_listener = TcpListener::bind(cfg.admin_addr)
        .await
        .map_err(|e| anyhow::anyhow!("listening on {} (admin): {e}", cfg.admin_addr))?;
    let graceful = Arc::new(GracefulShutdown::new());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut workers = workers::start(cfg.workers, &keys, &shared, &graceful, &stop_rx)?;

    for slot in &slots {
        tokio::spawn(refresh::keep_current(
            slot.clone(),
            broker.clone(),
            pools.clone(),
            metrics.clone(),
            cfg.namespace.clone(),
        ));
    }
    tokio::spawn(serve_admin(admin_listener, slots.clone(), metrics.clone()));
    tokio::spawn(log_ready(slots, started));
    tracing::info!(
        keys = ?cfg.keys.iter().map(|(n, p)| format!("{n}={p}")).collect::<Vec<_>>(),
        admin = %cfg.admin_addr,
        workers = cfg.workers,
        "byok proxy listening"
    );

    shutdown_signal().await;
    let _ = stop_tx.send(true);
    workers.stopped().await;
    drain(&shared, graceful, cfg.drain_timeout).await?;
    Ok(workers)
}

/// Waits for the requests in flight, streams included, up to `grace`.
async fn drain(
    shared: &Shared,
    graceful: Arc<GracefulShutdown>,
    grace: Duration,
) -> anyhow::Result<()> {
    let open = shared.in_flight.load(std::sync::atomic::Ordering::Relaxed);
    tracing::info!(in_flight = open, grace_s = grace.as_secs(), "draining");
    let Ok(graceful) = Arc::try_unwrap(graceful) else {
        anyhow::bail!("an accept loop outlived the shutdown");
    };
    match tokio::time::timeout(grace, graceful.shutdown()).await {
        Ok(()) => tracing::info!("drained; exiting"),
        Err(_) => tracing::warn!("the drain grace period ended with requests in flight; exiting"),
    }
    Ok(())
}

/// Serves the admin listener (probes and metrics), HTTP/1.1.
async fn serve_admin(
    listener: TcpListener,
    slots: Vec<Arc<KeySlot>>,
    metrics: Arc<metrics::ProxyMetrics>,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let slots = slots.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let res = admin(&req, &slots, &metrics);
                async move { Ok::<_, std::convert::Infallible>(res) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Logs once when every key is loaded, with the time since start.
async fn log_ready(slots: Vec<Arc<KeySlot>>, started: Instant) {
    loop {
        let now = Instant::now();
        if slots.iter().all(|s| s.current(now).is_ok()) {
            tracing::info!(
                keys = slots.len(),
                ready_ms = started.elapsed().as_secs_f64() * 1000.0,
                "ready: every key is loaded"
            );
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {},
                    _ = tokio::signal::ctrl_c() => {},
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_arguments() {
        assert_eq!(
            parse_key_arg("team-claude=15100"),
            Ok(("team-claude".into(), 15100))
        );
        for bad in [
            "x",
            "x=",
            "=15100",
            "Bad_Name=15100",
            "a=0",
            "a=70000",
            "a,b=15100",
            "team\n=15100",
            " team=15100",
        ] {
            assert!(parse_key_arg(bad).is_err(), "{bad}");
        }
    }
}
