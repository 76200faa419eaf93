//! The admin server: `/metrics` (Prometheus text), `/livez` and `/readyz`, on its own port,
//! one worker: it must answer while the controller is busy, and costs almost nothing.

use std::net::SocketAddr;
use std::sync::Arc;

use actix_web::{App, HttpResponse, HttpServer, web};

use crate::metrics::Metrics;

async fn metrics(m: web::Data<Arc<Metrics>>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/openmetrics-text; version=1.0.0; charset=utf-8")
        .body(m.encode())
}

async fn livez() -> HttpResponse {
    HttpResponse::Ok().body("ok")
}

async fn readyz(m: web::Data<Arc<Metrics>>) -> HttpResponse {
    let missing = m.missing_for_ready();
    if missing.is_empty() {
        HttpResponse::Ok().body("ok")
    } else {
        HttpResponse::ServiceUnavailable().body(format!("not ready: {}", missing.join(", ")))
    }
}

/// Serves `/metrics`, `/livez` and `/readyz` on `addr` until the returned server is stopped.
pub fn admin_server(addr: SocketAddr, m: Arc<Metrics>) -> std::io::Result<actix_web::dev::Server> {
    let data = web::Data::new(m);
    let server = HttpServer::new(move || {
        App::new()
            .app_data(data.clone())
            .route("/metrics", web::get().to(metrics))
            .route("/livez", web::get().to(livez))
            .route("/readyz", web::get().to(readyz))
    })
    .workers(1)
    .disable_signals()
    .bind(addr)?
    .run();
    Ok(server)
}
