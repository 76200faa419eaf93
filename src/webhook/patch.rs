//! The injection decision (pure): given an opted-in pod and what the cache knows about the
//! ProviderKeys it names, either the JSON patch that adds the `byok-proxy` native sidecar,
//! its token volume and the application environment, or a refusal whose message kubectl
//! shows. No API calls, so the admission path stays fast and the tests need no cluster.
//!
//! The patch is idempotent: run on its own output (a webhook reinvocation) it is empty.
//!
//! # Environment given to the application
//!
//! Every application container, and every init container after the sidecar, gets for each
//! key `i` (annotation order, port `FIRST_KEY_PORT + i`):
//!
//! | variable                 | value                             | when                         |
//! |--------------------------|-----------------------------------|------------------------------|
//! | `BYOK_<NAME>_BASE_URL`   | `http://127.0.0.1:<port>/v1`      | openai, openai-compatible    |
//! | `BYOK_<NAME>_BASE_URL`   | `http://127.0.0.1:<port>`         | other providers, unknown key |
//!
//! and for the first key of each provider:
//!
//! | provider                 | variables                                                        |
//! |--------------------------|------------------------------------------------------------------|
//! | anthropic                | `ANTHROPIC_BASE_URL=http://127.0.0.1:<port>`, `ANTHROPIC_API_KEY=byok-proxy` |
//! | openai (else the first openai-compatible) | `OPENAI_BASE_URL=http://127.0.0.1:<port>/v1`, `OPENAI_API_KEY=byok-proxy` |
//! | google                   | `GOOGLE_GEMINI_BASE_URL=http://127.0.0.1:<port>`, `GEMINI_API_KEY=byok-proxy` |
//! | azure                    | `AZURE_OPENAI_ENDPOINT=http://127.0.0.1:<port>`, `AZURE_OPENAI_API_KEY=byok-proxy`, `OPENAI_API_VERSION=<spec.azure.apiVersion>` |
//! | vertex                   | `GOOGLE_VERTEX_BASE_URL=http://127.0.0.1:<port>`                 |
//!
//! A variable the container already sets in `env` is left alone. The API-key variables hold
//! [`PLACEHOLDER_KEY`] only so official SDKs start; the proxy sets the real key.

use std::collections::BTreeSet;

use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, Patch, PatchOperation};
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, EnvVar, Pod, PodSpec, Probe, Volume, VolumeMount,
};

use crate::names::{self, PROVIDER_KEYS_ANNOTATION, TOKEN_AUDIENCE};
use crate::providers::ProviderKind;
pub use crate::sidecar::{
    ADMIN_PORT, API_TOKEN_DIR, DEFAULT_MODE, FIRST_KEY_PORT, InjectSettings, MAX_KEYS, MESH_PORTS,
    NO_API_TOKEN_VOLUME, NodeReach, PLACEHOLDER_KEY, SIDECAR_NAME, SIDECAR_UID,
    STARTUP_LONGEST_WAIT_SECONDS, STARTUP_PERIOD_SECONDS, SidecarPorts, TOKEN_DIR, TOKEN_FILE,
    TOKEN_VOLUME, TRUST_VOLUME, base_url_var, is_our_trust_volume, no_api_token_volume, node_reach,
    parse_key_names, shown, token_held_only_by_sidecar, token_volume, trust_volume,
    trusts_namespace_bundle,
};

/// Where a ProviderKey stands, as far as injection cares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyState {
    Ready,
    NotReady { reason: String },
    Deleting,
}

/// What the cache knows about one ProviderKey.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyFacts {
    /// `None`: the ProviderKey exists but cannot be read (only its own variable is set).
    pub provider: Option<ProviderKind>,
    pub state: KeyState,
    /// `spec.consumers.serviceAccounts`; empty admits any.
    pub service_accounts: Vec<String>,
    /// `spec.azure.apiVersion` of an Azure key: the official SDKs refuse to start without
    /// `OPENAI_API_VERSION`.
    pub azure_api_version: Option<String>,
}

/// The admission answer for a pod that is let in.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Mutation {
    pub patch: Patch,
    /// Admission warnings (kubectl prints them).
    pub warnings: Vec<String>,
}

/// Why a pod is refused; the message is shown to the user by kubectl.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "the pod has label {}={} but no annotation {} naming the ProviderKeys it uses",
        names::INJECT_LABEL,
        names::INJECT_VALUE,
        PROVIDER_KEYS_ANNOTATION
    )]
    MissingAnnotation,
    #[error("annotation {annotation}: {0}", annotation = PROVIDER_KEYS_ANNOTATION)]
    BadAnnotation(String),
    #[error(
        "this cluster does not run native sidecars (init containers with restartPolicy: Always, \
         Kubernetes 1.29+), which the {SIDECAR_NAME} sidecar needs; pods with label {}={} cannot \
         be admitted here",
        names::INJECT_LABEL,
        names::INJECT_VALUE
    )]
    NativeSidecarsUnavailable,
    #[error(
        "spec.hostNetwork: true cannot be used with {}: the {SIDECAR_NAME} sidecar would serve keys on the node's network",
        names::INJECT_LABEL
    )]
    HostNetwork,
    #[error(
        "spec.hostPID: true cannot be used with {}: other processes could read the {SIDECAR_NAME} sidecar's memory",
        names::INJECT_LABEL
    )]
    HostPid,
    #[error(
        "spec.shareProcessNamespace: true cannot be used with {}: the other containers could read the {SIDECAR_NAME} sidecar's memory",
        names::INJECT_LABEL
    )]
    ShareProcessNamespace,
    #[error(
        "spec.hostIPC: true cannot be used with {}: the pod would share the node's IPC namespace",
        names::INJECT_LABEL
    )]
    HostIpc,
    #[error(
        "{field}: privileged containers cannot be used with {}: they can read the {SIDECAR_NAME} sidecar's token from the node",
        names::INJECT_LABEL
    )]
    Privileged { field: String },
    #[error(
        "{field}: hostPath volume \"{volume}\" cannot be used with {}: the node's files include the {SIDECAR_NAME} sidecar's token",
        names::INJECT_LABEL
    )]
    HostPath { field: String, volume: String },
    #[error("{field}: the container name \"{SIDECAR_NAME}\" is reserved for the injected sidecar")]
    SidecarNameTaken { field: String },
    #[error(
        "{field}: init container \"{SIDECAR_NAME}\" is not the sidecar this webhook injects (its {differs} differs); \
         remove it and let the webhook add it"
    )]
    SidecarDiffers {
        field: String,
        differs: &'static str,
    },
    #[error(
        "{field}: container \"{container}\" uses volume \"{TOKEN_VOLUME}\", which only the {SIDECAR_NAME} sidecar may mount"
    )]
    TokenVolumeUsed { field: String, container: String },
    #[error(
        "{field}: the volume name \"{TOKEN_VOLUME}\" is reserved for the {SIDECAR_NAME} sidecar's token"
    )]
    TokenVolumeNameTaken { field: String },
    #[error(
        "{field}: the volume name \"{TRUST_VOLUME}\" is reserved for the {SIDECAR_NAME} sidecar's trust bundle"
    )]
    TrustVolumeNameTaken { field: String },
    #[error(
        "{field}: volume \"{volume}\" projects a ServiceAccount token for audience \"{TOKEN_AUDIENCE}\"; \
         only the injected {SIDECAR_NAME} sidecar may hold one"
    )]
    BrokerToken { field: String, volume: String },
    #[error(
        "{field}: container \"{container}\" declares port {port}, which the {SIDECAR_NAME} sidecar uses \
         (admin {admin}, keys from {first_key}); move the sidecar with annotation {annotation}: \"admin=PORT,keys=PORT\"",
        annotation = names::SIDECAR_PORTS_ANNOTATION
    )]
    PortTaken {
        field: String,
        container: String,
        port: i32,
        admin: u16,
        first_key: u16,
    },
    #[error("annotation {annotation}: {0}", annotation = names::SIDECAR_PORTS_ANNOTATION)]
    BadSidecarPorts(String),
    #[error("{field}: runAsUser {SIDECAR_UID} is reserved for the {SIDECAR_NAME} sidecar")]
    SidecarUid { field: String },
    #[error(
        "spec.hostAliases, spec.dnsPolicy None or spec.dnsConfig.nameservers: a pod using byok keys \
         must resolve the key broker's name as the cluster does (its sidecar sends its token there)"
    )]
    BrokerNameRedirected,
    #[error(
        "{field}: ephemeral container \"{container}\" targets the {SIDECAR_NAME} sidecar, whose memory holds the key"
    )]
    SidecarTargeted { field: String, container: String },
    #[error(
        "ProviderKey \"{key}\" in namespace \"{namespace}\" does not admit service account \"{service_account}\" \
         (spec.consumers.serviceAccounts); run the pod as one it lists"
    )]
    ServiceAccount {
        key: String,
        namespace: String,
        service_account: String,
    },
    #[error("internal error building the patch: {0}")]
    Internal(String),
}

impl From<NodeReach> for Refusal {
    fn from(reach: NodeReach) -> Self {
        match reach {
            NodeReach::HostNetwork => Refusal::HostNetwork,
            NodeReach::HostPid => Refusal::HostPid,
            NodeReach::HostIpc => Refusal::HostIpc,
            NodeReach::ShareProcessNamespace => Refusal::ShareProcessNamespace,
            NodeReach::Privileged { field } => Refusal::Privileged { field },
            NodeReach::HostPath { field, volume } => Refusal::HostPath { field, volume },
            NodeReach::SidecarUid { field } => Refusal::SidecarUid { field },
        }
    }
}

/// The decision for one pod. `namespace` comes from the AdmissionRequest (a pod from
/// `generateName` may have neither name nor namespace in its metadata); `keys` looks a
/// ProviderKey up by name in that namespace.
pub fn mutate(
    pod: &Pod,
    namespace: &str,
    keys: &dyn Fn(&str) -> Option<KeyFacts>,
    settings: &InjectSettings,
) -> Result<Mutation, Refusal> {
    if !names::opts_in(pod.metadata.labels.as_ref()) {
        return Ok(Mutation::default());
    }
    if !settings.native_sidecars {
        return Err(Refusal::NativeSidecarsUnavailable);
    }
    let annotation = pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(PROVIDER_KEYS_ANNOTATION))
        .ok_or(Refusal::MissingAnnotation)?;
    let key_names = parse_key_names(annotation).map_err(Refusal::BadAnnotation)?;
    let settings = pod_settings(pod, settings)?;
    let settings = settings.as_ref();

    let no_spec = PodSpec::default();
    let spec = pod.spec.as_ref().unwrap_or(&no_spec);
    check_reach(spec, settings)?;
    let planned: Vec<PlannedKey> = settings
        .ports
        .keys(key_names.len())
        .zip(key_names)
        .map(|(port, name)| PlannedKey {
            facts: keys(&name),
            name,
            port,
        })
        .collect();
    check_service_account(spec, namespace, &planned)?;

    let served: Vec<(&str, u16)> = planned.iter().map(|k| (k.name.as_str(), k.port)).collect();
    let wanted_sidecar = crate::sidecar::container(settings, &served);
    let init = spec.init_containers.as_deref().unwrap_or_default();
    let existing_sidecar = find_our_sidecar(spec, &wanted_sidecar)?;
    let existing_volume = check_volumes(spec)?;
    check_peers(spec, existing_sidecar, planned.len(), settings.ports)?;

    let warnings = planned
        .iter()
        .filter_map(|key| waiting_warning(key, namespace))
        .collect();
    let insert_at = insertion_point(init);
    let first_init_with_env = existing_sidecar.map_or(insert_at, |at| at + 1);

    // The patch is built from the changes alone (no copy of the pod, no diff of two): its
    // size and cost follow what is added, not what the pod holds.
    let mut patch = Patch(Vec::new());
    if pod.spec.is_none() {
        add(
            &mut patch,
            PointerBuf::from_tokens(["spec"]),
            serde_json::json!({}),
        );
    }
    if !existing_volume {
        add_volumes(&mut patch, spec)?;
    }
    add_application_env(&mut patch, spec, first_init_with_env, &planned)?;
    add_identity_skips(&mut patch, pod);
    if existing_sidecar.is_none() {
        // One explicit insert, after the other operations (which use the original indices):
        // a diff of the shifted array would rewrite every later init container field by field.
        let sidecar_json = to_json(&wanted_sidecar)?;
        let (path, value) = if spec.init_containers.is_none() {
            (
                PointerBuf::from_tokens(["spec", "initContainers"]),
                serde_json::Value::Array(vec![sidecar_json]),
            )
        } else {
            (
                PointerBuf::from_tokens(["spec", "initContainers", &insert_at.to_string()]),
                sidecar_json,
            )
        };
        add(&mut patch, path, value);
    }
    Ok(Mutation { patch, warnings })
}

/// The settings for this pod: the cluster's, or with the sidecar's ports its annotation moves
/// (a copy only then).
fn pod_settings<'a>(
    pod: &Pod,
    settings: &'a InjectSettings,
) -> Result<std::borrow::Cow<'a, InjectSettings>, Refusal> {
    let moved = pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(names::SIDECAR_PORTS_ANNOTATION));
    Ok(match moved {
        Some(value) => std::borrow::Cow::Owned(InjectSettings {
            ports: settings
                .ports
                .with_annotation(value)
                .map_err(Refusal::BadSidecarPorts)?,
            ..settings.clone()
        }),
        None => std::borrow::Cow::Borrowed(settings),
    })
}

/// Refuses a pod from which the sidecar's token or memory can be reached through the node, or
/// that resolves the broker's name on its own.
fn check_reach(spec: &PodSpec, settings: &InjectSettings) -> Result<(), Refusal> {
    // These three first, in this order, as releases before reported them.
    if spec.host_network == Some(true) {
        return Err(Refusal::HostNetwork);
    }
    if spec.host_pid == Some(true) {
        return Err(Refusal::HostPid);
    }
    if spec.share_process_namespace == Some(true) {
        return Err(Refusal::ShareProcessNamespace);
    }
    node_reach(spec).map_err(Refusal::from)?;
    if !crate::sidecar::shape::resolves_broker_as_the_cluster_does(spec, &settings.broker_hosts) {
        return Err(Refusal::BrokerNameRedirected);
    }
    Ok(())
}

/// Refuses a pod whose service account a key it names does not admit
/// (`spec.consumers.serviceAccounts`).
fn check_service_account(
    spec: &PodSpec,
    namespace: &str,
    planned: &[PlannedKey],
) -> Result<(), Refusal> {
    let service_account = [&spec.service_account_name, &spec.service_account]
        .into_iter()
        .flatten()
        .find(|sa| !sa.is_empty())
        .map_or("default", String::as_str);
    for key in planned {
        if let Some(facts) = &key.facts
            && !facts.service_accounts.is_empty()
            && !facts
                .service_accounts
                .iter()
                .any(|sa| sa == service_account)
        {
            return Err(Refusal::ServiceAccount {
                key: key.name.clone(),
                namespace: namespace.to_owned(),
                service_account: service_account.to_owned(),
            });
        }
    }
    Ok(())
}

/// Where the sidecar goes among the init containers: after mesh sidecars (so the broker is
/// reachable through them), and after the meshes' own init containers only when a native mesh
/// proxy follows them (Istio: istio-init, then a native istio-proxy). A classic mesh's proxy is
/// a regular container that starts after every init container: behind its istio-init, the
/// sidecar's broker call would be redirected to an Envoy that is not running, so it goes
/// before it, as it always did. Before the first other regular init container (so that one
/// may use the key).
fn insertion_point(init: &[Container]) -> usize {
    let leading = init
        .iter()
        .take_while(|c| is_native_sidecar(c) || MESH_INIT_CONTAINERS.contains(&c.name.as_str()))
        .count();
    init[..leading]
        .iter()
        .rposition(is_native_sidecar)
        .map_or(0, |last| last + 1)
}

fn add(patch: &mut Patch, path: PointerBuf, value: serde_json::Value) {
    patch
        .0
        .push(PatchOperation::Add(AddOperation { path, value }));
}

/// The token volume, and the empty API-token volume and the trust bundle when missing.
fn add_volumes(patch: &mut Patch, spec: &PodSpec) -> Result<(), Refusal> {
    let mut new_volumes = vec![to_json(&token_volume())?];
    let has = |name: &str| spec.volumes.iter().flatten().any(|v| v.name == name);
    if !has(NO_API_TOKEN_VOLUME) {
        new_volumes.push(to_json(&no_api_token_volume())?);
    }
    if !has(TRUST_VOLUME) {
        new_volumes.push(to_json(&trust_volume())?);
    }
    if spec.volumes.is_none() {
        add(
            patch,
            PointerBuf::from_tokens(["spec", "volumes"]),
            serde_json::Value::Array(new_volumes),
        );
    } else {
        for v in new_volumes {
            add(patch, PointerBuf::from_tokens(["spec", "volumes", "-"]), v);
        }
    }
    Ok(())
}

/// The keys' variables for every application container and every init container from
/// `first_init` on, each variable only where the container does not set it.
fn add_application_env(
    patch: &mut Patch,
    spec: &PodSpec,
    first_init: usize,
    planned: &[PlannedKey],
) -> Result<(), Refusal> {
    let app_env = application_env(planned);
    let containers = spec
        .containers
        .iter()
        .enumerate()
        .map(|(i, c)| ("containers", i, c));
    let inits = spec
        .init_containers
        .iter()
        .flatten()
        .enumerate()
        .skip(first_init)
        .map(|(i, c)| ("initContainers", i, c));
    for (list, i, c) in containers.chain(inits) {
        let missing: Vec<&EnvVar> = app_env
            .iter()
            .filter(|v| !c.env.iter().flatten().any(|e| e.name == v.name))
            .collect();
        if missing.is_empty() {
            continue;
        }
        let index = i.to_string();
        if c.env.is_none() {
            let all: Vec<serde_json::Value> =
                missing.iter().map(to_json).collect::<Result<_, _>>()?;
            add(
                patch,
                PointerBuf::from_tokens(["spec", list, &index, "env"]),
                serde_json::Value::Array(all),
            );
        } else {
            for v in missing {
                add(
                    patch,
                    PointerBuf::from_tokens(["spec", list, &index, "env", "-"]),
                    to_json(v)?,
                );
            }
        }
    }
    Ok(())
}

/// Identity webhooks that edit every container (EKS Pod Identity, Azure Workload Identity)
/// add variables and a token mount to ours too, after us or on reinvocation, and the broker
/// would then refuse the changed sidecar: they skip the containers these annotations name.
fn add_identity_skips(patch: &mut Patch, pod: &Pod) {
    let annotations = pod.metadata.annotations.as_ref();
    for (key, separator) in IDENTITY_SKIP_ANNOTATIONS {
        let current = annotations.and_then(|a| a.get(key)).map(String::as_str);
        let listed = current.is_some_and(|v| v.split(separator).any(|n| n.trim() == SIDECAR_NAME));
        if listed {
            continue;
        }
        let value = match current.filter(|v| !v.trim().is_empty()) {
            Some(v) => format!("{v}{separator}{SIDECAR_NAME}"),
            None => SIDECAR_NAME.to_owned(),
        };
        if annotations.is_none() {
            add(
                patch,
                PointerBuf::from_tokens(["metadata", "annotations"]),
                serde_json::json!({}),
            );
        }
        add(
            patch,
            PointerBuf::from_tokens(["metadata", "annotations", key]),
            serde_json::Value::String(value),
        );
    }
}

fn to_json<T: serde::Serialize>(value: &T) -> Result<serde_json::Value, Refusal> {
    serde_json::to_value(value).map_err(|e| Refusal::Internal(e.to_string()))
}

/// A named key and the port the sidecar serves it on.
struct PlannedKey {
    name: String,
    port: u16,
    facts: Option<KeyFacts>,
}

impl PlannedKey {
    fn provider(&self) -> Option<ProviderKind> {
        self.facts.as_ref().and_then(|f| f.provider)
    }
}

/// The annotations by which identity webhooks that edit every container skip some, and how
/// each separates names: EKS Pod Identity (amazon-eks-pod-identity-webhook) and Azure
/// Workload Identity.
pub const IDENTITY_SKIP_ANNOTATIONS: [(&str, char); 2] = [
    ("eks.amazonaws.com/skip-containers", ','),
    ("azure.workload.identity/skip-containers", ';'),
];

/// Init containers meshes add ahead of their proxy, which need no key: the sidecar may go
/// after them (and after the proxy that follows).
const MESH_INIT_CONTAINERS: [&str; 6] = [
    "istio-init",
    "istio-validation",
    "linkerd-init",
    "linkerd-network-validator",
    "kuma-init",
    "consul-connect-inject-init",
];

fn is_native_sidecar(c: &Container) -> bool {
    c.restart_policy.as_deref() == Some("Always")
}

/// The index of our sidecar among the init containers, if the pod already has it (a second
/// pass). Any other container by that name is refused.
fn find_our_sidecar(spec: &PodSpec, wanted: &Container) -> Result<Option<usize>, Refusal> {
    let mut found = None;
    for (i, c) in spec.init_containers.iter().flatten().enumerate() {
        if c.name != SIDECAR_NAME {
            continue;
        }
        let field = format!("spec.initContainers[{i}]");
        if found.is_some() {
            return Err(Refusal::SidecarNameTaken { field });
        }
        if let Some(differs) = sidecar_difference(c, wanted) {
            return Err(Refusal::SidecarDiffers { field, differs });
        }
        found = Some(i);
    }
    for (i, c) in spec.containers.iter().enumerate() {
        if c.name == SIDECAR_NAME {
            return Err(Refusal::SidecarNameTaken {
                field: format!("spec.containers[{i}].name"),
            });
        }
    }
    for (i, c) in spec.ephemeral_containers.iter().flatten().enumerate() {
        if c.name == SIDECAR_NAME {
            return Err(Refusal::SidecarNameTaken {
                field: format!("spec.ephemeralContainers[{i}].name"),
            });
        }
    }
    Ok(found)
}

/// The first field that decides what the sidecar runs, sees or exposes in which `found`
/// differs from `wanted`. Never the whole container: the API server fills defaults
/// (terminationMessagePath, imagePullPolicy, resource requests) between passes.
fn sidecar_difference(found: &Container, wanted: &Container) -> Option<&'static str> {
    let probe_eq = |a: &Option<Probe>, b: &Option<Probe>| {
        a.as_ref().map(with_probe_defaults) == b.as_ref().map(with_probe_defaults)
    };
    [
        ("image", found.image == wanted.image),
        ("command", found.command == wanted.command),
        ("args", found.args == wanted.args),
        ("env", found.env == wanted.env),
        ("envFrom", found.env_from == wanted.env_from),
        ("volumeMounts", found.volume_mounts == wanted.volume_mounts),
        (
            "volumeDevices",
            found.volume_devices == wanted.volume_devices,
        ),
        ("ports", found.ports == wanted.ports),
        (
            "securityContext",
            found.security_context == wanted.security_context,
        ),
        (
            "restartPolicy",
            found.restart_policy == wanted.restart_policy,
        ),
        (
            "restartPolicyRules",
            found.restart_policy_rules == wanted.restart_policy_rules,
        ),
        ("workingDir", found.working_dir == wanted.working_dir),
        // A hook or an exec probe runs commands inside the sidecar, next to its token.
        ("lifecycle", found.lifecycle == wanted.lifecycle),
        (
            "startupProbe",
            probe_eq(&found.startup_probe, &wanted.startup_probe),
        ),
        (
            "livenessProbe",
            probe_eq(&found.liveness_probe, &wanted.liveness_probe),
        ),
        (
            "readinessProbe",
            probe_eq(&found.readiness_probe, &wanted.readiness_probe),
        ),
    ]
    .into_iter()
    .find(|(_, same)| !same)
    .map(|(field, _)| field)
}

/// `probe` with the API server's defaults filled in.
fn with_probe_defaults(probe: &Probe) -> Probe {
    let mut p = probe.clone();
    p.timeout_seconds.get_or_insert(1);
    p.period_seconds.get_or_insert(10);
    p.success_threshold.get_or_insert(1);
    p.failure_threshold.get_or_insert(3);
    p.initial_delay_seconds.get_or_insert(0);
    if let Some(get) = p.http_get.as_mut() {
        get.scheme.get_or_insert_with(|| "HTTP".to_owned());
    }
    p
}

/// Whether the pod already has our volumes (a second pass). Any other volume by their names, or one that
/// projects a broker token, is refused: a pod must not hold its own broker token.
fn check_volumes(spec: &PodSpec) -> Result<bool, Refusal> {
    let mut found = false;
    for (i, v) in spec.volumes.iter().flatten().enumerate() {
        let field = format!("spec.volumes[{i}]");
        if v.name == TOKEN_VOLUME {
            if found || !is_our_token_volume(v) {
                return Err(Refusal::TokenVolumeNameTaken { field });
            }
            found = true;
        } else if v.name == NO_API_TOKEN_VOLUME {
            if *v != no_api_token_volume() {
                return Err(Refusal::TokenVolumeNameTaken { field });
            }
        } else if v.name == TRUST_VOLUME {
            if !is_our_trust_volume(v) {
                return Err(Refusal::TrustVolumeNameTaken { field });
            }
        } else if projects_broker_token(v) {
            return Err(Refusal::BrokerToken {
                field,
                volume: v.name.clone(),
            });
        }
    }
    Ok(found)
}

fn is_our_token_volume(v: &Volume) -> bool {
    let mut v = v.clone();
    if let Some(p) = v.projected.as_mut() {
        p.default_mode.get_or_insert(DEFAULT_MODE);
    }
    v == token_volume()
}

fn projects_broker_token(v: &Volume) -> bool {
    v.projected
        .iter()
        .flat_map(|p| p.sources.iter().flatten())
        .filter_map(|s| s.service_account_token.as_ref())
        .any(|t| t.audience.as_deref() == Some(TOKEN_AUDIENCE))
}

/// The parts of any container other than our sidecar that could reach its token or its
/// ports (its user and the node: [`node_reach`]).
struct Peer<'a> {
    field: String,
    name: &'a str,
    ports: &'a [ContainerPort],
    mounts: &'a [VolumeMount],
    env: &'a [EnvVar],
}

impl<'a> Peer<'a> {
    fn of(field: String, c: &'a Container) -> Self {
        Peer {
            field,
            name: &c.name,
            ports: c.ports.as_deref().unwrap_or_default(),
            mounts: c.volume_mounts.as_deref().unwrap_or_default(),
            env: c.env.as_deref().unwrap_or_default(),
        }
    }
}

fn check_peers(
    spec: &PodSpec,
    our_sidecar: Option<usize>,
    key_count: usize,
    ports: SidecarPorts,
) -> Result<(), Refusal> {
    let mut peers: Vec<Peer> = Vec::new();
    for (i, c) in spec.containers.iter().enumerate() {
        peers.push(Peer::of(format!("spec.containers[{i}]"), c));
    }
    for (i, c) in spec.init_containers.iter().flatten().enumerate() {
        if Some(i) != our_sidecar {
            peers.push(Peer::of(format!("spec.initContainers[{i}]"), c));
        }
    }
    for (i, c) in spec.ephemeral_containers.iter().flatten().enumerate() {
        let field = format!("spec.ephemeralContainers[{i}]");
        if c.target_container_name.as_deref() == Some(SIDECAR_NAME) {
            return Err(Refusal::SidecarTargeted {
                field: format!("{field}.targetContainerName"),
                container: c.name.clone(),
            });
        }
        peers.push(Peer {
            field,
            name: &c.name,
            ports: c.ports.as_deref().unwrap_or_default(),
            mounts: c.volume_mounts.as_deref().unwrap_or_default(),
            env: c.env.as_deref().unwrap_or_default(),
        });
    }

    let taken: BTreeSet<i32> = std::iter::once(ports.admin)
        .chain(ports.keys(key_count))
        .map(i32::from)
        .collect();
    for p in &peers {
        for (j, m) in p.mounts.iter().enumerate() {
            if m.name == TOKEN_VOLUME {
                return Err(Refusal::TokenVolumeUsed {
                    field: format!("{}.volumeMounts[{j}]", p.field),
                    container: p.name.to_owned(),
                });
            }
        }
        for (j, e) in p.env.iter().enumerate() {
            let from_token_volume = e
                .value_from
                .as_ref()
                .and_then(|f| f.file_key_ref.as_ref())
                .is_some_and(|f| f.volume_name == TOKEN_VOLUME);
            if from_token_volume {
                return Err(Refusal::TokenVolumeUsed {
                    field: format!("{}.env[{j}].valueFrom.fileKeyRef", p.field),
                    container: p.name.to_owned(),
                });
            }
        }
        for (j, port) in p.ports.iter().enumerate() {
            let clash = [
                ("containerPort", Some(port.container_port)),
                ("hostPort", port.host_port),
            ]
            .into_iter()
            .find_map(|(what, n)| n.filter(|n| taken.contains(n)).map(|n| (what, n)));
            if let Some((what, n)) = clash {
                return Err(Refusal::PortTaken {
                    field: format!("{}.ports[{j}].{what}", p.field),
                    container: p.name.to_owned(),
                    port: n,
                    admin: ports.admin,
                    first_key: ports.first_key,
                });
            }
        }
    }
    Ok(())
}

/// The admission warning for a key the sidecar will have to wait for, if any.
fn waiting_warning(key: &PlannedKey, namespace: &str) -> Option<String> {
    let (name, ns) = (shown(&key.name), shown(namespace));
    match &key.facts {
        None => Some(format!(
            "ProviderKey {name} does not exist yet in namespace {ns}; the sidecar waits for it"
        )),
        Some(KeyFacts {
            state: KeyState::NotReady { reason },
            ..
        }) => Some(format!(
            "ProviderKey {name} in namespace {ns} is not Ready ({}); the sidecar waits for it",
            shown(reason)
        )),
        Some(KeyFacts {
            state: KeyState::Deleting,
            ..
        }) => Some(format!(
            "ProviderKey {name} in namespace {ns} is being deleted; the sidecar will not get its key"
        )),
        Some(KeyFacts {
            state: KeyState::Ready,
            ..
        }) => None,
    }
}

fn local_url(port: u16, provider: Option<ProviderKind>) -> String {
    let openai_shaped = matches!(
        provider,
        Some(ProviderKind::OpenAI | ProviderKind::OpenAICompatible)
    );
    let suffix = if openai_shaped { "/v1" } else { "" };
    format!("http://127.0.0.1:{port}{suffix}")
}

fn plain_env(name: &str, value: String) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value: Some(value),
        value_from: None,
    }
}

/// The variables every application container gets (see the module documentation).
fn application_env(keys: &[PlannedKey]) -> Vec<EnvVar> {
    let mut env: Vec<EnvVar> = keys
        .iter()
        .map(|k| plain_env(&base_url_var(&k.name), local_url(k.port, k.provider())))
        .collect();
    let first_of = |kind: ProviderKind| keys.iter().find(|k| k.provider() == Some(kind));
    let openai =
        first_of(ProviderKind::OpenAI).or_else(|| first_of(ProviderKind::OpenAICompatible));
    let families: [(Option<&PlannedKey>, &str, Option<&str>); 5] = [
        (
            first_of(ProviderKind::Anthropic),
            "ANTHROPIC_BASE_URL",
            Some("ANTHROPIC_API_KEY"),
        ),
        (openai, "OPENAI_BASE_URL", Some("OPENAI_API_KEY")),
        (
            first_of(ProviderKind::Google),
            "GOOGLE_GEMINI_BASE_URL",
            Some("GEMINI_API_KEY"),
        ),
        (
            first_of(ProviderKind::Azure),
            "AZURE_OPENAI_ENDPOINT",
            Some("AZURE_OPENAI_API_KEY"),
        ),
        (
            first_of(ProviderKind::Vertex),
            "GOOGLE_VERTEX_BASE_URL",
            None,
        ),
    ];
    for (key, url_var, key_var) in families {
        let Some(key) = key else { continue };
        env.push(plain_env(url_var, local_url(key.port, key.provider())));
        if let Some(key_var) = key_var {
            env.push(plain_env(key_var, PLACEHOLDER_KEY.to_owned()));
        }
        if let Some(version) = key
            .facts
            .as_ref()
            .and_then(|f| f.azure_api_version.clone())
            .filter(|_| url_var == "AZURE_OPENAI_ENDPOINT")
        {
            env.push(plain_env("OPENAI_API_VERSION", version));
        }
    }
    env
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sidecar::TOKEN_EXPIRY_SECONDS;
    use crate::sidecar::shape::image_repository;
    use k8s_openapi::api::core::v1::{
        Capabilities, ConfigMapVolumeSource, ProjectedVolumeSource, ResourceRequirements,
        SecurityContext, VolumeProjection,
    };
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    use proptest::prelude::*;
    use serde_json::json;
    use std::collections::BTreeMap;

    const NS: &str = "team";

    fn settings() -> InjectSettings {
        InjectSettings {
            proxy_image: "ghcr.io/byok/proxy:1.0".to_owned(),
            operator_image: "ghcr.io/byok/operator:1.0".to_owned(),
            pull_policy: "IfNotPresent".to_owned(),
            resources: ResourceRequirements {
                limits: Some(BTreeMap::from([(
                    "memory".to_owned(),
                    Quantity("64Mi".to_owned()),
                )])),
                ..Default::default()
            },
            broker_url: "https://broker.byok-system.svc:8443".to_owned(),
            broker_ca_pem: "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
                .to_owned(),
            broker_hosts: vec!["broker.byok-system.svc".to_owned(), "localhost".to_owned()],
            native_sidecars: true,
            ports: SidecarPorts::default(),
            previous_ca_pem: None,
        }
    }

    fn ready(provider: ProviderKind) -> KeyFacts {
        KeyFacts {
            provider: Some(provider),
            state: KeyState::Ready,
            service_accounts: Vec::new(),
            azure_api_version: (provider == ProviderKind::Azure).then(|| "2024-10-21".to_owned()),
        }
    }

    /// A lookup over `(name, facts)`.
    fn lookup(entries: Vec<(&str, KeyFacts)>) -> impl Fn(&str) -> Option<KeyFacts> {
        let map: BTreeMap<String, KeyFacts> = entries
            .into_iter()
            .map(|(n, f)| (n.to_owned(), f))
            .collect();
        move |name| map.get(name).cloned()
    }

    fn standard_keys() -> impl Fn(&str) -> Option<KeyFacts> {
        lookup(vec![
            ("team-anthropic", ready(ProviderKind::Anthropic)),
            ("team-openai", ready(ProviderKind::OpenAI)),
            ("openai-2", ready(ProviderKind::OpenAI)),
            ("compat", ready(ProviderKind::OpenAICompatible)),
            ("gem", ready(ProviderKind::Google)),
            ("az", ready(ProviderKind::Azure)),
            ("vx", ready(ProviderKind::Vertex)),
        ])
    }

    /// An opted-in pod naming `keys`, with one application container; `spec` is merged in.
    fn pod_with(keys: &str, spec: serde_json::Value) -> Pod {
        let mut value = json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": "app",
                "namespace": NS,
                "labels": {"byok.dev/inject": "true"},
                "annotations": {"byok.dev/provider-keys": keys},
            },
            "spec": {"containers": [{"name": "app", "image": "app:1"}]},
        });
        if let (Some(base), Some(extra)) = (value["spec"].as_object_mut(), spec.as_object()) {
            for (k, v) in extra {
                base.insert(k.clone(), v.clone());
            }
        }
        serde_json::from_value(value).expect("test pod")
    }

    fn pod(keys: &str) -> Pod {
        pod_with(keys, json!({}))
    }

    fn run(pod: &Pod, keys: &dyn Fn(&str) -> Option<KeyFacts>) -> Result<Mutation, Refusal> {
        mutate(pod, NS, keys, &settings())
    }

    fn apply(pod: &Pod, m: &Mutation) -> Pod {
        let mut value = serde_json::to_value(pod).expect("pod json");
        json_patch::patch(&mut value, &m.patch).expect("the patch applies");
        serde_json::from_value(value).expect("a pod again")
    }

    fn injected(pod: &Pod, keys: &dyn Fn(&str) -> Option<KeyFacts>) -> Pod {
        let m = run(pod, keys).expect("admitted");
        apply(pod, &m)
    }

    fn spec(pod: &Pod) -> &PodSpec {
        pod.spec.as_ref().expect("spec")
    }

    fn init(pod: &Pod) -> &[Container] {
        spec(pod).init_containers.as_deref().unwrap_or_default()
    }

    fn env_of(c: &Container) -> BTreeMap<&str, Option<&str>> {
        c.env
            .iter()
            .flatten()
            .map(|e| (e.name.as_str(), e.value.as_deref()))
            .collect()
    }

    fn value<'a>(c: &'a Container, name: &str) -> Option<&'a str> {
        c.env
            .iter()
            .flatten()
            .find(|e| e.name == name)
            .and_then(|e| e.value.as_deref())
    }

    fn refusal(pod: &Pod) -> String {
        run(pod, &standard_keys()).expect_err("refused").to_string()
    }

    fn assert_second_pass_empty(after: &Pod, keys: &dyn Fn(&str) -> Option<KeyFacts>) {
        let again = run(after, keys).expect("second pass admitted");
        assert!(again.patch.is_empty(), "second pass: {}", again.patch);
    }

    #[test]
    fn injects_one_sidecar_with_everything_it_needs() {
        let before = pod("team-anthropic");
        let m = run(&before, &standard_keys()).expect("admitted");
        assert!(m.warnings.is_empty(), "{:?}", m.warnings);
        let after = apply(&before, &m);

        let sidecars: Vec<&Container> = init(&after)
            .iter()
            .filter(|c| c.name == SIDECAR_NAME)
            .collect();
        assert_eq!(sidecars.len(), 1);
        let s = sidecars[0];
        assert_eq!(s.image.as_deref(), Some("ghcr.io/byok/proxy:1.0"));
        assert_eq!(s.image_pull_policy.as_deref(), Some("IfNotPresent"));
        assert_eq!(s.restart_policy.as_deref(), Some("Always"));
        assert_eq!(s.resources.as_ref(), Some(&settings().resources));
        assert_eq!(
            s.args.as_deref().unwrap_or_default(),
            [
                "--admin-addr=0.0.0.0:15120",
                "--broker-url=https://broker.byok-system.svc:8443",
                "--key=team-anthropic=15100",
            ]
        );
        let env = s.env.as_deref().unwrap_or_default();
        // Its trust is the mounted bundle, not a CA in env that could never change.
        assert_eq!(env.len(), 2);
        for (var, path) in [
            ("POD_NAME", "metadata.name"),
            ("POD_NAMESPACE", "metadata.namespace"),
        ] {
            let field = env
                .iter()
                .find(|e| e.name == var)
                .and_then(|e| e.value_from.as_ref())
                .and_then(|f| f.field_ref.as_ref())
                .expect(var);
            assert_eq!(field.field_path, path);
            assert_eq!(field.api_version.as_deref(), Some("v1"));
        }
        let ports: Vec<(i32, Option<&str>, Option<&str>)> = s
            .ports
            .iter()
            .flatten()
            .map(|p| (p.container_port, p.name.as_deref(), p.protocol.as_deref()))
            .collect();
        assert_eq!(
            ports,
            [
                (15120, Some("byok-admin"), Some("TCP")),
                (15100, None, Some("TCP"))
            ]
        );

        let startup = s.startup_probe.as_ref().expect("startup probe");
        let get = startup.http_get.as_ref().expect("httpGet");
        assert_eq!(get.path.as_deref(), Some("/readyz"));
        assert_eq!(get.port, IntOrString::Int(15120));
        assert_eq!(startup.period_seconds, Some(1));
        assert_eq!(startup.timeout_seconds, Some(1));
        assert_eq!(startup.failure_threshold, Some(1800));
        let liveness = s.liveness_probe.as_ref().expect("liveness probe");
        let get = liveness.http_get.as_ref().expect("httpGet");
        assert_eq!(get.path.as_deref(), Some("/livez"));
        assert_eq!(get.port, IntOrString::Int(15120));
        assert_eq!(
            (liveness.period_seconds, liveness.failure_threshold),
            (Some(10), Some(3))
        );

        let sc = s.security_context.as_ref().expect("securityContext");
        assert_eq!(sc.run_as_non_root, Some(true));
        assert_eq!(sc.run_as_user, Some(SIDECAR_UID));
        assert_eq!(sc.run_as_group, Some(SIDECAR_UID));
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(
            sc.capabilities.as_ref().and_then(|c| c.drop.as_deref()),
            Some(&["ALL".to_owned()][..])
        );
        assert_eq!(
            sc.seccomp_profile.as_ref().map(|p| p.type_.as_str()),
            Some("RuntimeDefault")
        );
        let mounts = s.volume_mounts.as_deref().unwrap_or_default();
        assert_eq!(mounts.len(), 3);
        assert_eq!(
            (
                mounts[2].name.as_str(),
                mounts[2].mount_path.as_str(),
                mounts[2].read_only,
                mounts[2].sub_path.as_deref()
            ),
            (TRUST_VOLUME, names::TRUST_BUNDLE_DIR, Some(true), None)
        );
        // An empty mount where the API token would go: the sidecar holds no API token.
        assert_eq!(
            (mounts[1].name.as_str(), mounts[1].mount_path.as_str()),
            (NO_API_TOKEN_VOLUME, API_TOKEN_DIR)
        );
        assert_eq!(
            (
                mounts[0].name.as_str(),
                mounts[0].mount_path.as_str(),
                mounts[0].read_only
            ),
            (TOKEN_VOLUME, TOKEN_DIR, Some(true))
        );

        let volumes = spec(&after).volumes.as_deref().unwrap_or_default();
        assert_eq!(volumes.len(), 3);
        assert_eq!(volumes[1].name, NO_API_TOKEN_VOLUME);
        assert_eq!(
            volumes[2].config_map.as_ref().map(|c| c.name.as_str()),
            Some(names::TRUST_BUNDLE_CONFIGMAP)
        );
        let token = volumes[0]
            .projected
            .as_ref()
            .and_then(|p| p.sources.as_ref())
            .and_then(|s| s.first())
            .and_then(|s| s.service_account_token.as_ref())
            .expect("projected token");
        assert_eq!(volumes[0].name, TOKEN_VOLUME);
        assert_eq!(token.audience.as_deref(), Some("byok.dev"));
        assert_eq!(token.expiration_seconds, Some(TOKEN_EXPIRY_SECONDS));
        assert_eq!(token.path, "token");

        let app = &spec(&after).containers[0];
        assert_eq!(
            env_of(app),
            BTreeMap::from([
                (
                    "BYOK_TEAM_ANTHROPIC_BASE_URL",
                    Some("http://127.0.0.1:15100")
                ),
                ("ANTHROPIC_BASE_URL", Some("http://127.0.0.1:15100")),
                ("ANTHROPIC_API_KEY", Some("byok-proxy")),
            ])
        );
        // The sidecar gets none of the application's variables.
        assert_eq!(value(s, "ANTHROPIC_BASE_URL"), None);
    }

    #[test]
    fn generate_name_pod_without_name_or_namespace() {
        let mut before = pod("team-openai");
        before.metadata.name = None;
        before.metadata.namespace = None;
        before.metadata.generate_name = Some("app-".to_owned());
        let keys = standard_keys();
        let after = injected(&before, &keys);
        assert_eq!(init(&after)[0].name, SIDECAR_NAME);
        assert_eq!(
            value(&spec(&after).containers[0], "OPENAI_BASE_URL"),
            Some("http://127.0.0.1:15100/v1")
        );
        assert_second_pass_empty(&after, &keys);
    }

    #[test]
    fn two_keys_of_one_provider() {
        let keys = standard_keys();
        let after = injected(&pod("team-openai, openai-2"), &keys);
        let app = &spec(&after).containers[0];
        assert_eq!(
            env_of(app),
            BTreeMap::from([
                (
                    "BYOK_TEAM_OPENAI_BASE_URL",
                    Some("http://127.0.0.1:15100/v1")
                ),
                ("BYOK_OPENAI_2_BASE_URL", Some("http://127.0.0.1:15101/v1")),
                ("OPENAI_BASE_URL", Some("http://127.0.0.1:15100/v1")),
                ("OPENAI_API_KEY", Some("byok-proxy")),
            ])
        );
        let s = &init(&after)[0];
        let args = s.args.as_deref().unwrap_or_default();
        assert!(args.contains(&"--key=team-openai=15100".to_owned()));
        assert!(args.contains(&"--key=openai-2=15101".to_owned()));
        assert_eq!(s.ports.as_ref().map(Vec::len), Some(3));
    }

    #[test]
    fn every_provider_gets_its_variables() {
        let keys = standard_keys();
        let after = injected(&pod("team-anthropic,compat,team-openai,gem,az,vx"), &keys);
        let env = env_of(&spec(&after).containers[0]);
        let expected = [
            ("BYOK_TEAM_ANTHROPIC_BASE_URL", "http://127.0.0.1:15100"),
            ("BYOK_COMPAT_BASE_URL", "http://127.0.0.1:15101/v1"),
            ("BYOK_TEAM_OPENAI_BASE_URL", "http://127.0.0.1:15102/v1"),
            ("BYOK_GEM_BASE_URL", "http://127.0.0.1:15103"),
            ("BYOK_AZ_BASE_URL", "http://127.0.0.1:15104"),
            ("BYOK_VX_BASE_URL", "http://127.0.0.1:15105"),
            ("ANTHROPIC_BASE_URL", "http://127.0.0.1:15100"),
            ("ANTHROPIC_API_KEY", "byok-proxy"),
            // openai wins over an earlier openai-compatible key.
            ("OPENAI_BASE_URL", "http://127.0.0.1:15102/v1"),
            ("OPENAI_API_KEY", "byok-proxy"),
            ("GOOGLE_GEMINI_BASE_URL", "http://127.0.0.1:15103"),
            ("GEMINI_API_KEY", "byok-proxy"),
            ("AZURE_OPENAI_ENDPOINT", "http://127.0.0.1:15104"),
            ("AZURE_OPENAI_API_KEY", "byok-proxy"),
            // The openai SDKs' Azure clients refuse to start without it.
            ("OPENAI_API_VERSION", "2024-10-21"),
            ("GOOGLE_VERTEX_BASE_URL", "http://127.0.0.1:15105"),
        ];
        assert_eq!(
            env,
            expected
                .iter()
                .map(|(k, v)| (*k, Some(*v)))
                .collect::<BTreeMap<_, _>>()
        );
        assert_second_pass_empty(&after, &keys);
    }

    #[test]
    fn openai_compatible_stands_in_for_openai() {
        let after = injected(&pod("gem,compat"), &standard_keys());
        let app = &spec(&after).containers[0];
        assert_eq!(
            value(app, "OPENAI_BASE_URL"),
            Some("http://127.0.0.1:15101/v1")
        );
        assert_eq!(value(app, "OPENAI_API_KEY"), Some("byok-proxy"));
    }

    /// Issue 20 item 4: the sidecar's ports move for the cluster (flags) or for one pod
    /// (annotation), never onto a mesh's port, a privileged one or each other; the pod's
    /// own containers are checked against the ports it will really use.
    #[test]
    fn the_sidecars_ports_move_by_setting_or_annotation() {
        let keys = standard_keys();
        let sidecar_of = |pod: &Pod| {
            init(pod)
                .iter()
                .find(|c| c.name == SIDECAR_NAME)
                .cloned()
                .expect("sidecar")
        };
        // A pod whose app uses 15100: refused with the way out named, then moved by annotation.
        let clashing = json!({"containers": [{"name": "app", "image": "app:1",
            "ports": [{"containerPort": 15100}]}]});
        let msg = run(&pod_with("team-anthropic", clashing.clone()), &keys)
            .expect_err("clash")
            .to_string();
        assert!(msg.contains("byok.dev/sidecar-ports"), "{msg}");
        let mut moved = pod_with("team-anthropic", clashing);
        moved
            .metadata
            .annotations
            .get_or_insert_with(Default::default)
            .insert(
                names::SIDECAR_PORTS_ANNOTATION.into(),
                "admin=16120, keys=16100".into(),
            );
        let after = injected(&moved, &keys);
        let s = sidecar_of(&after);
        let args = s.args.clone().unwrap_or_default();
        assert!(
            args.contains(&"--admin-addr=0.0.0.0:16120".to_owned()),
            "{args:?}"
        );
        assert!(
            args.contains(&"--key=team-anthropic=16100".to_owned()),
            "{args:?}"
        );
        let probe_port = s
            .startup_probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .map(|g| g.port.clone());
        assert_eq!(probe_port, Some(IntOrString::Int(16120)));
        assert_eq!(
            value(&spec(&after).containers[0], "ANTHROPIC_BASE_URL"),
            Some("http://127.0.0.1:16100")
        );
        assert_second_pass_empty(&after, &keys);
        // The broker serves it as any other injected pod.
        assert!(token_held_only_by_sidecar(spec(&after), &settings()));

        // Moved for the whole cluster.
        let cluster = InjectSettings {
            ports: SidecarPorts {
                admin: 17000,
                first_key: 17100,
            },
            ..settings()
        };
        let m = mutate(&pod("team-anthropic"), NS, &keys, &cluster).expect("admitted");
        let after = apply(&pod("team-anthropic"), &m);
        assert!(
            sidecar_of(&after)
                .args
                .unwrap_or_default()
                .contains(&"--key=team-anthropic=17100".to_owned())
        );

        // Refused: a mesh's port (declared or not), privileged, overlapping, too high, junk.
        for bad in [
            "admin=15090",
            "keys=15050",
            "keys=4130",
            "admin=80",
            "admin=16105,keys=16100",
            "keys=65530",
            "keys=65521",
            "admin=x",
            "ports=1",
            "admin",
        ] {
            let mut p = pod("team-anthropic");
            p.metadata
                .annotations
                .get_or_insert_with(Default::default)
                .insert(names::SIDECAR_PORTS_ANNOTATION.into(), bad.into());
            let err = run(&p, &keys).expect_err(bad).to_string();
            assert!(
                err.starts_with("annotation byok.dev/sidecar-ports: "),
                "{bad}: {err}"
            );
        }
        assert!(SidecarPorts::default().check().is_ok());
        // The highest first key port there is: 16 keys end at 65535.
        let top = SidecarPorts {
            admin: 16000,
            first_key: 65520,
        };
        assert!(top.check().is_ok());
        assert_eq!(top.keys(MAX_KEYS).last(), Some(65535));
    }

    /// The ports meshes use, declared or not (checked against Istio 1.2x sidecar and ambient,
    /// Linkerd 2.1x, Consul 1.2x, Kuma 2.x), are none of the sidecar's: a mesh's container
    /// declaring any of them is admitted beside ours, with the most keys a pod may name.
    #[test]
    fn no_mesh_port_clashes_with_the_sidecar() {
        let mesh_ports: Vec<i32> = (15000..=15099)
            .chain([4140, 4143, 4190, 4191])
            .chain([15001, 19000, 20000, 20200])
            .chain([9901, 15001, 15006, 15053])
            .collect();
        let ports: Vec<serde_json::Value> = mesh_ports
            .iter()
            .map(|p| json!({"containerPort": p, "protocol": "TCP"}))
            .collect();
        let names: Vec<String> = (0..MAX_KEYS).map(|i| format!("k{i}")).collect();
        let keys = lookup(
            names
                .iter()
                .map(|n| (n.as_str(), ready(ProviderKind::Anthropic)))
                .collect(),
        );
        for classic in [true, false] {
            let mesh =
                json!({"name": "istio-proxy", "image": "istio/proxyv2:1.26", "ports": ports});
            let spec = if classic {
                json!({"containers": [{"name": "app", "image": "app:1"}, mesh]})
            } else {
                let mut mesh = mesh;
                mesh["restartPolicy"] = json!("Always");
                json!({"initContainers": [mesh]})
            };
            let pod = pod_with(&names.join(","), spec);
            assert!(
                run(&pod, &keys).is_ok(),
                "classic={classic}: {:?}",
                run(&pod, &keys).err()
            );
        }
    }

    #[test]
    fn identity_webhooks_are_told_to_skip_the_sidecar() {
        let annotation = |pod: &Pod, key: &str| {
            pod.metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(key))
                .cloned()
        };
        // None yet: both set.
        let after = injected(&pod("team-anthropic"), &standard_keys());
        assert_eq!(
            annotation(&after, "eks.amazonaws.com/skip-containers").as_deref(),
            Some(SIDECAR_NAME)
        );
        assert_eq!(
            annotation(&after, "azure.workload.identity/skip-containers").as_deref(),
            Some(SIDECAR_NAME)
        );
        // The pod's own list kept, ours added with each webhook's separator.
        let mut own = pod("team-anthropic");
        if let Some(a) = own.metadata.annotations.as_mut() {
            a.insert(
                "eks.amazonaws.com/skip-containers".into(),
                "log-shipper".into(),
            );
            a.insert(
                "azure.workload.identity/skip-containers".into(),
                "a;b".into(),
            );
        }
        let after = injected(&own, &standard_keys());
        assert_eq!(
            annotation(&after, "eks.amazonaws.com/skip-containers").as_deref(),
            Some("log-shipper,byok-proxy")
        );
        assert_eq!(
            annotation(&after, "azure.workload.identity/skip-containers").as_deref(),
            Some("a;b;byok-proxy")
        );
        // A second pass adds nothing.
        let again = run(&after, &standard_keys()).expect("admitted");
        assert!(
            !serde_json::to_string(&again.patch)
                .unwrap_or_default()
                .contains("skip-containers"),
            "{:?}",
            again.patch
        );
    }

    #[test]
    fn lands_after_a_meshs_init_only_when_its_native_proxy_follows() {
        let order = |inits: serde_json::Value| {
            let before = pod_with("team-anthropic", json!({"initContainers": inits}));
            let after = apply(&before, &run(&before, &standard_keys()).expect("admitted"));
            init(&after)
                .iter()
                .map(|c| c.name.clone())
                .collect::<Vec<_>>()
        };
        let native = json!({"name": "istio-proxy", "image": "i", "restartPolicy": "Always"});
        let mesh_init = json!({"name": "istio-init", "image": "i"});
        assert_eq!(
            order(json!([mesh_init, native])),
            ["istio-init", "istio-proxy", SIDECAR_NAME]
        );
        // Classic: the proxy is a regular container, started after every init container.
        assert_eq!(order(json!([mesh_init])), [SIDECAR_NAME, "istio-init"]);
        assert_eq!(
            order(json!([mesh_init, {"name": "migrate", "image": "a"}])),
            [SIDECAR_NAME, "istio-init", "migrate"]
        );
    }

    #[test]
    fn lands_after_mesh_sidecars_and_before_regular_init_containers() {
        let before = pod_with(
            "team-anthropic",
            json!({
                "initContainers": [
                    {"name": "istio-proxy", "image": "istio:1", "restartPolicy": "Always"},
                    {"name": "migrate", "image": "app:1"},
                    {"name": "log-shipper", "image": "ship:1", "restartPolicy": "Always"},
                ],
            }),
        );
        let keys = standard_keys();
        let m = run(&before, &keys).expect("admitted");
        let after = apply(&before, &m);
        let names: Vec<&str> = init(&after).iter().map(|c| c.name.as_str()).collect();
        assert_eq!(
            names,
            ["istio-proxy", SIDECAR_NAME, "migrate", "log-shipper"]
        );
        let [mesh, _, migrate, shipper] = init(&after) else {
            panic!("four init containers")
        };
        assert_eq!(mesh.env, None, "the mesh sidecar starts before ours");
        assert_eq!(
            value(migrate, "ANTHROPIC_BASE_URL"),
            Some("http://127.0.0.1:15100")
        );
        assert_eq!(
            value(shipper, "ANTHROPIC_BASE_URL"),
            Some("http://127.0.0.1:15100")
        );
        // The existing init containers are not rewritten: one insert, plus env and volume.
        let rewritten = m
            .patch
            .iter()
            .filter(|op| op.path().to_string().ends_with("/name"))
            .count();
        assert_eq!(rewritten, 0, "{}", m.patch);
        assert_second_pass_empty(&after, &keys);
    }

    #[test]
    fn only_native_sidecars_go_first() {
        let before = pod_with(
            "gem",
            json!({"initContainers": [{"name": "setup", "image": "app:1"}]}),
        );
        let after = injected(&before, &standard_keys());
        let names: Vec<&str> = init(&after).iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, [SIDECAR_NAME, "setup"]);
        let before = pod_with(
            "gem",
            json!({"initContainers": [{"name": "mesh", "image": "m:1", "restartPolicy": "Always"}]}),
        );
        let after = injected(&before, &standard_keys());
        let names: Vec<&str> = init(&after).iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["mesh", SIDECAR_NAME]);
    }

    #[test]
    fn second_pass_is_empty_even_after_api_server_defaulting() {
        let keys = standard_keys();
        let before = pod_with(
            "team-anthropic,team-openai",
            json!({
                "initContainers": [{"name": "migrate", "image": "app:1"}],
                "volumes": [{"name": "data", "emptyDir": {}}],
            }),
        );
        let after = injected(&before, &keys);
        assert_second_pass_empty(&after, &keys);

        // What the API server fills in between passes, on our sidecar and volume; and the
        // reverse (an explicit default dropped) must not matter either.
        let mut defaulted = after.clone();
        let spec = defaulted.spec.as_mut().expect("spec");
        let sidecar = spec
            .init_containers
            .iter_mut()
            .flatten()
            .find(|c| c.name == SIDECAR_NAME)
            .expect("sidecar");
        sidecar.termination_message_path = Some("/dev/termination-log".to_owned());
        sidecar.termination_message_policy = Some("File".to_owned());
        sidecar.image_pull_policy = Some("IfNotPresent".to_owned());
        if let Some(r) = sidecar.resources.as_mut() {
            r.requests = r.limits.clone();
        }
        if let Some(p) = sidecar.startup_probe.as_mut() {
            p.success_threshold = None;
            p.initial_delay_seconds = Some(0);
        }
        if let Some(p) = sidecar.liveness_probe.as_mut() {
            p.timeout_seconds = None;
            if let Some(get) = p.http_get.as_mut() {
                get.scheme = None;
            }
        }
        for v in spec.volumes.iter_mut().flatten() {
            if let Some(p) = v.projected.as_mut() {
                p.default_mode = None;
            }
        }
        for c in &mut spec.containers {
            c.termination_message_path = Some("/dev/termination-log".to_owned());
            c.image_pull_policy = Some("IfNotPresent".to_owned());
        }
        assert_second_pass_empty(&defaulted, &keys);
    }

    #[test]
    fn a_variable_the_user_sets_is_left_alone() {
        let before = pod_with(
            "team-openai",
            json!({"containers": [{
                "name": "app",
                "image": "app:1",
                "env": [
                    {"name": "OPENAI_BASE_URL", "value": "http://my-gateway/v1"},
                    {"name": "OPENAI_API_KEY", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}},
                ],
            }]}),
        );
        let keys = standard_keys();
        let after = injected(&before, &keys);
        let env = spec(&after).containers[0]
            .env
            .as_deref()
            .unwrap_or_default();
        let names: Vec<&str> = env.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "OPENAI_BASE_URL",
                "OPENAI_API_KEY",
                "BYOK_TEAM_OPENAI_BASE_URL"
            ]
        );
        assert_eq!(env[0].value.as_deref(), Some("http://my-gateway/v1"));
        assert!(env[1].value_from.is_some());
        assert_second_pass_empty(&after, &keys);
    }

    #[test]
    fn pods_that_did_not_opt_in_are_untouched() {
        let mut p = pod("team-openai");
        p.metadata.labels = None;
        let m = run(&p, &standard_keys()).expect("admitted");
        assert_eq!(m, Mutation::default());
        p.metadata.labels = Some(BTreeMap::from([(
            names::INJECT_LABEL.to_owned(),
            "false".to_owned(),
        )]));
        // Not opted in: nothing is checked, not even the annotation or hostNetwork.
        p.spec.as_mut().expect("spec").host_network = Some(true);
        let m = mutate(
            &p,
            NS,
            &standard_keys(),
            &InjectSettings {
                native_sidecars: false,
                ..settings()
            },
        )
        .expect("admitted");
        assert_eq!(m, Mutation::default());
    }

    #[test]
    fn missing_not_ready_and_deleting_keys_are_admitted_with_warnings() {
        let keys = lookup(vec![
            ("ok", ready(ProviderKind::Anthropic)),
            (
                "slow",
                KeyFacts {
                    state: KeyState::NotReady {
                        reason: "ProviderUnavailable".to_owned(),
                    },
                    ..ready(ProviderKind::Google)
                },
            ),
            (
                "going",
                KeyFacts {
                    state: KeyState::Deleting,
                    ..ready(ProviderKind::OpenAI)
                },
            ),
        ]);
        let before = pod("ok,ghost,slow,going");
        let m = run(&before, &keys).expect("admitted");
        assert_eq!(
            m.warnings,
            [
                "ProviderKey \"ghost\" does not exist yet in namespace \"team\"; the sidecar waits for it",
                "ProviderKey \"slow\" in namespace \"team\" is not Ready (\"ProviderUnavailable\"); the sidecar waits for it",
                "ProviderKey \"going\" in namespace \"team\" is being deleted; the sidecar will not get its key",
            ]
        );
        let after = apply(&before, &m);
        let args = init(&after)[0].args.clone().unwrap_or_default();
        assert!(args.contains(&"--key=ghost=15101".to_owned()), "{args:?}");
        let env = env_of(&spec(&after).containers[0]);
        // A missing key's provider is unknown: only its own variable, without a suffix.
        assert_eq!(
            env.get("BYOK_GHOST_BASE_URL"),
            Some(&Some("http://127.0.0.1:15101"))
        );
        assert_eq!(
            env.get("GOOGLE_GEMINI_BASE_URL"),
            Some(&Some("http://127.0.0.1:15102"))
        );
        assert_eq!(
            env.get("OPENAI_BASE_URL"),
            Some(&Some("http://127.0.0.1:15103/v1"))
        );
        assert_eq!(env.len(), 4 + 2 + 2 + 2);
        let again = run(&after, &keys).expect("second pass admitted");
        assert!(again.patch.is_empty(), "{}", again.patch);
    }

    #[test]
    fn a_warning_never_carries_raw_control_characters_or_long_text() {
        let keys = lookup(vec![(
            "k",
            KeyFacts {
                state: KeyState::NotReady {
                    reason: format!("bad\nline{}", "x".repeat(500)),
                },
                ..ready(ProviderKind::Anthropic)
            },
        )]);
        let m = run(&pod("k"), &keys).expect("admitted");
        assert!(!m.warnings[0].contains('\n'), "{:?}", m.warnings);
        assert!(m.warnings[0].len() < 200, "{:?}", m.warnings);
    }

    #[test]
    fn refuses_shared_host_and_process_namespaces() {
        let msg = refusal(&pod_with("gem", json!({"hostNetwork": true})));
        assert!(msg.contains("spec.hostNetwork"), "{msg}");
        let msg = refusal(&pod_with("gem", json!({"shareProcessNamespace": true})));
        assert!(msg.contains("spec.shareProcessNamespace"), "{msg}");
        let msg = refusal(&pod_with("gem", json!({"hostPID": true})));
        assert!(msg.contains("spec.hostPID"), "{msg}");
        // false is fine.
        let p = pod_with(
            "gem",
            json!({"hostNetwork": false, "shareProcessNamespace": false, "hostPID": false}),
        );
        assert!(run(&p, &standard_keys()).is_ok());
    }

    #[test]
    fn refuses_a_missing_or_malformed_annotation() {
        let mut p = pod("gem");
        p.metadata.annotations = None;
        let msg = refusal(&p);
        assert!(
            msg.contains("no annotation byok.dev/provider-keys"),
            "{msg}"
        );

        let too_many: Vec<String> = (0..17).map(|i| format!("k{i}")).collect();
        let long = "a".repeat(64);
        for (annotation, expected) in [
            ("", "names no ProviderKey"),
            ("  ", "names no ProviderKey"),
            ("A", "\"A\" is not a ProviderKey name"),
            ("a,,b", "item 2 is empty"),
            ("a,b,", "item 3 is empty"),
            ("a, b ,a", "\"a\" is listed twice"),
            (
                too_many.join(",").as_str(),
                "names 17 ProviderKeys; at most 16",
            ),
            (long.as_str(), "64 characters long; at most 63"),
            ("-a", "\"-a\" is not a ProviderKey name"),
            ("a..b", "\"a..b\" is not a ProviderKey name"),
            ("a_b", "\"a_b\" is not a ProviderKey name"),
            (
                "a-b,a.b",
                "\"a-b\" and \"a.b\" would share the variable BYOK_A_B_BASE_URL",
            ),
        ] {
            let msg = refusal(&pod(annotation));
            assert!(
                msg.starts_with("annotation byok.dev/provider-keys: "),
                "{msg}"
            );
            assert!(msg.contains(expected), "{annotation:?}: {msg}");
        }
    }

    #[test]
    fn parses_key_names() {
        assert_eq!(
            parse_key_names(" team-anthropic ,b.c,x1"),
            Ok(vec![
                "team-anthropic".to_owned(),
                "b.c".to_owned(),
                "x1".to_owned()
            ])
        );
        let sixteen: Vec<String> = (0..16).map(|i| format!("k{i}")).collect();
        assert_eq!(parse_key_names(&sixteen.join(",")), Ok(sixteen));
        assert!(parse_key_names(&"a".repeat(63)).is_ok());
        // A long bad item is cut in the message.
        let msg = parse_key_names(&"A".repeat(5000)).expect_err("bad");
        assert!(msg.len() < 300, "{msg}");
    }

    #[test]
    fn base_url_variable_names() {
        assert_eq!(base_url_var("team-openai"), "BYOK_TEAM_OPENAI_BASE_URL");
        assert_eq!(base_url_var("a.b-c9"), "BYOK_A_B_C9_BASE_URL");
    }

    #[test]
    fn refuses_when_native_sidecars_are_unavailable() {
        let err = mutate(
            &pod("gem"),
            NS,
            &standard_keys(),
            &InjectSettings {
                native_sidecars: false,
                ..settings()
            },
        )
        .expect_err("refused");
        assert_eq!(err, Refusal::NativeSidecarsUnavailable);
        assert!(err.to_string().contains("native sidecars"), "{err}");
    }

    #[test]
    fn refuses_containers_named_like_the_sidecar() {
        let user = json!({"name": "byok-proxy", "image": "evil:1"});
        let msg = refusal(&pod_with(
            "gem",
            json!({"containers": [{"name": "app", "image": "a"}, user]}),
        ));
        assert!(msg.contains("spec.containers[1].name"), "{msg}");
        assert!(msg.contains("reserved"), "{msg}");
        let msg = refusal(&pod_with("gem", json!({"initContainers": [user]})));
        assert!(msg.contains("spec.initContainers[0]"), "{msg}");
        assert!(msg.contains("image differs"), "{msg}");
        let msg = refusal(&pod_with("gem", json!({"ephemeralContainers": [user]})));
        assert!(msg.contains("spec.ephemeralContainers[0].name"), "{msg}");
    }

    #[test]
    fn refuses_a_copy_of_the_sidecar_with_a_hook_or_more_env() {
        let keys = standard_keys();
        let after = injected(&pod("gem"), &keys);
        let tamper = |f: &dyn Fn(&mut Container)| {
            let mut p = after.clone();
            for c in p
                .spec
                .as_mut()
                .expect("spec")
                .init_containers
                .iter_mut()
                .flatten()
            {
                f(c);
            }
            run(&p, &keys).expect_err("refused").to_string()
        };
        let msg = tamper(&|c| {
            c.lifecycle = Some(Default::default());
        });
        assert!(msg.contains("lifecycle differs"), "{msg}");
        let msg = tamper(&|c| {
            c.env
                .get_or_insert_with(Vec::new)
                .push(plain_env("HTTPS_PROXY", "http://evil".to_owned()));
        });
        assert!(msg.contains("env differs"), "{msg}");
        let msg = tamper(&|c| {
            if let Some(p) = c.liveness_probe.as_mut() {
                p.exec = Some(Default::default());
            }
        });
        assert!(msg.contains("livenessProbe differs"), "{msg}");
        let msg = tamper(&|c| c.args = Some(vec!["proxy".to_owned()]));
        assert!(msg.contains("args differs"), "{msg}");
    }

    #[test]
    fn refuses_other_containers_on_the_token_volume() {
        let msg = refusal(&pod_with(
            "gem",
            json!({"containers": [{
                "name": "app",
                "image": "a",
                "volumeMounts": [{"name": "data", "mountPath": "/d"}, {"name": "byok-token", "mountPath": "/t"}],
            }]}),
        ));
        assert!(msg.contains("spec.containers[0].volumeMounts[1]"), "{msg}");
        assert!(msg.contains("\"app\""), "{msg}");

        // Also after injection: the volume exists and is ours, the mount is still refused.
        let keys = standard_keys();
        let mut after = injected(&pod("gem"), &keys);
        after.spec.as_mut().expect("spec").containers[0].volume_mounts = Some(vec![VolumeMount {
            name: TOKEN_VOLUME.to_owned(),
            mount_path: "/steal".to_owned(),
            ..Default::default()
        }]);
        let msg = run(&after, &keys).expect_err("refused").to_string();
        assert!(msg.contains("byok-token"), "{msg}");

        let msg = refusal(&pod_with(
            "gem",
            json!({"initContainers": [{
                "name": "init",
                "image": "a",
                "env": [{"name": "T", "valueFrom": {"fileKeyRef": {"volumeName": "byok-token", "path": "token", "key": "x"}}}],
            }]}),
        ));
        assert!(
            msg.contains("spec.initContainers[0].env[0].valueFrom.fileKeyRef"),
            "{msg}"
        );
    }

    #[test]
    fn refuses_a_user_volume_named_byok_token_or_projecting_a_broker_token() {
        let msg = refusal(&pod_with(
            "gem",
            json!({"volumes": [{"name": "byok-token", "emptyDir": {}}]}),
        ));
        assert!(msg.contains("spec.volumes[0]"), "{msg}");
        assert!(msg.contains("reserved"), "{msg}");

        let msg = refusal(&pod_with(
            "gem",
            json!({"volumes": [
                {"name": "data", "emptyDir": {}},
                {"name": "mine", "projected": {"sources": [
                    {"configMap": {"name": "c"}},
                    {"serviceAccountToken": {"audience": "byok.dev", "path": "t"}},
                ]}},
            ]}),
        ));
        assert!(msg.contains("spec.volumes[1]"), "{msg}");
        assert!(msg.contains("\"mine\""), "{msg}");
        assert!(msg.contains("audience \"byok.dev\""), "{msg}");

        // A token for another audience is the user's business.
        let p = pod_with(
            "gem",
            json!({"volumes": [{"name": "vault", "projected": {"sources": [
                {"serviceAccountToken": {"audience": "vault", "path": "t"}},
            ]}}]}),
        );
        assert!(run(&p, &standard_keys()).is_ok());
    }

    #[test]
    fn refuses_the_sidecars_ports() {
        let msg = refusal(&pod_with(
            "gem",
            json!({"containers": [{"name": "app", "image": "a", "ports": [{"containerPort": 8080}, {"containerPort": 15100}]}]}),
        ));
        assert!(
            msg.contains("spec.containers[0].ports[1].containerPort"),
            "{msg}"
        );
        assert!(msg.contains("15100"), "{msg}");
        let msg = refusal(&pod_with(
            "gem",
            json!({"initContainers": [{"name": "i", "image": "a", "ports": [{"containerPort": 80, "hostPort": 15120}]}]}),
        ));
        assert!(
            msg.contains("spec.initContainers[0].ports[0].hostPort"),
            "{msg}"
        );
        // A port past this pod's keys is free.
        let p = pod_with(
            "gem",
            json!({"containers": [{"name": "app", "image": "a", "ports": [{"containerPort": 15101}]}]}),
        );
        assert!(run(&p, &standard_keys()).is_ok());
    }

    #[test]
    fn refuses_the_sidecars_user() {
        let msg = refusal(&pod_with(
            "gem",
            json!({"securityContext": {"runAsUser": 15532}}),
        ));
        assert!(msg.contains("spec.securityContext.runAsUser"), "{msg}");
        let msg = refusal(&pod_with(
            "gem",
            json!({"containers": [{"name": "app", "image": "a", "securityContext": {"runAsUser": 15532}}]}),
        ));
        assert!(
            msg.contains("spec.containers[0].securityContext.runAsUser"),
            "{msg}"
        );
        assert!(msg.contains("15532"), "{msg}");
    }

    #[test]
    fn refuses_an_ephemeral_container_targeting_the_sidecar() {
        let msg = refusal(&pod_with(
            "gem",
            json!({"ephemeralContainers": [{"name": "debug", "image": "busybox", "targetContainerName": "byok-proxy"}]}),
        ));
        assert!(
            msg.contains("spec.ephemeralContainers[0].targetContainerName"),
            "{msg}"
        );
    }

    #[test]
    fn refuses_a_service_account_outside_the_consumers() {
        let keys = lookup(vec![
            ("open", ready(ProviderKind::Google)),
            (
                "guarded",
                KeyFacts {
                    service_accounts: vec!["agent".to_owned()],
                    azure_api_version: None,
                    ..ready(ProviderKind::Anthropic)
                },
            ),
        ]);
        let err = run(&pod("open,guarded"), &keys).expect_err("refused");
        assert_eq!(
            err.to_string(),
            "ProviderKey \"guarded\" in namespace \"team\" does not admit service account \"default\" \
             (spec.consumers.serviceAccounts); run the pod as one it lists"
        );
        let p = pod_with("open,guarded", json!({"serviceAccountName": "agent"}));
        assert!(run(&p, &keys).is_ok());
        let p = pod_with("open,guarded", json!({"serviceAccountName": "other"}));
        let msg = run(&p, &keys).expect_err("refused").to_string();
        assert!(msg.contains("\"other\""), "{msg}");
    }

    #[test]
    fn never_panics_on_thin_pods() {
        let keys = standard_keys();
        let mut p = pod("gem");
        p.spec = None;
        let m = run(&p, &keys).expect("admitted");
        let after = apply(&p, &m);
        assert_eq!(init(&after)[0].name, SIDECAR_NAME);
        assert_second_pass_empty(&after, &keys);

        let p = pod_with("gem", json!({"containers": []}));
        let after = injected(&p, &keys);
        assert_eq!(init(&after).len(), 1);
        assert_second_pass_empty(&after, &keys);
    }

    fn key_name() -> impl Strategy<Value = String> {
        "[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?(\\.[a-z0-9]{1,10}){0,2}"
    }

    proptest! {
        #[test]
        fn parse_never_panics(s in "\\PC{0,200}") {
            if let Ok(names) = parse_key_names(&s) {
                prop_assert!(!names.is_empty() && names.len() <= MAX_KEYS);
            }
        }

        #[test]
        fn parse_never_panics_on_near_misses(s in "[a-zA-Z0-9.,_ -]{0,120}") {
            if let Ok(names) = parse_key_names(&s) {
                prop_assert!(!names.is_empty() && names.len() <= MAX_KEYS);
                for n in &names {
                    prop_assert!(n.len() <= 63 && !n.contains(' ') && !n.contains(','));
                }
            }
        }

        #[test]
        fn valid_lists_parse_back(names in proptest::collection::btree_set(key_name(), 1..=MAX_KEYS)) {
            let names: Vec<String> = names.into_iter().collect();
            let vars: BTreeSet<String> = names.iter().map(|n| base_url_var(n)).collect();
            prop_assume!(vars.len() == names.len());
            prop_assert_eq!(parse_key_names(&names.join(" , ")), Ok(names));
        }
    }

    /// Issue 20: the sidecar's trust is the namespace's bundle, mounted whole, or (pods
    /// injected before trust bundles) a current CA in `BYOK_BROKER_CA`; never both, never a
    /// bundle the pod chose.
    #[test]
    fn the_sidecar_trusts_the_namespaces_bundle_or_a_current_legacy_ca() {
        let now = settings();
        let good = injected(&pod("team-anthropic"), &standard_keys());
        let edited = |edit: &dyn Fn(&mut PodSpec)| {
            let mut pod = good.clone();
            edit(pod.spec.as_mut().expect("spec"));
            token_held_only_by_sidecar(spec(&pod), &now)
        };
        fn sidecar_of(s: &mut PodSpec) -> &mut Container {
            s.init_containers
                .as_mut()
                .and_then(|c| c.iter_mut().find(|c| c.name == SIDECAR_NAME))
                .expect("sidecar")
        }
        fn trust_mount(s: &mut PodSpec) -> &mut VolumeMount {
            sidecar_of(s)
                .volume_mounts
                .as_mut()
                .and_then(|m| m.iter_mut().find(|m| m.name == TRUST_VOLUME))
                .expect("trust mount")
        }
        fn trust_volume_of(s: &mut PodSpec) -> &mut ConfigMapVolumeSource {
            s.volumes
                .as_mut()
                .and_then(|v| v.iter_mut().find(|v| v.name == TRUST_VOLUME))
                .and_then(|v| v.config_map.as_mut())
                .expect("trust volume")
        }
        // The legacy shape: the CA in env, no bundle mount.
        fn legacy(ca: &str) -> impl Fn(&mut PodSpec) + '_ {
            move |s: &mut PodSpec| {
                let c = sidecar_of(s);
                c.volume_mounts
                    .as_mut()
                    .expect("mounts")
                    .retain(|m| m.name != TRUST_VOLUME);
                c.env.get_or_insert_with(Vec::new).insert(
                    0,
                    plain_env(crate::sidecar::shape::LEGACY_CA_VAR, ca.to_owned()),
                );
            }
        }
        assert!(edited(&|_| {}));
        // The API server's defaults and the same file mapped by items: served.
        assert!(edited(&|s| {
            trust_volume_of(s).items = Some(vec![k8s_openapi::api::core::v1::KeyToPath {
                key: names::TRUST_BUNDLE_KEY.into(),
                path: names::TRUST_BUNDLE_KEY.into(),
                ..Default::default()
            }]);
        }));
        assert!(edited(&|s| trust_mount(s).mount_path.push('/')));
        assert!(edited(&legacy(&now.broker_ca_pem)));

        // Another ConfigMap (the namespace's editors write those), optional, another file
        // under the bundle's name, owned by someone else.
        assert!(!edited(&|s| trust_volume_of(s).name = "mine".into()));
        assert!(!edited(&|s| trust_volume_of(s).optional = Some(true)));
        assert!(!edited(&|s| {
            trust_volume_of(s).items = Some(vec![k8s_openapi::api::core::v1::KeyToPath {
                key: "evil.crt".into(),
                path: names::TRUST_BUNDLE_KEY.into(),
                ..Default::default()
            }]);
        }));
        assert!(!edited(&|s| trust_volume_of(s).default_user = Some(0)));
        assert!(!edited(&|s| {
            let v = s
                .volumes
                .as_mut()
                .and_then(|v| v.iter_mut().find(|v| v.name == TRUST_VOLUME))
                .expect("volume");
            v.config_map = None;
            v.empty_dir = Some(Default::default());
        }));
        // Frozen (a subPath is never refreshed), writable, elsewhere, missing, twice.
        assert!(!edited(
            &|s| trust_mount(s).sub_path = Some(names::TRUST_BUNDLE_KEY.into())
        ));
        assert!(!edited(&|s| trust_mount(s).read_only = Some(false)));
        assert!(!edited(&|s| trust_mount(s).mount_path = "/etc/ssl".into()));
        assert!(!edited(&|s| {
            sidecar_of(s)
                .volume_mounts
                .as_mut()
                .expect("mounts")
                .retain(|m| m.name != TRUST_VOLUME);
        }));
        assert!(!edited(&|s| {
            let again = trust_mount(s).clone();
            sidecar_of(s)
                .volume_mounts
                .as_mut()
                .expect("mounts")
                .push(again);
        }));
        // Another bundle file named in env, or both sources at once.
        assert!(!edited(&|s| {
            sidecar_of(s)
                .env
                .get_or_insert_with(Vec::new)
                .push(plain_env("BYOK_BROKER_CA_FILE", "/tmp/ca.crt".into()));
        }));
        assert!(!edited(&|s| {
            sidecar_of(s)
                .env
                .get_or_insert_with(Vec::new)
                .push(plain_env(
                    crate::sidecar::shape::LEGACY_CA_VAR,
                    now.broker_ca_pem.clone(),
                ));
        }));
        // A legacy sidecar trusting another CA, or one no longer current.
        assert!(!edited(&legacy("-----BEGIN CERTIFICATE-----\nevil")));
        // During a CA rotation, one trusting the CA before (it verifies the new certificate
        // through the cross-signed one) is served until the transition ends.
        let previous = "-----BEGIN CERTIFICATE-----\nprevious\n-----END CERTIFICATE-----\n";
        let mut rotating = good.clone();
        legacy(previous)(rotating.spec.as_mut().expect("spec"));
        assert!(!token_held_only_by_sidecar(spec(&rotating), &now));
        let in_transition = InjectSettings {
            previous_ca_pem: Some(previous.to_owned()),
            ..now.clone()
        };
        assert!(token_held_only_by_sidecar(spec(&rotating), &in_transition));

        // The broker decides on its cache's stripped copy: the same answers.
        let stripped = |mut pod: Pod| {
            crate::controller::cache::strip_pod(&mut pod);
            token_held_only_by_sidecar(spec(&pod), &now)
        };
        assert!(stripped(good.clone()));
        let mut other = good.clone();
        trust_volume_of(other.spec.as_mut().expect("spec")).name = "mine".into();
        assert!(!stripped(other));
        // A pod that resolves the broker's name elsewhere (made while the webhook was not
        // asked) is refused on the stripped copy too: the cache keeps how it resolves names.
        let redirected: [fn(&mut PodSpec); 3] = [
            |s| {
                s.host_aliases = Some(vec![k8s_openapi::api::core::v1::HostAlias {
                    ip: "10.1.2.3".into(),
                    hostnames: Some(vec!["broker.byok-system.svc".into()]),
                }]);
            },
            |s| s.dns_policy = Some("None".into()),
            |s| {
                s.dns_config = Some(k8s_openapi::api::core::v1::PodDNSConfig {
                    nameservers: Some(vec!["10.9.9.9".into()]),
                    ..Default::default()
                });
            },
        ];
        for redirect in redirected {
            let mut pod = good.clone();
            redirect(pod.spec.as_mut().expect("spec"));
            assert!(!token_held_only_by_sidecar(spec(&pod), &now));
            assert!(!stripped(pod));
        }
    }

    #[test]
    fn only_a_pod_injected_as_created_holds_its_token_as_the_sidecar() {
        let now = settings();
        let holds = |pod: &Pod| token_held_only_by_sidecar(spec(pod), &now);
        let with_image = |image: &str| InjectSettings {
            proxy_image: image.into(),
            ..settings()
        };
        let good = injected(&pod("team-anthropic"), &standard_keys());
        assert!(holds(&good));
        // After an operator upgrade the image's tag changes, not its repository.
        for image in [
            "ghcr.io/byok/proxy:2.0",
            "ghcr.io/byok/proxy@sha256:0000000000000000000000000000000000000000000000000000000000000000",
        ] {
            assert!(token_held_only_by_sidecar(spec(&good), &with_image(image)));
        }
        assert!(!token_held_only_by_sidecar(
            spec(&good),
            &with_image("registry:5000/byok/proxy:1.0")
        ));

        // Never seen by the webhook: its own token volume, mounted by the application.
        let own = pod_with(
            "team-anthropic",
            json!({
                "containers": [{"name": "app", "image": "app:1",
                    "volumeMounts": [{"name": "t", "mountPath": "/t"}]}],
                "volumes": [{"name": "t", "projected": {"sources": [
                    {"serviceAccountToken": {"audience": "byok.dev", "path": "token"}}]}}],
            }),
        );
        assert!(!holds(&own));

        // The injected pod edited by hand before creation, each way a token could get out.
        let edited = |edit: &dyn Fn(&mut PodSpec)| {
            let mut pod = good.clone();
            edit(pod.spec.as_mut().expect("spec"));
            holds(&pod)
        };
        let in_sidecar = |edit: &dyn Fn(&mut Container)| {
            edited(&|s: &mut PodSpec| {
                let sidecar = s
                    .init_containers
                    .as_mut()
                    .and_then(|c| c.iter_mut().find(|c| c.name == SIDECAR_NAME))
                    .expect("sidecar");
                edit(sidecar);
            })
        };
        let token_mount = || VolumeMount {
            name: TOKEN_VOLUME.into(),
            mount_path: "/t".into(),
            ..Default::default()
        };
        // The application mounting the token too.
        assert!(!edited(
            &|s| s.containers[0].volume_mounts = Some(vec![token_mount()])
        ));
        // Sharing a process namespace with the sidecar (its /proc/<pid>/root).
        assert!(!edited(&|s| s.share_process_namespace = Some(true)));
        assert!(!edited(&|s| s.host_pid = Some(true)));
        // Another name of this broker (one its certificate is for), another port: served.
        assert!(in_sidecar(&|c| {
            if let Some(arg) = c
                .args
                .as_mut()
                .and_then(|a| a.iter_mut().find(|a| a.starts_with("--broker-url=")))
            {
                *arg = "--broker-url=https://LOCALHOST:1".into();
            }
        }));
        // A name the broker's certificate is not for: its CA may sign for others.
        assert!(!in_sidecar(&|c| {
            if let Some(arg) = c
                .args
                .as_mut()
                .and_then(|a| a.iter_mut().find(|a| a.starts_with("--broker-url=")))
            {
                *arg = "--broker-url=https://evil.example".into();
            }
        }));
        // Resolving the broker's name elsewhere.
        assert!(!edited(&|s| {
            s.host_aliases = Some(vec![k8s_openapi::api::core::v1::HostAlias {
                ip: "10.1.2.3".into(),
                hostnames: Some(vec!["Broker.byok-system.svc".into()]),
            }]);
        }));
        assert!(!edited(&|s| s.dns_policy = Some("None".into())));
        assert!(edited(&|s| {
            s.host_aliases = Some(vec![k8s_openapi::api::core::v1::HostAlias {
                ip: "10.1.2.3".into(),
                hostnames: Some(vec!["db.internal".into()]),
            }]);
        }));
        // In the clear, or trusting another CA (hostAliases or dnsConfig could then point the
        // real broker's name elsewhere).
        assert!(!in_sidecar(&|c| {
            if let Some(arg) = c
                .args
                .as_mut()
                .and_then(|a| a.iter_mut().find(|a| a.starts_with("--broker-url=")))
            {
                *arg = "--broker-url=http://broker.byok-system.svc:8443".into();
            }
        }));
        assert!(!in_sidecar(&|c| {
            if let Some(var) = c.env.as_mut().and_then(|e| e.first_mut()) {
                var.value = Some("-----BEGIN CERTIFICATE-----\nevil".into());
            }
        }));
        assert!(!in_sidecar(&|c| c
            .args
            .get_or_insert_with(Vec::new)
            .push("--token-file=/t".into())));
        // Running something else in the sidecar, beside the token.
        assert!(!in_sidecar(&|c| c.command = Some(vec!["/bin/sh".into()])));
        assert!(!in_sidecar(&|c| c.working_dir = Some("/tmp".into())));
        assert!(!in_sidecar(&|c| {
            c.lifecycle = Some(k8s_openapi::api::core::v1::Lifecycle {
                post_start: Some(Default::default()),
                ..Default::default()
            })
        }));
        assert!(!in_sidecar(&|c| {
            if let Some(p) = c.liveness_probe.as_mut() {
                p.exec = Some(Default::default());
            }
        }));
        assert!(!in_sidecar(&|c| c.env_from = Some(vec![Default::default()])));
        // The sidecar's image swapped after creation.
        assert!(!in_sidecar(
            &|c| c.image = Some("evil.example/ghcr.io/byok/proxy:1.0".into())
        ));
        // Resources and pull policy may change between releases.
        assert!(in_sidecar(&|c| {
            c.resources = None;
            c.image_pull_policy = Some("Always".into());
        }));

        // Ephemeral containers (kubectl debug): mounting the token, or joining the sidecar's
        // process namespace.
        let debug = |target: Option<&str>, mount: bool| {
            edited(&|s| {
                s.ephemeral_containers =
                    Some(vec![k8s_openapi::api::core::v1::EphemeralContainer {
                        name: "debug".into(),
                        image: Some("busybox".into()),
                        target_container_name: target.map(String::from),
                        volume_mounts: mount.then(|| vec![token_mount()]),
                        ..Default::default()
                    }]);
            })
        };
        assert!(!debug(None, true));
        assert!(!debug(Some(SIDECAR_NAME), false));
        assert!(
            debug(Some("app"), false),
            "debugging the app leaves the token alone"
        );

        // A second byok.dev token volume beside the sidecar's.
        assert!(!edited(&|s| {
            let volumes = s.volumes.as_mut().expect("volumes");
            let mut extra = volumes
                .iter()
                .find(|v| v.name == TOKEN_VOLUME)
                .expect("token volume")
                .clone();
            extra.name = "another".into();
            volumes.push(extra);
        }));

        // Issue 19: a copy of the sidecar with an emptyDir mounted over its binary (any file
        // the application wrote there would run with the token), and every other change to
        // what it mounts or how it runs.
        assert!(!edited(&|s| {
            s.volumes.as_mut().expect("volumes").push(Volume {
                name: "swap".into(),
                empty_dir: Some(Default::default()),
                ..Default::default()
            });
            let sidecar = s
                .init_containers
                .as_mut()
                .and_then(|c| c.iter_mut().find(|c| c.name == SIDECAR_NAME))
                .expect("sidecar");
            sidecar
                .volume_mounts
                .get_or_insert_with(Vec::new)
                .push(VolumeMount {
                    name: "swap".into(),
                    mount_path: "/byok-operator".into(),
                    sub_path: Some("byok-operator".into()),
                    ..Default::default()
                });
        }));
        let token_mount_edit = |edit: &dyn Fn(&mut VolumeMount)| {
            in_sidecar(&|c| {
                if let Some(m) = c
                    .volume_mounts
                    .as_mut()
                    .and_then(|m| m.iter_mut().find(|m| m.name == TOKEN_VOLUME))
                {
                    edit(m);
                }
            })
        };
        assert!(!token_mount_edit(&|m| m.sub_path = Some("token".into())));
        assert!(!token_mount_edit(
            &|m| m.sub_path_expr = Some("$(POD_NAME)".into())
        ));
        assert!(!token_mount_edit(&|m| m.read_only = Some(false)));
        assert!(!token_mount_edit(&|m| m.mount_path = "/elsewhere".into()));
        assert!(!token_mount_edit(
            &|m| m.mount_propagation = Some("Bidirectional".into())
        ));
        assert!(token_mount_edit(&|m| m.mount_path.push('/')));
        // The empty volume over the API token made into something the app can fill.
        assert!(!edited(&|s| {
            if let Some(v) = s
                .volumes
                .as_mut()
                .and_then(|v| v.iter_mut().find(|v| v.name == NO_API_TOKEN_VOLUME))
            {
                v.empty_dir = None;
                v.host_path = Some(Default::default());
            }
        }));
        // The token volume: longer-lived, or sharing its directory with other files.
        let token_volume_edit = |edit: &dyn Fn(&mut ProjectedVolumeSource)| {
            edited(&|s| {
                if let Some(p) = s
                    .volumes
                    .as_mut()
                    .and_then(|v| v.iter_mut().find(|v| v.name == TOKEN_VOLUME))
                    .and_then(|v| v.projected.as_mut())
                {
                    edit(p);
                }
            })
        };
        assert!(!token_volume_edit(&|p| {
            if let Some(t) = p
                .sources
                .as_mut()
                .and_then(|s| s.first_mut())
                .and_then(|s| s.service_account_token.as_mut())
            {
                t.expiration_seconds = Some(86_400);
            }
        }));
        assert!(!token_volume_edit(&|p| {
            p.sources
                .get_or_insert_with(Vec::new)
                .push(VolumeProjection::default());
        }));
        // Its security settings loosened.
        assert!(!in_sidecar(&|c| {
            if let Some(s) = c.security_context.as_mut() {
                s.read_only_root_filesystem = Some(false);
            }
        }));
        assert!(!in_sidecar(&|c| {
            if let Some(s) = c.security_context.as_mut() {
                s.allow_privilege_escalation = None;
            }
        }));
        assert!(!in_sidecar(&|c| {
            if let Some(s) = c.security_context.as_mut() {
                s.capabilities = Some(Capabilities {
                    add: Some(vec!["SYS_PTRACE".into()]),
                    drop: None,
                });
            }
        }));
        assert!(!in_sidecar(&|c| c.security_context = None));
        assert!(!in_sidecar(&|c| {
            c.volume_devices = Some(vec![k8s_openapi::api::core::v1::VolumeDevice {
                name: "blk".into(),
                device_path: "/etc/ssl/certs/ca-certificates.crt".into(),
            }]);
        }));
        assert!(!in_sidecar(&|c| {
            c.resources.get_or_insert_with(Default::default).claims =
                Some(vec![k8s_openapi::api::core::v1::ResourceClaim {
                    name: "gpu".into(),
                    request: None,
                }]);
        }));
        assert!(!in_sidecar(
            &|c| c.termination_message_path = Some("/t/token".into())
        ));
        // What reaches the node, anywhere in the pod.
        assert!(!edited(&|s| s.host_ipc = Some(true)));
        assert!(!edited(&|s| s.host_network = Some(true)));
        assert!(!edited(&|s| {
            s.containers[0].security_context = Some(SecurityContext {
                privileged: Some(true),
                ..Default::default()
            });
        }));
        assert!(!edited(&|s| {
            s.containers[0].security_context = Some(SecurityContext {
                run_as_user: Some(SIDECAR_UID),
                ..Default::default()
            });
        }));
        assert!(!edited(&|s| {
            s.volumes.as_mut().expect("volumes").push(Volume {
                name: "node".into(),
                host_path: Some(Default::default()),
                ..Default::default()
            });
        }));
        // Mesh init containers keep their capabilities.
        assert!(edited(&|s| {
            s.init_containers
                .get_or_insert_with(Vec::new)
                .push(Container {
                    name: "istio-init".into(),
                    security_context: Some(SecurityContext {
                        capabilities: Some(Capabilities {
                            add: Some(vec!["NET_ADMIN".into(), "NET_RAW".into()]),
                            drop: None,
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                });
        }));
    }

    /// Issue 19: at creation the webhook refuses every way of reading the token from the node.
    #[test]
    fn pods_that_reach_the_node_are_refused() {
        let refused = |spec: serde_json::Value| {
            let mut pod = serde_json::to_value(pod("team-anthropic")).expect("pod");
            for (k, v) in spec.as_object().expect("object") {
                pod["spec"][k] = v.clone();
            }
            let pod: Pod = serde_json::from_value(pod).expect("pod");
            mutate(&pod, NS, &standard_keys(), &settings()).expect_err("refused")
        };
        assert_eq!(refused(json!({"hostIPC": true})), Refusal::HostIpc);
        assert!(matches!(
            refused(
                json!({"containers": [{"name": "app", "securityContext": {"privileged": true}}]})
            ),
            Refusal::Privileged { .. }
        ));
        assert!(matches!(
            refused(
                json!({"initContainers": [{"name": "setup", "securityContext": {"privileged": true}}],
                "containers": [{"name": "app"}]})
            ),
            Refusal::Privileged { .. }
        ));
        let host_path = refused(
            json!({"volumes": [{"name": "node", "hostPath": {"path": "/var/lib/kubelet"}}]}),
        );
        assert!(
            host_path.to_string().contains("hostPath volume \"node\""),
            "{host_path}"
        );
    }

    #[test]
    fn image_repositories_ignore_tags_digests_and_keep_registry_ports() {
        assert_eq!(
            image_repository("ghcr.io/byok/proxy:1.0"),
            "ghcr.io/byok/proxy"
        );
        assert_eq!(
            image_repository("ghcr.io/byok/proxy@sha256:ab"),
            "ghcr.io/byok/proxy"
        );
        assert_eq!(
            image_repository("ghcr.io/byok/proxy:1.0@sha256:ab"),
            "ghcr.io/byok/proxy"
        );
        assert_eq!(
            image_repository("registry:5000/byok/proxy"),
            "registry:5000/byok/proxy"
        );
        assert_eq!(
            image_repository("registry:5000/byok/proxy:2"),
            "registry:5000/byok/proxy"
        );
        assert_eq!(image_repository("byok-operator"), "byok-operator");
    }
}
