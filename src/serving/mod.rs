//! Serving TLS: the operator's own CA and serving certificate (or mounted files), reloaded
//! without restart, and the webhook configuration's `caBundle` kept current.

pub mod ca_bundle;
pub mod certs;
pub mod tls;
pub mod trust_bundle;

pub use ca_bundle::{CA_BUNDLE_FIELD_MANAGER, apply_ca_bundle};
pub use certs::{Bundle, CertError, CertSettings, ensure};
pub use tls::{
    ReloadableCert, keep_current, keep_dir_current, load_dir, server_config,
    server_config_with_client_ca,
};
pub mod path_store;
pub mod webhook_path;
