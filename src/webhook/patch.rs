//! TEMPORARY interface stub; replaced by the webhook-patch branch.
use k8s_openapi::api::core::v1::{Pod, ResourceRequirements};
use crate::providers::ProviderKind;
#[derive(Debug, Clone)]
pub struct InjectSettings { pub proxy_image: String, pub pull_policy: String, pub resources: ResourceRequirements, pub broker_url: String, pub broker_ca_pem: String, pub native_sidecars: bool }
pub enum KeyState { Ready, NotReady { reason: String }, Deleting }
pub struct KeyFacts { pub provider: Option<ProviderKind>, pub state: KeyState, pub service_accounts: Vec<String> }
pub struct Mutation { pub patch: json_patch::Patch, pub warnings: Vec<String> }
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Refusal(pub String);
pub fn parse_key_names(a: &str) -> Result<Vec<String>, String> { Ok(a.split(',').map(|s| s.trim().to_string()).collect()) }
pub fn mutate(_pod: &Pod, _ns: &str, _keys: &dyn Fn(&str) -> Option<KeyFacts>, _s: &InjectSettings) -> Result<Mutation, Refusal> { Err(Refusal("stub".into())) }
