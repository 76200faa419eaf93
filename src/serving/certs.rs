//! TEMPORARY interface stub; replaced by the serving-certs branch.
use std::sync::Arc;
use std::time::Duration;
use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
pub const DEFAULT_CHECK_EVERY: Duration = Duration::from_secs(60);
#[derive(Debug, Clone, Default)]
pub struct CertSettings { pub namespace: String, pub secret_name: String, pub sans: Vec<String>, pub ca_validity: Duration, pub serving_validity: Duration, pub renew_before: Duration }
pub struct Bundle { pub ca_pem: String }
#[derive(Debug, thiserror::Error)]
#[error("stub")]
pub struct CertError;
pub async fn ensure(_api: &Api<Secret>, _s: &CertSettings) -> Result<Bundle, CertError> { Err(CertError) }
pub fn load_dir(_d: &std::path::Path) -> Result<Bundle, CertError> { Err(CertError) }
#[derive(Debug)]
pub struct ReloadableCert;
impl ReloadableCert { pub fn new(_b: &Bundle) -> Result<Self, CertError> { Err(CertError) } }
impl rustls::server::ResolvesServerCert for ReloadableCert { fn resolve(&self, _c: rustls::server::ClientHello<'_>) -> Option<Arc<rustls::sign::CertifiedKey>> { None } }
pub fn server_config(r: Arc<ReloadableCert>) -> rustls::ServerConfig { rustls::ServerConfig::builder().with_no_client_auth().with_cert_resolver(r) }
pub async fn keep_current(_api: Api<Secret>, _s: CertSettings, _r: Arc<ReloadableCert>, _every: Duration, _f: impl Fn(&Bundle)) {}
pub async fn watch_dir(_d: std::path::PathBuf, _r: Arc<ReloadableCert>, _every: Duration, _f: impl Fn(&Bundle)) {}
pub async fn apply_ca_bundle(_c: &kube::Client, _n: &str, _ca: &str) -> Result<(), CertError> { Ok(()) }
