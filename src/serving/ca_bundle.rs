//! The webhook configuration's `caBundle`, owned by its own field manager.
//!
//! The configuration itself belongs to whoever installs it (a chart, a GitOps tool). With
//! server-side apply the operator owns only `webhooks[*].clientConfig.caBundle`, so an install
//! tool that applies the configuration without a caBundle neither removes nor fights it.

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use kube::api::{Api, Patch, PatchParams};

use super::certs::CertError;

pub const CA_BUNDLE_FIELD_MANAGER: &str = "byok-operator-cabundle";

/// The apply patch that sets only the caBundle of each named webhook; `None` when every one
/// already carries `ca_pem` (a restart writes nothing).
pub fn ca_bundle_patch(
    existing: &MutatingWebhookConfiguration,
    ca_pem: &str,
) -> Option<serde_json::Value> {
    use base64::Engine;
    let webhooks = existing.webhooks.as_deref().unwrap_or_default();
    let current = webhooks.iter().all(|w| {
        w.client_config
            .ca_bundle
            .as_ref()
            .is_some_and(|b| b.0 == ca_pem.as_bytes())
    });
    if current {
        return None;
    }
    let ca_bundle = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    let entries: Vec<serde_json::Value> = webhooks
        .iter()
        .map(|w| serde_json::json!({"name": w.name, "clientConfig": {"caBundle": ca_bundle}}))
        .collect();
    Some(serde_json::json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": existing.metadata.name},
        "webhooks": entries,
    }))
}

/// Sets `caBundle` to `ca_pem` on every webhook of the named MutatingWebhookConfiguration.
pub async fn apply_ca_bundle(
    client: &kube::Client,
    webhook_configuration: &str,
    ca_pem: &str,
) -> Result<(), CertError> {
    let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let err = |source| CertError::WebhookConfiguration {
        name: webhook_configuration.to_string(),
        source,
    };
    let existing = api
        .get_opt(webhook_configuration)
        .await
        .map_err(err)?
        .ok_or_else(|| CertError::WebhookConfigurationMissing {
            name: webhook_configuration.to_string(),
        })?;
    let Some(patch) = ca_bundle_patch(&existing, ca_pem) else {
        return Ok(());
    };
    // force: a previous owner of caBundle (e.g. an older install that set it) hands it over.
    api.patch(
        webhook_configuration,
        &PatchParams::apply(CA_BUNDLE_FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map_err(err)?;
    tracing::info!(
        webhook_configuration,
        "set the webhook caBundle to the serving CA"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;
    use k8s_openapi::api::admissionregistration::v1::{MutatingWebhook, WebhookClientConfig};

    fn config(bundles: &[Option<&str>]) -> MutatingWebhookConfiguration {
        MutatingWebhookConfiguration {
            metadata: kube::api::ObjectMeta {
                name: Some("byok".into()),
                ..Default::default()
            },
            webhooks: Some(
                bundles
                    .iter()
                    .enumerate()
                    .map(|(i, b)| MutatingWebhook {
                        name: format!("w{i}.byok.dev"),
                        client_config: WebhookClientConfig {
                            ca_bundle: b.map(|b| ByteString(b.as_bytes().to_vec())),
                            url: Some("https://127.0.0.1:1/mutate".into()),
                            ..Default::default()
                        },
                        ..Default::default()
                    })
                    .collect(),
            ),
        }
    }

    #[test]
    fn the_patch_names_every_webhook_and_sets_only_the_ca_bundle() {
        let patch = ca_bundle_patch(&config(&[None, Some("old")]), "CA").unwrap();
        assert_eq!(
            patch["webhooks"],
            serde_json::json!([
                {"name": "w0.byok.dev", "clientConfig": {"caBundle": "Q0E="}},
                {"name": "w1.byok.dev", "clientConfig": {"caBundle": "Q0E="}},
            ])
        );
        assert_eq!(patch["metadata"], serde_json::json!({"name": "byok"}));
    }

    #[test]
    fn nothing_to_write_when_every_ca_bundle_is_current() {
        assert_eq!(
            ca_bundle_patch(&config(&[Some("CA"), Some("CA")]), "CA"),
            None
        );
        assert!(ca_bundle_patch(&config(&[Some("CA"), None]), "CA").is_some());
    }
}
