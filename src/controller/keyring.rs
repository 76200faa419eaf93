//! The operator keyring in the cluster: a Secret in the operator's namespace holding the
//! operator keys (see [`crate::crypto::Keyring`]). Created on first start if absent.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ObjectMeta, PostParams};

use crate::crypto::Keyring;

pub const DEFAULT_KEYRING_SECRET: &str = "byok-operator-keyring";
const SECRET_TYPE: &str = "byok.dev/keyring";

#[derive(Debug, thiserror::Error)]
pub enum KeyringError {
    #[error("reading or writing keyring Secret {namespace}/{name}: {source}")]
    Api {
        namespace: String,
        name: String,
        source: kube::Error,
    },
    #[error("keyring Secret {namespace}/{name} is unusable: {source}")]
    Invalid {
        namespace: String,
        name: String,
        source: crate::crypto::CryptoError,
    },
}

/// Parses a keyring Secret.
pub fn from_secret(secret: &Secret) -> Result<Keyring, crate::crypto::CryptoError> {
    Keyring::from_secret_data(secret.data.as_ref().unwrap_or(&BTreeMap::new()))
}

fn to_secret(name: &str, keyring: &Keyring, resource_version: Option<String>) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            resource_version,
            labels: Some(
                [(
                    "app.kubernetes.io/managed-by".to_string(),
                    "byok-operator".to_string(),
                )]
                .into(),
            ),
            ..Default::default()
        },
        type_: Some(SECRET_TYPE.into()),
        data: Some(keyring.to_secret_data()),
        ..Default::default()
    }
}

/// Loads the keyring, creating it with a fresh key when it does not exist. Two replicas
/// starting at once both end up with the one that was created first.
pub async fn load_or_create(api: &Api<Secret>, name: &str) -> Result<Keyring, KeyringError> {
    let ns = api.namespace().unwrap_or_default().to_string();
    let err = |source| KeyringError::Api {
        namespace: ns.clone(),
        name: name.to_string(),
        source,
    };
    let invalid = |source| KeyringError::Invalid {
        namespace: ns.clone(),
        name: name.to_string(),
        source,
    };
    if let Some(existing) = api.get_opt(name).await.map_err(err)? {
        return from_secret(&existing).map_err(invalid);
    }
    let keyring = Keyring::generate();
    match api
        .create(&PostParams::default(), &to_secret(name, &keyring, None))
        .await
    {
        Ok(_) => {
            tracing::info!(
                secret = name,
                key_id = keyring.active_id(),
                "created the operator keyring"
            );
            Ok(keyring)
        }
        Err(kube::Error::Api(status)) if status.code == 409 => {
            let existing = api.get(name).await.map_err(err)?;
            from_secret(&existing).map_err(invalid)
        }
        Err(e) => Err(err(e)),
    }
}

/// Adds a new operator key and makes it active; the controller then re-encrypts every managed
/// Secret with it. Uses the resourceVersion as a precondition, so concurrent rotations cannot
/// lose a key. Returns the new key id.
pub async fn rotate(api: &Api<Secret>, name: &str) -> Result<String, KeyringError> {
    let ns = api.namespace().unwrap_or_default().to_string();
    let err = |source| KeyringError::Api {
        namespace: ns.clone(),
        name: name.to_string(),
        source,
    };
    let existing = api.get(name).await.map_err(err)?;
    let mut keyring = from_secret(&existing).map_err(|source| KeyringError::Invalid {
        namespace: ns.clone(),
        name: name.to_string(),
        source,
    })?;
    let id = keyring.rotate();
    let updated = to_secret(name, &keyring, existing.metadata.resource_version.clone());
    api.replace(name, &PostParams::default(), &updated)
        .await
        .map_err(err)?;
    tracing::info!(secret = name, key_id = %id, "rotated the operator key");
    Ok(id)
}
