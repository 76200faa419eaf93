//! Where the webhook's path ([`super::webhook_path`]) lives: a Secret every replica reads and
//! follows, and the webhook configuration the operator points at it.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::{MutatingWebhook, MutatingWebhookConfiguration};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use tokio::time::Instant;

use super::webhook_path::{self, SECRET_KEY, WRITTEN_KEY, WebhookPaths};

/// The field manager that owns the path in each webhook's `clientConfig` (and nothing else):
/// not the caBundle's, so that each is applied without dropping the other.
pub const PATH_FIELD_MANAGER: &str = "byok-operator-webhook-path";

/// Where the path is kept, and what may be done about it.
#[derive(Debug, Clone)]
pub struct PathSettings {
    pub namespace: String,
    /// The Secret holding the path under [`SECRET_KEY`].
    pub secret: String,
    /// Whether this operator creates that Secret when it is missing. Not when it is the TLS
    /// Secret the certificate code creates: a Secret holding only the path would look like a
    /// lost CA to it.
    pub create_secret: bool,
    /// The MutatingWebhookConfiguration to point at the path (`None`: leave it alone).
    pub configuration: Option<String>,
    /// The operator's Deployment: a new path is published only once every replica runs this
    /// version, since older replicas serve only the path they know.
    pub deployment: Option<String>,
    /// How long after learning a path a replica writes it into the configuration
    /// ([`webhook_path::PUBLISH_AFTER`]; tests with one replica use none).
    pub publish_after: Duration,
    /// How long a path the configuration no longer carries stays accepted
    /// ([`webhook_path::GRACE`]).
    pub grace: Duration,
    /// How often the path is replaced ([`webhook_path::ROTATE_EVERY`]; `None`: never).
    pub rotate_every: Option<Duration>,
    /// This replica's pod (in `namespace`): with `deployment`, a new path is published only
    /// by a replica of the Deployment's current revision.
    pub pod_name: Option<String>,
}

impl PathSettings {
    /// The defaults for the path kept in `secret` of `namespace`.
    pub fn new(namespace: &str, secret: &str) -> Self {
        Self {
            namespace: namespace.to_owned(),
            secret: secret.to_owned(),
            create_secret: false,
            configuration: None,
            deployment: None,
            publish_after: webhook_path::PUBLISH_AFTER,
            grace: webhook_path::GRACE,
            rotate_every: Some(webhook_path::ROTATE_EVERY),
            pod_name: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PathError {
    #[error("Secret {namespace}/{name}: {source}")]
    Api {
        namespace: String,
        name: String,
        source: kube::Error,
    },
    #[error("Secret {namespace}/{name} does not exist yet")]
    Missing { namespace: String, name: String },
    #[error("Secret {namespace}/{name} kept changing under us")]
    Contended { namespace: String, name: String },
}

/// The path in the Secret, writing a new one there if it holds none (or one this operator
/// could not have made). Replicas racing to write it end up with the same path: every write
/// is conditional on the version read.
pub async fn ensure(api: &Api<Secret>, settings: &PathSettings) -> Result<String, PathError> {
    let (namespace, name) = (&settings.namespace, &settings.secret);
    let api_err = |source| PathError::Api {
        namespace: namespace.clone(),
        name: name.clone(),
        source,
    };
    for _ in 0..5 {
        match api.get_opt(name).await.map_err(api_err)? {
            Some(secret) => {
                if let Some(path) = stored(&secret) {
                    return Ok(path);
                }
                match write_new(api, secret).await {
                    Ok(path) => return Ok(path),
                    Err(kube::Error::Api(status)) if status.code == 409 => continue,
                    Err(e) => return Err(api_err(e)),
                }
            }
            None if settings.create_secret => {
                let path = webhook_path::generate();
                let secret = Secret {
                    metadata: ObjectMeta {
                        name: Some(name.clone()),
                        namespace: Some(namespace.clone()),
                        labels: Some(
                            [(
                                "app.kubernetes.io/managed-by".to_owned(),
                                "byok-operator".to_owned(),
                            )]
                            .into(),
                        ),
                        ..Default::default()
                    },
                    data: Some(new_path_data(&path)),
                    type_: Some("Opaque".into()),
                    ..Default::default()
                };
                match api.create(&PostParams::default(), &secret).await {
                    Ok(_) => {
                        tracing::info!(secret = %name, "created the webhook path's Secret");
                        return Ok(path);
                    }
                    Err(kube::Error::Api(status)) if status.code == 409 => continue,
                    Err(e) => return Err(api_err(e)),
                }
            }
            None => {
                return Err(PathError::Missing {
                    namespace: namespace.clone(),
                    name: name.clone(),
                });
            }
        }
    }
    Err(PathError::Contended {
        namespace: namespace.clone(),
        name: name.clone(),
    })
}

/// [`ensure`], riding out a Secret that does not exist yet or an API server that does not
/// answer yet, for about a minute.
pub async fn ensure_with_retries(
    api: &Api<Secret>,
    settings: &PathSettings,
) -> Result<String, PathError> {
    let mut delay = Duration::from_millis(250);
    let mut attempt = 1;
    loop {
        match ensure(api, settings).await {
            Err(e) if attempt < 15 => {
                tracing::warn!(error = %e, attempt, "loading the webhook path; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
                attempt += 1;
            }
            other => return other,
        }
    }
}

/// The data keys of a path written now.
fn new_path_data(path: &str) -> std::collections::BTreeMap<String, ByteString> {
    let now = jiff::Timestamp::now().as_second();
    [
        (SECRET_KEY.to_owned(), ByteString(path.as_bytes().to_vec())),
        (
            WRITTEN_KEY.to_owned(),
            ByteString(now.to_string().into_bytes()),
        ),
    ]
    .into()
}

/// Writes a new path into `secret` (as read: the write fails with 409 if it changed since).
async fn write_new(api: &Api<Secret>, mut secret: Secret) -> Result<String, kube::Error> {
    let path = webhook_path::generate();
    secret
        .data
        .get_or_insert_default()
        .extend(new_path_data(&path));
    secret.metadata.managed_fields = None;
    let name = secret.metadata.name.clone().unwrap_or_default();
    api.replace(&name, &PostParams::default(), &secret).await?;
    tracing::info!(secret = %name, "wrote a new webhook path");
    Ok(path)
}

/// Replaces the path if it is due ([`webhook_path::rotation_due`]). Every replica may try;
/// the writes are conditional, so one path wins and the others follow it.
async fn rotate_if_due(api: &Api<Secret>, settings: &PathSettings, every: Duration) {
    let secret = match api.get_opt(&settings.secret).await {
        Ok(Some(secret)) => secret,
        Ok(None) => return,
        Err(e) => {
            tracing::warn!(secret = %settings.secret, error = %e, "reading the webhook path for rotation");
            return;
        }
    };
    let written = secret
        .data
        .as_ref()
        .and_then(|d| d.get(WRITTEN_KEY))
        .and_then(|w| std::str::from_utf8(&w.0).ok()?.trim().parse::<i64>().ok());
    if stored(&secret).is_none()
        || !webhook_path::rotation_due(written, jiff::Timestamp::now().as_second(), every)
    {
        return;
    }
    match write_new(api, secret).await {
        Ok(_) => {}
        // Another replica rotated it first.
        Err(kube::Error::Api(status)) if status.code == 409 => {}
        Err(e) => {
            tracing::warn!(secret = %settings.secret, error = %e, "rotating the webhook path")
        }
    }
}

fn stored(secret: &Secret) -> Option<String> {
    let bytes = secret.data.as_ref()?.get(SECRET_KEY)?;
    let path = std::str::from_utf8(&bytes.0).ok()?;
    webhook_path::is_valid(path).then(|| path.to_owned())
}

/// Follows the Secret: a path written there (by another replica, or after the Secret was
/// lost and made again) becomes current here. A Secret without a path gets one, and a path
/// older than the rotation period is replaced.
pub async fn follow(api: Api<Secret>, settings: PathSettings, paths: Arc<WebhookPaths>) {
    let config = watcher::Config::default().fields(&format!("metadata.name={}", settings.secret));
    let mut events = std::pin::pin!(watcher(api.clone(), config).default_backoff());
    let check_every = settings
        .rotate_every
        .map_or(Duration::from_secs(3600), |every| every / 4)
        .clamp(Duration::from_secs(1), Duration::from_secs(60));
    let mut ticks = tokio::time::interval(check_every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let event = tokio::select! {
            event = events.next() => match event {
                Some(event) => event,
                None => return,
            },
            _ = ticks.tick() => {
                if let Some(every) = settings.rotate_every {
                    rotate_if_due(&api, &settings, every).await;
                }
                continue;
            }
        };
        let secret = match event {
            Ok(watcher::Event::Apply(secret) | watcher::Event::InitApply(secret)) => Some(secret),
            // Gone: made again by the certificate code (own certificates) or by us.
            Ok(watcher::Event::Delete(_)) => None,
            Ok(watcher::Event::Init | watcher::Event::InitDone) => continue,
            Err(e) => {
                tracing::warn!(secret = %settings.secret, error = %e, "watching the webhook path's Secret");
                continue;
            }
        };
        if let Some(path) = secret.as_ref().and_then(stored) {
            if paths.set_current(&path) {
                tracing::info!(
                    "the webhook path changed; the previous one stays accepted for a while"
                );
            }
            continue;
        }
        if secret.is_none() && !settings.create_secret {
            continue;
        }
        match ensure(&api, &settings).await {
            Ok(path) => {
                paths.set_current(&path);
            }
            Err(e) => tracing::warn!(error = %e, "writing the webhook path"),
        }
    }
}

/// Keeps every webhook of the configuration sending to the current path, and tells `paths`
/// where they send now (so a path they still use stays accepted). A new path is written
/// [`PathSettings::publish_after`] after this replica learnt it, once the Secret still holds
/// it (a replica whose watch lags must not put an old path back), and once the operator's
/// Deployment has rolled out to this replica's revision (older replicas know only their
/// path; a replica of a revision rolled back from must not move the webhooks away from the
/// one rolled back to). A configuration sending where no replica serves (no path: `/`) is
/// pointed at the path at once.
pub async fn publish(client: kube::Client, settings: PathSettings, paths: Arc<WebhookPaths>) {
    let Some(name) = settings.configuration.clone() else {
        // Nobody points the API server anywhere: previous paths close after the grace.
        let mut ticks = tokio::time::interval(Duration::from_secs(30));
        loop {
            ticks.tick().await;
            paths.observe_configuration(&[], Instant::now().into_std());
        }
    };
    let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &settings.namespace);
    let mut changes = std::pin::pin!(
        watcher(
            api.clone(),
            watcher::Config::default().fields(&format!("metadata.name={name}"))
        )
        .default_backoff()
        .applied_objects()
    );
    let mut ticks = tokio::time::interval(Duration::from_secs(2));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut current: Option<MutatingWebhookConfiguration> = None;
    let mut known = (paths.current(), Instant::now());
    // After a "not rolled out", the next check waits a while (three reads each).
    let mut next_rollout_check = Instant::now();
    loop {
        tokio::select! {
            next = changes.next() => match next {
                Some(Ok(mwc)) => current = Some(mwc),
                Some(Err(e)) => {
                    tracing::warn!(webhook_configuration = %name, error = %e, "watching the webhook configuration");
                    continue;
                }
                None => return,
            },
            _ = ticks.tick() => {}
        }
        let Some(mwc) = &current else { continue };
        let webhooks = mwc.webhooks.as_deref().unwrap_or_default();
        let configured: Vec<Option<String>> = webhooks
            .iter()
            .map(|w| webhook_path::configured(&w.client_config))
            .collect();
        paths.observe_configuration(
            &configured.iter().flatten().cloned().collect::<Vec<_>>(),
            Instant::now().into_std(),
        );
        let path = paths.current();
        if path != known.0 {
            known = (path.clone(), Instant::now());
        }
        // A webhook whose clientConfig cannot be read is left alone (and not counted).
        if configured.iter().flatten().all(|p| *p == path) {
            continue;
        }
        // Sending where no replica serves (no path, a path set by hand, a retired one
        // written back): correct it now, there is nothing to wait for.
        let now = Instant::now().into_std();
        let nowhere = configured.iter().flatten().any(|p| !paths.accepts(p, now));
        if !nowhere {
            if known.1.elapsed() < settings.publish_after || Instant::now() < next_rollout_check {
                continue;
            }
            if let Some(deployment) = &settings.deployment
                && !this_revision_rolled_out(&client, &settings, deployment).await
            {
                next_rollout_check = Instant::now() + Duration::from_secs(10);
                continue;
            }
        }
        if !secret_holds(&secrets, &settings, &path).await {
            continue;
        }
        if let Some(mwc) = point_at(&api, &name, webhooks, &path).await {
            current = Some(mwc);
        }
    }
}

/// Whether the path's Secret still holds `path` (a replica whose watch lags must not put an
/// old path back). What cannot be read counts as no.
async fn secret_holds(secrets: &Api<Secret>, settings: &PathSettings, path: &str) -> bool {
    match secrets.get_opt(&settings.secret).await {
        Ok(Some(secret)) => stored(&secret).as_deref() == Some(path),
        Ok(None) => false,
        Err(e) => {
            tracing::warn!(secret = %settings.secret, error = %e, "reading the webhook path before publishing it");
            false
        }
    }
}

/// Points every webhook of the configuration `name` at `path`; the configuration as written,
/// `None` when the write failed (retried on the next tick).
async fn point_at(
    api: &Api<MutatingWebhookConfiguration>,
    name: &str,
    webhooks: &[MutatingWebhook],
    path: &str,
) -> Option<MutatingWebhookConfiguration> {
    let patch = path_patch(name, webhooks, path);
    match api
        .patch(
            name,
            &PatchParams::apply(PATH_FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
    {
        Ok(mwc) => {
            tracing::info!(webhook_configuration = %name, "pointed the webhooks at the current path");
            Some(mwc)
        }
        Err(e) => {
            tracing::warn!(webhook_configuration = %name, error = %e, "setting the webhook path failed; retrying");
            None
        }
    }
}

/// The server-side apply of the configuration `name` that points its webhooks at `path`.
/// Every webhook, each time: server-side apply removes what a manager stops sending.
fn path_patch(name: &str, webhooks: &[MutatingWebhook], path: &str) -> serde_json::Value {
    let entries: Vec<serde_json::Value> = webhooks
        .iter()
        .filter_map(|w| {
            webhook_path::client_config_patch(&w.client_config, path)
                .map(|cc| serde_json::json!({"name": w.name, "clientConfig": cc}))
        })
        .collect();
    serde_json::json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": name},
        "webhooks": entries,
    })
}

/// Whether the Deployment has rolled out and this replica is of its current revision. What
/// cannot be read counts as no: the path stays where it is, which works, and the warning
/// says why.
async fn this_revision_rolled_out(
    client: &kube::Client,
    settings: &PathSettings,
    deployment: &str,
) -> bool {
    use k8s_openapi::api::apps::v1::ReplicaSet;
    use k8s_openapi::api::core::v1::Pod;
    let ns = &settings.namespace;
    let warn = |what: &str, e: kube::Error| {
        tracing::warn!(error = %e, "reading {what} (the webhook path waits for the operator's rollout)");
        false
    };
    let deployment = match Api::<Deployment>::namespaced(client.clone(), ns)
        .get(deployment)
        .await
    {
        Ok(d) => d,
        Err(e) => return warn("the operator's Deployment", e),
    };
    if !deployment_rolled_out(&deployment) {
        return false;
    }
    let Some(pod_name) = &settings.pod_name else {
        return true;
    };
    let pod = match Api::<Pod>::namespaced(client.clone(), ns)
        .get(pod_name)
        .await
    {
        Ok(pod) => pod,
        Err(e) => return warn("this replica's pod", e),
    };
    let Some(hash) = pod
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get("pod-template-hash"))
    else {
        tracing::warn!(pod = %pod_name, "this replica's pod has no pod-template-hash label (not made by a Deployment?): the webhook path is not moved from here");
        return false;
    };
    let name = format!(
        "{}-{hash}",
        deployment.metadata.name.as_deref().unwrap_or_default()
    );
    match Api::<ReplicaSet>::namespaced(client.clone(), ns)
        .get(&name)
        .await
    {
        Ok(rs) => same_revision(&deployment.metadata, &rs.metadata),
        Err(e) => warn("this replica's ReplicaSet", e),
    }
}

/// The annotation the Deployment controller puts on a Deployment and its ReplicaSets.
const REVISION: &str = "deployment.kubernetes.io/revision";

/// Whether a ReplicaSet is of the Deployment's current revision.
pub fn same_revision(deployment: &ObjectMeta, replica_set: &ObjectMeta) -> bool {
    let revision = |m: &ObjectMeta| {
        m.annotations
            .as_ref()
            .and_then(|a| a.get(REVISION))
            .cloned()
    };
    revision(deployment).is_some() && revision(deployment) == revision(replica_set)
}

/// The rollout is over: the controller has seen the current spec, and every replica it runs
/// is of the current template.
pub fn deployment_rolled_out(deployment: &Deployment) -> bool {
    let Some(status) = &deployment.status else {
        return false;
    };
    let wanted = deployment.spec.replicas.unwrap_or(1);
    let observed =
        status.observed_generation.unwrap_or(0) >= deployment.metadata.generation.unwrap_or(0);
    let replicas = status.replicas.unwrap_or(0);
    observed && replicas == wanted && status.updated_replicas.unwrap_or(0) == replicas
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deployment(generation: i64, spec: i32, status: serde_json::Value) -> Deployment {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "byok", "generation": generation},
            "spec": {"replicas": spec, "selector": {}, "template": {}},
            "status": status,
        }))
        .unwrap()
    }

    #[test]
    fn only_a_replica_set_of_the_deployments_revision_is_current() {
        let meta = |revision: Option<&str>| ObjectMeta {
            annotations: revision.map(|r| [(REVISION.to_owned(), r.to_owned())].into()),
            ..Default::default()
        };
        assert!(same_revision(&meta(Some("4")), &meta(Some("4"))));
        // Rolled back: the Deployment's revision moved on, this replica's did not.
        assert!(!same_revision(&meta(Some("5")), &meta(Some("4"))));
        assert!(!same_revision(&meta(None), &meta(None)));
    }

    #[test]
    fn a_rollout_is_over_when_every_replica_is_of_the_current_template() {
        let done =
            serde_json::json!({"observedGeneration": 3, "replicas": 2, "updatedReplicas": 2});
        assert!(deployment_rolled_out(&deployment(3, 2, done.clone())));
        // The controller has not seen the new spec yet.
        assert!(!deployment_rolled_out(&deployment(4, 2, done)));
        // An old replica still runs beside the new ones (maxSurge).
        assert!(!deployment_rolled_out(&deployment(
            3,
            2,
            serde_json::json!({"observedGeneration": 3, "replicas": 3, "updatedReplicas": 2})
        )));
        assert!(!deployment_rolled_out(&deployment(
            3,
            2,
            serde_json::json!({"observedGeneration": 3, "replicas": 2, "updatedReplicas": 1})
        )));
    }
}
