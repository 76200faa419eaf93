//! Serving TLS: the operator's own CA and serving certificate (or mounted files), reloaded
//! without restart, and the webhook configuration's `caBundle` kept current.

pub mod certs;
