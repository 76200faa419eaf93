//! Proves the local control plane is a real Kubernetes API server: core objects round-trip,
//! a CRD becomes Established and serves objects, TokenRequest issues tokens.

use std::time::Duration;

use byok_e2e::envtest::TestEnv;
use k8s_openapi::ByteString;
use k8s_openapi::api::authentication::v1::{
    TokenRequest, TokenRequestSpec, TokenReview, TokenReviewSpec,
};
use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DynamicObject, ObjectMeta, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::runtime::wait::{await_condition, conditions};

#[tokio::test]
async fn secret_round_trips_through_the_api_server() -> anyhow::Result<()> {
    let env = TestEnv::new("harness").await?;
    let secrets: Api<Secret> = env.api();
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some("raw".into()),
            ..Default::default()
        },
        data: Some(
            [(
                "api-key".to_string(),
                ByteString(b"not-a-real-key".to_vec()),
            )]
            .into(),
        ),
        ..Default::default()
    };
    secrets.create(&PostParams::default(), &secret).await?;
    let read = secrets.get("raw").await?;
    assert_eq!(read.data.unwrap()["api-key"].0, b"not-a-real-key");
    assert!(read.metadata.uid.is_some(), "the API server assigns a uid");
    assert!(
        read.metadata.resource_version.is_some(),
        "etcd assigns a resourceVersion"
    );
    Ok(())
}

#[tokio::test]
async fn crd_becomes_established_and_serves_objects() -> anyhow::Result<()> {
    let env = TestEnv::new("harness").await?;
    // A cluster-scoped CRD is shared by the whole control plane: name it after the namespace.
    let plural = format!(
        "widgets{}",
        env.namespace.rsplit('-').next().unwrap_or_default()
    );
    let group = "harness.byok.dev";
    let crd: CustomResourceDefinition = serde_json::from_value(serde_json::json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": format!("{plural}.{group}")},
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": {"plural": plural, "singular": plural.trim_end_matches('s'), "kind": "Widget"},
            "versions": [{
                "name": "v1", "served": true, "storage": true,
                "schema": {"openAPIV3Schema": {"type": "object", "properties": {
                    "spec": {"type": "object", "required": ["size"], "properties": {
                        "size": {"type": "integer", "minimum": 1}}}}}}
            }]
        }
    }))?;
    let crds: Api<CustomResourceDefinition> = Api::all(env.client.clone());
    let name = crd.metadata.name.clone().unwrap_or_default();
    crds.create(&PostParams::default(), &crd).await?;
    tokio::time::timeout(
        Duration::from_secs(30),
        await_condition(crds, &name, conditions::is_crd_established()),
    )
    .await??;

    let resource =
        ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, "v1", "Widget"), &plural);
    let widgets: Api<DynamicObject> =
        Api::namespaced_with(env.client.clone(), &env.namespace, &resource);
    let mut widget = DynamicObject::new("w1", &resource);
    widget.data = serde_json::json!({"spec": {"size": 3}});
    widgets.create(&PostParams::default(), &widget).await?;
    assert_eq!(widgets.get("w1").await?.data["spec"]["size"], 3);

    // The API server itself validates against the schema.
    let mut bad = DynamicObject::new("w2", &resource);
    bad.data = serde_json::json!({"spec": {"size": 0}});
    let err = widgets
        .create(&PostParams::default(), &bad)
        .await
        .expect_err("size 0 violates minimum 1");
    assert!(
        err.to_string().contains("spec.size"),
        "error names the field: {err}"
    );
    Ok(())
}

#[tokio::test]
async fn service_account_tokens_are_issued_and_reviewed() -> anyhow::Result<()> {
    let env = TestEnv::new("harness").await?;
    let sas: Api<ServiceAccount> = env.api();
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            audiences: Some(vec!["byok.dev".into()]),
            expiration_seconds: Some(600),
            ..Default::default()
        }),
        ..Default::default()
    };
    let issued = sas
        .create_token_request("default", &PostParams::default(), &request)
        .await?;
    let token = issued
        .status
        .and_then(|s| s.token)
        .expect("TokenRequest returns a token");

    let review = TokenReview {
        spec: TokenReviewSpec {
            token,
            audiences: Some(vec!["byok.dev".into()]),
        },
        ..Default::default()
    };
    let reviewed = Api::<TokenReview>::all(env.client.clone())
        .create(&PostParams::default(), &review)
        .await?;
    let status = reviewed.status.expect("TokenReview returns a status");
    assert_eq!(status.authenticated, Some(true), "{:?}", status.error);
    let username = status.user.and_then(|u| u.username).unwrap_or_default();
    assert_eq!(
        username,
        format!("system:serviceaccount:{}:default", env.namespace)
    );
    Ok(())
}
