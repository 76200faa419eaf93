//! One home for every name the operator writes or matches on: labels, annotations, Secret
//! types, the managed-Secret name rule. Kubernetes-free strings, so the webhook, the broker,
//! the e2e tests and the docs all point here.

/// The label a Secret must carry to be read as a key source (as Argo CD does for repository
/// Secrets). The operator watches and caches only Secrets with this label (and its own).
pub const KEY_SOURCE_LABEL: &str = "byok.dev/key-source";
/// The value [`KEY_SOURCE_LABEL`] must have.
pub const KEY_SOURCE_VALUE: &str = "true";

/// `app.kubernetes.io/managed-by` on everything the operator creates.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY_VALUE: &str = "byok-operator";
/// On a managed Secret: the ProviderKey it belongs to.
pub const PROVIDERKEY_LABEL: &str = "byok.dev/providerkey";

/// The type of a managed Secret.
pub const MANAGED_SECRET_TYPE: &str = "byok.dev/encrypted-key";
/// The managed Secret's single data entry: the envelope (see [`crate::crypto`]).
pub const ENVELOPE_KEY: &str = "key.enc";

/// The finalizer that deletes the managed Secret with its ProviderKey.
pub const FINALIZER: &str = "byok.dev/managed-secret";
/// The field manager of every server-side apply the operator makes.
pub const FIELD_MANAGER: &str = "byok-operator";

/// The label a pod carries to opt in to sidecar injection (the webhook's objectSelector).
pub const INJECT_LABEL: &str = "byok.dev/inject";
/// The value [`INJECT_LABEL`] must have.
pub const INJECT_VALUE: &str = "true";
/// The pod annotation naming the ProviderKeys (comma-separated, same namespace) a pod uses.
pub const PROVIDER_KEYS_ANNOTATION: &str = "byok.dev/provider-keys";
/// The pod annotation that moves its sidecar's ports: `admin=PORT,keys=PORT` (either or both),
/// for a pod whose own containers use the defaults.
pub const SIDECAR_PORTS_ANNOTATION: &str = "byok.dev/sidecar-ports";
/// The audience of the projected ServiceAccount token a sidecar shows the broker.
pub const TOKEN_AUDIENCE: &str = "byok.dev";

/// The ConfigMap, one per namespace with injected pods, holding the CA bundle sidecars trust
/// the broker with. Only the operator writes it (the chart's ValidatingAdmissionPolicy
/// `<release>-trust` refuses everyone else); sidecars mount it, so a changed CA
/// reaches running pods when the kubelet refreshes the mount.
pub const TRUST_BUNDLE_CONFIGMAP: &str = "byok-broker-ca";
/// The bundle's key in [`TRUST_BUNDLE_CONFIGMAP`], and its file name in the mount.
pub const TRUST_BUNDLE_KEY: &str = "ca.crt";
/// The label [`TRUST_BUNDLE_CONFIGMAP`] carries, so the operator lists its own.
pub const TRUST_BUNDLE_LABEL: &str = "byok.dev/trust-bundle";
/// Where the sidecar mounts [`TRUST_BUNDLE_CONFIGMAP`].
pub const TRUST_BUNDLE_DIR: &str = "/var/run/secrets/byok.dev/broker-ca";
/// The field manager of the bundle's content.
pub const TRUST_BUNDLE_FIELD_MANAGER: &str = "byok-operator-trust-bundle";

/// Whether a pod's labels opt it in to injection.
pub fn opts_in(labels: Option<&std::collections::BTreeMap<String, String>>) -> bool {
    labels
        .and_then(|l| l.get(INJECT_LABEL))
        .is_some_and(|v| v == INJECT_VALUE)
}

/// Non-secret facts about the key in service, kept on the managed Secret itself so the
/// status can always be rebuilt from what is actually stored. The fingerprint, the mask and
/// the encryption key id are re-derived from the envelope on every read; these annotations
/// only say so for people.
pub mod annotations {
    pub const FINGERPRINT: &str = "byok.dev/fingerprint";
    pub const MASKED_KEY: &str = "byok.dev/masked-key";
    pub const KEY_VERSION: &str = "byok.dev/key-version";
    pub const ENCRYPTION_KEY_ID: &str = "byok.dev/encryption-key-id";
    pub const ROTATED_AT: &str = "byok.dev/rotated-at";
    pub const PROVIDER: &str = "byok.dev/provider";
    /// `scheme://host:port` the key in service was verified against, for people. The
    /// operator decides from the copy sealed in the envelope with the key
    /// ([`crate::crypto::seal_payload`]), which cannot be edited.
    pub const VERIFIED_ORIGIN: &str = "byok.dev/verified-origin";
}

/// The managed Secret of a ProviderKey: `<name>-byok`.
pub fn managed_secret_name(providerkey: &str) -> String {
    format!("{providerkey}-byok")
}

/// `byok.dev/key-source=true`, as a label selector.
pub fn key_source_selector() -> String {
    format!("{KEY_SOURCE_LABEL}={KEY_SOURCE_VALUE}")
}

/// The labels of every object the operator creates: `app.kubernetes.io/managed-by`.
pub fn managed_by_labels() -> std::collections::BTreeMap<String, String> {
    [(MANAGED_BY_LABEL.to_string(), MANAGED_BY_VALUE.to_string())].into()
}

/// `app.kubernetes.io/managed-by=byok-operator`, as a label selector.
pub fn managed_by_selector() -> String {
    format!("{MANAGED_BY_LABEL}={MANAGED_BY_VALUE}")
}

/// Whether a Secret's labels mark it as a key source.
pub fn is_key_source(labels: Option<&std::collections::BTreeMap<String, String>>) -> bool {
    labels
        .and_then(|l| l.get(KEY_SOURCE_LABEL))
        .is_some_and(|v| v == KEY_SOURCE_VALUE)
}
