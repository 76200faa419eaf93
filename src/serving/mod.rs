//! Serving TLS: the operator's own CA and serving certificate (or mounted files), reloaded
//! without restart, and the webhook configuration's `caBundle` kept current.

pub mod ca_bundle;
pub mod certs;
pub mod tls;

pub use ca_bundle::{CA_BUNDLE_FIELD_MANAGER, apply_ca_bundle};
pub use certs::{Bundle, CertError, CertSettings, ensure};
pub use tls::{ReloadableCert, keep_current, keep_dir_current, load_dir, server_config};
