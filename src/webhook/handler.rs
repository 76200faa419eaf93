//! `POST /mutate`: parse the AdmissionReview, look the named ProviderKeys up in the cache,
//! ask [`super::patch::mutate`], answer. No API call on this path, and no key: the handler
//! sees ProviderKey objects (spec and status) only.

use std::sync::{Arc, RwLock};
use std::time::Instant;

use actix_web::{HttpResponse, web};
use k8s_openapi::api::core::v1::Pod;
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use kube::runtime::reflector::{ObjectRef, Store};

use super::patch::{self, InjectSettings, KeyFacts, KeyState};
use crate::crd::ProviderKey;
use crate::metrics::Metrics;

/// The largest AdmissionReview read (the API server's own request limit is 3 MiB).
pub const MAX_REVIEW_BYTES: usize = 3 * 1024 * 1024;

pub struct Injector {
    providerkeys: Store<kube::core::DeserializeGuard<ProviderKey>>,
    /// Swapped when the broker's CA changes.
    settings: RwLock<Arc<InjectSettings>>,
    metrics: Arc<Metrics>,
}

impl Injector {
    pub fn new(
        providerkeys: Store<kube::core::DeserializeGuard<ProviderKey>>,
        settings: InjectSettings,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            providerkeys,
            settings: RwLock::new(Arc::new(settings)),
            metrics,
        }
    }

    /// Replaces the CA bundle sidecars get for the broker (a new CA, or mounted files).
    pub fn set_broker_ca(&self, ca_pem: &str) {
        let mut settings = self.settings.write().unwrap_or_else(|p| p.into_inner());
        if settings.broker_ca_pem != ca_pem {
            let mut next = (**settings).clone();
            next.broker_ca_pem = ca_pem.to_string();
            *settings = Arc::new(next);
        }
    }

    /// What the webhook injects now (the broker checks pods against it too).
    pub fn settings(&self) -> Arc<InjectSettings> {
        self.settings
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn key_facts(&self, namespace: &str, name: &str) -> Option<KeyFacts> {
        let guard = self
            .providerkeys
            .get(&ObjectRef::new(name).within(namespace))?;
        let pk = match &guard.0 {
            Ok(pk) => pk,
            Err(_) => {
                return Some(KeyFacts {
                    provider: None,
                    state: KeyState::NotReady {
                        reason: "the ProviderKey cannot be read (see its status)".into(),
                    },
                    service_accounts: Vec::new(),
                    azure_api_version: None,
                });
            }
        };
        let state = if pk.metadata.deletion_timestamp.is_some() {
            KeyState::Deleting
        } else {
            match crate::broker::decide::ready_condition(pk) {
                Some((true, _)) => KeyState::Ready,
                Some((false, reason)) => KeyState::NotReady { reason },
                None => KeyState::NotReady {
                    reason: "not reconciled yet".into(),
                },
            }
        };
        Some(KeyFacts {
            provider: Some(pk.spec.provider),
            state,
            service_accounts: pk
                .spec
                .consumers
                .as_ref()
                .map(|c| c.service_accounts.clone())
                .unwrap_or_default(),
            azure_api_version: (pk.spec.provider == crate::providers::ProviderKind::Azure).then(
                || {
                    pk.spec.azure.as_ref().map_or_else(
                        || crate::crd::DEFAULT_AZURE_API_VERSION.to_owned(),
                        |a| a.api_version.clone(),
                    )
                },
            ),
        })
    }

    /// The answer to one review: `Err` is a malformed review (HTTP 400).
    pub fn review(
        &self,
        body: &[u8],
    ) -> Result<(AdmissionReview<DynamicObject>, &'static str), String> {
        let review: AdmissionReview<Pod> = serde_json::from_slice(body)
            .map_err(|e| format!("the body is not an AdmissionReview of a Pod: {e}"))?;
        let request: AdmissionRequest<Pod> = review
            .try_into()
            .map_err(|e| format!("the AdmissionReview has no request: {e}"))?;
        let response = AdmissionResponse::from(&request);
        let is_pod_create = request.operation == Operation::Create
            && request.resource.group.is_empty()
            && request.resource.resource == "pods"
            && request.sub_resource.is_none();
        let (Some(pod), true) = (request.object.as_ref(), is_pod_create) else {
            return Ok((response.into_review(), "untouched"));
        };
        let namespace = request
            .namespace
            .as_deref()
            .or(pod.metadata.namespace.as_deref())
            .unwrap_or_default();
        let settings = self.settings();
        let lookup = |name: &str| self.key_facts(namespace, name);
        let (response, result) = match patch::mutate(pod, namespace, &lookup, &settings) {
            Ok(mutation) => {
                let result = match (mutation.patch.0.is_empty(), mutation.warnings.is_empty()) {
                    (true, _) => "untouched",
                    (false, true) => "injected",
                    (false, false) => "warned",
                };
                let mut response = response
                    .with_patch(mutation.patch)
                    .map_err(|e| format!("encoding the patch failed: {e}"))?;
                if !mutation.warnings.is_empty() {
                    response.warnings = Some(mutation.warnings);
                }
                (response, result)
            }
            Err(refusal) => (response.deny(refusal.to_string()), "refused"),
        };
        Ok((response.into_review(), result))
    }
}

/// `POST /mutate`.
pub async fn mutate(body: web::Bytes, injector: web::Data<Arc<Injector>>) -> HttpResponse {
    let started = Instant::now();
    match injector.review(&body) {
        Ok((review, result)) => {
            injector.metrics.admission(result, started.elapsed());
            HttpResponse::Ok().json(review)
        }
        Err(why) => {
            injector.metrics.admission("malformed", started.elapsed());
            tracing::warn!(problem = %why, "malformed AdmissionReview");
            HttpResponse::BadRequest().body(why)
        }
    }
}

/// The webhook's routes, for its own listener.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.app_data(web::PayloadConfig::new(MAX_REVIEW_BYTES))
        .route("/mutate", web::post().to(mutate));
}
