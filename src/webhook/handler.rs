//! `POST` to the webhook's path ([`crate::serving::webhook_path`]): parse the AdmissionReview, look the named ProviderKeys up in the cache,
//! ask [`super::patch::mutate`], answer. No API call on this path, and no key: the handler
//! sees ProviderKey objects (spec and status) only.
//!
//! Whoever reaches the webhook port chooses what it parses, so the work per review is
//! bounded before it starts: the bodies being read share a memory budget
//! ([`BODY_BUDGET_BYTES`], taken chunk by chunk as bytes arrive, so 50 uploads in flight
//! hold what they sent, within the budget, not 50 bodies), each within [`READ_WITHIN`];
//! [`super::prescan`] refuses pods past its limits before the typed parse; and the patch
//! is built from the changes alone. Reviews are worked on by the serving workers, one at a
//! time each.

use std::sync::Arc;
use std::time::Instant;

use actix_web::{HttpRequest, HttpResponse, web};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use kube::runtime::reflector::{ObjectRef, Store};

use super::guard::Guarded;
use super::patch::{self, InjectSettings, KeyFacts, KeyState};
use super::prescan::Shape;
use crate::crd::ProviderKey;
use crate::metrics::Metrics;
use crate::serving::webhook_path::WebhookPaths;

/// The largest AdmissionReview read (the API server's own request limit is 3 MiB).
pub const MAX_REVIEW_BYTES: usize = 3 * 1024 * 1024;
/// The memory all review bodies being read may hold at once (eight of the largest).
pub const BODY_BUDGET_BYTES: usize = 8 * MAX_REVIEW_BYTES;
/// How long a body may take to arrive: the API server sends a review in one go (and gives
/// up after the webhook's `timeoutSeconds`, at most 5 s); a client trickling one in would
/// hold its part of the budget.
const READ_WITHIN: std::time::Duration = std::time::Duration::from_secs(3);

pub struct Injector {
    providerkeys: Store<kube::core::DeserializeGuard<ProviderKey>>,
    /// What it injects now (swapped when the broker's CA changes; the broker reads it too).
    current: Arc<crate::sidecar::Current>,
    metrics: Arc<Metrics>,
    /// [`BODY_BUDGET_BYTES`] in KiB permits.
    body_budget: Arc<tokio::sync::Semaphore>,
    /// Opted-in pods (the broker's cache), for port-forwards that name no port.
    pods: Option<Store<Pod>>,
    /// Where the namespaces of injected pods go, so their trust bundle exists before the
    /// kubelet mounts it ([`crate::serving::trust_bundle::create_missing`]).
    trust_bundles: std::sync::OnceLock<tokio::sync::mpsc::Sender<String>>,
}

impl Injector {
    pub fn new(
        providerkeys: Store<kube::core::DeserializeGuard<ProviderKey>>,
        pods: Option<Store<Pod>>,
        current: Arc<crate::sidecar::Current>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            providerkeys,
            current,
            metrics,
            body_budget: Arc::new(tokio::sync::Semaphore::new(BODY_BUDGET_BYTES / 1024)),
            pods,
            trust_bundles: std::sync::OnceLock::new(),
        }
    }

    /// From now on, the namespace of every pod injected (not on dry runs) is sent to `wanted`.
    pub fn request_trust_bundles(&self, wanted: tokio::sync::mpsc::Sender<String>) {
        let _ = self.trust_bundles.set(wanted);
    }

    /// Whether the pod uses keys, as the pod cache knows it (it holds opted-in pods only).
    fn opted_in(&self, namespace: &str, name: &str) -> bool {
        self.pods.as_ref().is_some_and(|pods| {
            pods.get(&ObjectRef::new(name).within(namespace))
                .is_some_and(|p| crate::names::opts_in(p.metadata.labels.as_ref()))
        })
    }

    /// What the webhook injects now.
    pub fn settings(&self) -> Arc<InjectSettings> {
        self.current.settings()
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
            match crate::status::ready_condition(pk) {
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
        // Before anything is built from it: the limits, read off the raw JSON.
        let shape = super::prescan::scan(body)?;
        if let Err(limit) = shape.check() {
            return Ok((deny(&shape, limit.to_string()), "refused"));
        }
        if let Some(judged) = self.judge_shape(&shape) {
            return Ok(match judged {
                Ok(()) => (allow(&shape), "untouched"),
                Err(refused) => (deny(&shape, refused.to_string()), "refused"),
            });
        }
        let review: AdmissionReview<Pod> = serde_json::from_slice(body)
            .map_err(|e| format!("the body is not an AdmissionReview of a Pod: {e}"))?;
        let request: AdmissionRequest<Pod> = review
            .try_into()
            .map_err(|e| format!("the AdmissionReview has no request: {e}"))?;
        let response = AdmissionResponse::from(&request);
        if let Some(judged) = judge_update(&request) {
            return Ok(match judged {
                Ok(()) => (response.into_review(), "untouched"),
                Err(refused) => (deny(&shape, refused.to_string()), "refused"),
            });
        }
        let is_pod_create = request.operation == Operation::Create
            && request.resource.group.is_empty()
            && request.resource.resource == "pods"
            && request.sub_resource.is_none();
        let (Some(pod), true) = (request.object.as_ref(), is_pod_create) else {
            return Ok((response.into_review(), "untouched"));
        };
        let (response, result) = self.inject(&request, pod, response)?;
        Ok((response.into_review(), result))
    }

    /// What is decided from the review's shape alone, before the object is parsed: tokens for
    /// the broker (the kubelet's alone), and exec, attach and port-forward (from the options
    /// object). `None`: the review needs the pod.
    fn judge_shape(&self, shape: &Shape) -> Option<Result<(), Guarded>> {
        if shape.operation == "CREATE"
            && shape.resource == "/serviceaccounts"
            && shape.sub_resource == "token"
        {
            return Some(super::guard::token_request(
                &shape.username,
                &shape.groups,
                &shape.audiences,
            ));
        }
        if shape.operation != "CONNECT" {
            return None;
        }
        if shape.resource != "/pods" {
            return Some(Ok(()));
        }
        let opted_in = self.opted_in(&shape.namespace, &shape.name);
        let sidecar_ports = super::guard::sidecar_ports(self.settings().ports);
        Some(super::guard::connect(
            &shape.sub_resource,
            shape.container.as_deref(),
            &shape.ports,
            opted_in,
            &sidecar_ports,
        ))
    }

    /// Injects the sidecar into a pod being created, or refuses it; with the result the
    /// metrics count.
    fn inject(
        &self,
        request: &AdmissionRequest<Pod>,
        pod: &Pod,
        response: AdmissionResponse,
    ) -> Result<(AdmissionResponse, &'static str), String> {
        let namespace = request
            .namespace
            .as_deref()
            .or(pod.metadata.namespace.as_deref())
            .unwrap_or_default();
        let settings = self.settings();
        let lookup = |name: &str| self.key_facts(namespace, name);
        let mutation = match patch::mutate(pod, namespace, &lookup, &settings) {
            Ok(mutation) => mutation,
            Err(refusal) => return Ok((response.deny(refusal.to_string()), "refused")),
        };
        let result = match (mutation.patch.0.is_empty(), mutation.warnings.is_empty()) {
            (true, _) => "untouched",
            (false, true) => "injected",
            (false, false) => "warned",
        };
        // The webhook's one side effect (sideEffects: NoneOnDryRun).
        if result != "untouched"
            && !request.dry_run
            && let Some(wanted) = self.trust_bundles.get()
        {
            // Full: dropped; the leader's next pass creates it.
            let _ = wanted.try_send(namespace.to_owned());
        }
        let mut response = response
            .with_patch(mutation.patch)
            .map_err(|e| format!("encoding the patch failed: {e}"))?;
        if !mutation.warnings.is_empty() {
            response.warnings = Some(mutation.warnings);
        }
        Ok((response, result))
    }
}

/// A refusal as the API server shows it: 403 Forbidden with our message.
fn deny(shape: &Shape, message: String) -> AdmissionReview<DynamicObject> {
    let mut response = AdmissionResponse::invalid(message);
    response.uid = shape.uid.clone();
    response.result.code = 403;
    response.result.reason = "Forbidden".into();
    response.into_review()
}

/// An admission with no change, answered from the review's shape.
fn allow(shape: &Shape) -> AdmissionReview<DynamicObject> {
    let mut response = AdmissionResponse::invalid("");
    response.uid = shape.uid.clone();
    response.allowed = true;
    response.result = Default::default();
    response.into_review()
}

/// An update of a pod (its labels and annotations change through `pods/status` too) or of
/// its ephemeral containers, judged by the guard. `None`: not a pod update.
fn judge_update(request: &AdmissionRequest<Pod>) -> Option<Result<(), Guarded>> {
    let is_pod_update = request.operation == Operation::Update
        && request.resource.group.is_empty()
        && request.resource.resource == "pods";
    let (true, Some(old), Some(new)) = (
        is_pod_update,
        request.old_object.as_ref(),
        request.object.as_ref(),
    ) else {
        return None;
    };
    Some(match request.sub_resource.as_deref() {
        None | Some("status") => super::guard::update(old, new),
        Some("ephemeralcontainers") => super::guard::ephemeral(new),
        Some(_) => Ok(()),
    })
}

/// `POST` to the webhook's path.
async fn mutate(mut payload: web::Payload, injector: web::Data<Arc<Injector>>) -> HttpResponse {
    let started = Instant::now();
    let mut held = Held {
        budget: injector.body_budget.clone(),
        kib: 0,
    };
    let read = async {
        let mut body = web::BytesMut::new();
        while let Some(chunk) = payload.next().await {
            let chunk = chunk.map_err(|e| format!("reading the body failed: {e}"))?;
            if body.len() + chunk.len() > MAX_REVIEW_BYTES {
                return Err(format!(
                    "the body is larger than the {MAX_REVIEW_BYTES} bytes a review may have"
                ));
            }
            held.take(body.len() + chunk.len()).await?;
            body.extend_from_slice(&chunk);
        }
        Ok(body.freeze())
    };
    let body = match tokio::time::timeout(READ_WITHIN, read).await {
        Ok(Ok(body)) => body,
        Ok(Err(why)) => {
            injector.metrics.admission("malformed", started.elapsed());
            return HttpResponse::BadRequest().body(why);
        }
        Err(_) => {
            injector.metrics.admission("malformed", started.elapsed());
            return HttpResponse::RequestTimeout().body("the body did not arrive in time");
        }
    };
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

/// The part of the body budget one review holds, given back when it is answered.
struct Held {
    budget: Arc<tokio::sync::Semaphore>,
    kib: u32,
}

impl Held {
    /// Holds enough for `bytes` in all.
    async fn take(&mut self, bytes: usize) -> Result<(), String> {
        let want = u32::try_from(bytes.div_ceil(1024)).unwrap_or(u32::MAX);
        if want > self.kib {
            self.budget
                .acquire_many(want - self.kib)
                .await
                .map_err(|_| "the webhook is shutting down".to_owned())?
                .forget();
            self.kib = want;
        }
        Ok(())
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.budget.add_permits(self.kib as usize);
    }
}

/// The webhook's routes, for its own listener: `POST` to a path [`WebhookPaths`] accepts
/// is a review; anything else gets the same empty 404, so a caller who does not know the path
/// learns nothing (the app data must hold an `Arc<WebhookPaths>`).
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.default_service(web::to(route));
}

async fn route(
    request: HttpRequest,
    payload: web::Payload,
    injector: web::Data<Arc<Injector>>,
    paths: web::Data<Arc<WebhookPaths>>,
) -> HttpResponse {
    if request.method() == actix_web::http::Method::POST
        && paths.accepts(request.path(), Instant::now())
    {
        return mutate(payload, injector).await;
    }
    HttpResponse::NotFound().finish()
}
