//! The start-up check that the installed ProviderKey CRD is the one this build was made with.
//!
//! Helm installs a chart's `crds/` once and never upgrades them. An operator upgraded without
//! its CRD would reconcile against an older schema: a new field (such as `consumers`) would be
//! pruned by the API server and a new validation rule would never run, silently. So the leader
//! does not reconcile until the installed CRD carries this build's schema digest; the webhook
//! and the broker keep serving the keys already in service.

use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::Api;
use kube::runtime::events::{Event, EventType};
use kube::{Resource, ResourceExt};

use crate::crd::ProviderKey;
use crate::crdgen::{SCHEMA_DIGEST_ANNOTATION, expected_digest};

/// Event reason when the installed CRD is missing or differs from this build's.
pub const CRD_OUT_OF_DATE: &str = "CRDOutOfDate";

/// How often an out-of-date CRD is read again.
const RECHECK: Duration = Duration::from_secs(5);

/// What the installed CRD says about its schema, judged against `expected`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SchemaState {
    Current,
    Missing,
    /// The installed digest (`None`: the CRD has no digest annotation, e.g. from an older
    /// release or applied by hand).
    OutOfDate {
        installed: Option<String>,
    },
}

/// Pure: the state of `installed` against the digest this build expects.
pub fn judge(installed: Option<&CustomResourceDefinition>, expected: &str) -> SchemaState {
    let Some(crd) = installed else {
        return SchemaState::Missing;
    };
    match crd.annotations().get(SCHEMA_DIGEST_ANNOTATION) {
        Some(digest) if digest == expected => SchemaState::Current,
        other => SchemaState::OutOfDate {
            installed: other.cloned(),
        },
    }
}

/// What a user reads in the log and the Event: what is wrong and the one command that fixes it.
pub fn explain(state: &SchemaState, expected: &str) -> String {
    let fix = "apply the CRDs of this release server-side (kubectl apply --server-side \
               --force-conflicts -f crds/, or the chart's crds/ directory); reconciling resumes \
               by itself";
    match state {
        SchemaState::Current => "the installed ProviderKey CRD matches this operator".into(),
        SchemaState::Missing => format!(
            "the ProviderKey CRD ({}) is not installed; {fix}",
            crd_name()
        ),
        SchemaState::OutOfDate { installed } => format!(
            "the installed ProviderKey CRD has schema digest {} but this operator was built with {expected}; \
             ProviderKeys are not reconciled until it matches: {fix}",
            installed.as_deref().unwrap_or("(none)"),
        ),
    }
}

fn crd_name() -> String {
    format!("{}.{}", ProviderKey::plural(&()), ProviderKey::group(&()))
}

/// Returns once the installed CRD is current. Until then: an error log and a Warning Event
/// on the CRD each time the state changes, and `byok_crd_schema_current` 0. API errors are
/// retried (they say nothing about the schema).
pub async fn wait_until_current(
    client: &kube::Client,
    recorder: &super::events::Publisher,
    metrics: &crate::metrics::Metrics,
) {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let expected = expected_digest();
    let name = crd_name();
    let mut reported: Option<SchemaState> = None;
    loop {
        match api.get_opt(&name).await {
            Ok(installed) => {
                let state = judge(installed.as_ref(), &expected);
                metrics.set_crd_schema_current(state == SchemaState::Current);
                if state == SchemaState::Current {
                    if reported.is_some() {
                        tracing::info!(crd = %name, "the installed ProviderKey CRD is current; reconciling starts");
                    }
                    return;
                }
                if reported.as_ref() != Some(&state) {
                    let message = explain(&state, &expected);
                    tracing::error!(crd = %name, "{message}");
                    if let Some(crd) = &installed {
                        report(recorder, crd, &message).await;
                    }
                    reported = Some(state);
                }
            }
            Err(e) => {
                tracing::warn!(crd = %name, error = %e, "reading the ProviderKey CRD failed; retrying")
            }
        }
        tokio::time::sleep(RECHECK).await;
    }
}

async fn report(recorder: &super::events::Publisher, crd: &CustomResourceDefinition, note: &str) {
    let regarding = ObjectReference {
        api_version: Some(CustomResourceDefinition::api_version(&()).into()),
        kind: Some(CustomResourceDefinition::kind(&()).into()),
        name: crd.metadata.name.clone(),
        uid: crd.metadata.uid.clone(),
        resource_version: crd.metadata.resource_version.clone(),
        ..Default::default()
    };
    let event = Event {
        type_: EventType::Warning,
        reason: CRD_OUT_OF_DATE.into(),
        note: Some(note.into()),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(e) = recorder.publish(&event, &regarding).await {
        tracing::warn!(error = %e, "publishing the CRDOutOfDate Event failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_digest(digest: Option<&str>) -> CustomResourceDefinition {
        let mut crd = crate::crdgen::crd();
        let annotations = crd
            .metadata
            .annotations
            .get_or_insert_with(Default::default);
        match digest {
            Some(d) => annotations.insert(SCHEMA_DIGEST_ANNOTATION.into(), d.into()),
            None => annotations.remove(SCHEMA_DIGEST_ANNOTATION),
        };
        crd
    }

    #[test]
    fn the_generated_crd_is_current() {
        assert_eq!(
            judge(Some(&crate::crdgen::crd()), &expected_digest()),
            SchemaState::Current
        );
    }

    #[test]
    fn an_older_missing_or_unannotated_crd_is_not() {
        let expected = expected_digest();
        assert_eq!(judge(None, &expected), SchemaState::Missing);
        assert_eq!(
            judge(Some(&with_digest(None)), &expected),
            SchemaState::OutOfDate { installed: None }
        );
        let old = with_digest(Some("sha256:0ld"));
        let state = judge(Some(&old), &expected);
        assert_eq!(
            state,
            SchemaState::OutOfDate {
                installed: Some("sha256:0ld".into())
            }
        );
        let message = explain(&state, &expected);
        assert!(message.contains("sha256:0ld") && message.contains(&expected));
        assert!(message.contains("kubectl apply --server-side"));
    }
}
