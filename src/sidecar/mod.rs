//! The sidecar as the operator knows it: the container the webhook injects ([`container`], its
//! volumes and settings) and the shape the broker accepts as the holder of a pod's token
//! ([`token_held_only_by_sidecar`], over the property-based run settings of [`shape`]). The
//! webhook and the broker both build on this module and on each other never; the facts the
//! sidecar's own binary shares (ports, token path, key names) are in [`byok_proxy::sidecar`].

pub mod shape;

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EnvVar, EnvVarSource,
    HTTPGetAction, ObjectFieldSelector, PodSpec, Probe, ProjectedVolumeSource,
    ResourceRequirements, SeccompProfile, SecurityContext, ServiceAccountTokenProjection, Volume,
    VolumeMount, VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::names::{self, TOKEN_AUDIENCE};
pub use byok_proxy::sidecar::{
    ADMIN_PORT, FIRST_KEY_PORT, MAX_KEYS, MESH_PORTS, PLACEHOLDER_KEY, SIDECAR_NAME, SIDECAR_UID,
    SidecarPorts, TOKEN_DIR, TOKEN_FILE, base_url_var, parse_key_names, shown,
};

/// The pod volume holding the sidecar's projected ServiceAccount token; reserved.
pub const TOKEN_VOLUME: &str = "byok-token";
/// An empty volume the sidecar mounts where Kubernetes would put the pod's API token: the
/// ServiceAccount admission plugin skips containers that already have a mount there. The
/// sidecar needs no API access, and without this the plugin (re-run after our patch) would
/// add its mount and make the sidecar look tampered with on reinvocation.
pub const NO_API_TOKEN_VOLUME: &str = "byok-no-api-token";
/// The pod volume of the namespace's trust-bundle ConfigMap ([`names::TRUST_BUNDLE_CONFIGMAP`]),
/// mounted by the sidecar at [`names::TRUST_BUNDLE_DIR`]; reserved.
pub const TRUST_VOLUME: &str = "byok-broker-ca";
/// Where the ServiceAccount admission plugin mounts the API token.
pub const API_TOKEN_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// Lifetime asked for the broker token (the API server's minimum is 600).
pub const TOKEN_EXPIRY_SECONDS: i64 = 600;
/// The longest the startup probe waits for the key (`/readyz`) before the kubelet restarts
/// the sidecar: probed every [`STARTUP_PERIOD_SECONDS`], so `failureThreshold` is
/// `STARTUP_LONGEST_WAIT_SECONDS / STARTUP_PERIOD_SECONDS`. Long, because a pod may be
/// created before its ProviderKey (GitOps) and the application must not start before the key.
pub const STARTUP_LONGEST_WAIT_SECONDS: i32 = 1800;
/// The startup probe's period.
pub const STARTUP_PERIOD_SECONDS: i32 = 1;

pub const STARTUP_FAILURE_THRESHOLD: i32 = STARTUP_LONGEST_WAIT_SECONDS / STARTUP_PERIOD_SECONDS;
pub const ADMIN_PORT_NAME: &str = "byok-admin";
/// The API server's defaults, set explicitly so a second pass sees what it first wrote.
pub const DEFAULT_MODE: i32 = 0o644;
pub const TERMINATION_MESSAGE_PATH: &str = "/dev/termination-log";
/// What the webhook needs to know to build the sidecar (from the operator's flags).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct InjectSettings {
    /// The sidecar's image (`byok-proxy`; chart: `sidecar.image`).
    pub proxy_image: String,
    /// The operator's own image: releases before the `byok-proxy` image injected it as the
    /// sidecar, running `byok-operator proxy`, and their pods are served for their lives.
    /// Empty: no such pod is served (an install that never ran those releases).
    pub operator_image: String,
    /// `IfNotPresent`, `Always` or `Never`.
    pub pull_policy: String,
    pub resources: ResourceRequirements,
    /// `https://...`, passed to the proxy as `--broker-url=`.
    pub broker_url: String,
    /// PEM of the broker's CA: what sidecars injected before trust bundles hold in env
    /// `BYOK_BROKER_CA` (they are served while it is current), and what the namespace's
    /// trust bundle holds.
    pub broker_ca_pem: String,
    /// During a CA rotation, the CA before it: still in the trust bundle, and still accepted
    /// in the env of sidecars injected before trust bundles (the broker's chain includes the
    /// new CA issued by it, so they verify it).
    pub previous_ca_pem: Option<String>,
    /// The names and addresses the broker's serving certificate is for (lowercased): a
    /// sidecar may call the broker at any of them (an old Service name, `localhost`), and at
    /// nothing else, since its CA might issue certificates for other names too.
    pub broker_hosts: Vec<String>,
    /// False when the cluster drops `restartPolicy` on init containers (checked at start-up):
    /// every opted-in pod is then refused, since a plain init container would never end.
    pub native_sidecars: bool,
    /// The sidecar's ports, unless a pod says otherwise.
    pub ports: SidecarPorts,
}

impl InjectSettings {
    /// The programs a served sidecar may be: the `byok-proxy` image, and the operator's image
    /// running its `proxy` subcommand (releases before the `byok-proxy` image).
    pub fn programs(&self) -> Vec<shape::Program<'_>> {
        let mut programs = vec![shape::Program {
            repository: shape::image_repository(&self.proxy_image),
            subcommand: None,
        }];
        if !self.operator_image.is_empty() {
            programs.push(shape::Program {
                repository: shape::image_repository(&self.operator_image),
                subcommand: Some(shape::LEGACY_SUBCOMMAND),
            });
        }
        programs
    }

    /// The trust bundle the operator publishes: the CA, and during a rotation the one before.
    pub fn trust_bundle_pem(&self) -> String {
        crate::serving::certs::trust_pem(&self.broker_ca_pem, self.previous_ca_pem.as_deref())
    }
}

/// The sidecar settings in effect, shared by the webhook (what it injects) and the broker (what
/// it accepts): swapped whole when the broker's CA or certificate names change.
#[derive(Debug)]
pub struct Current {
    settings: std::sync::RwLock<std::sync::Arc<InjectSettings>>,
    /// Woken when the broker finds a namespace's bundle is not what this replica thinks the
    /// CA is: the certificate keeper reads the Secret again at once.
    ca_recheck: std::sync::Arc<tokio::sync::Notify>,
}

impl Current {
    pub fn new(settings: InjectSettings) -> Self {
        Self {
            settings: std::sync::RwLock::new(std::sync::Arc::new(settings)),
            ca_recheck: std::sync::Arc::default(),
        }
    }

    /// The settings now.
    pub fn settings(&self) -> std::sync::Arc<InjectSettings> {
        self.settings
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Replaces the broker's CA (a new CA, or mounted files) and, during a CA rotation, the
    /// one before it.
    pub fn set_broker_ca(&self, ca_pem: &str, previous: Option<&str>) {
        self.update(|s| {
            if s.broker_ca_pem == ca_pem && s.previous_ca_pem.as_deref() == previous {
                return false;
            }
            s.broker_ca_pem = ca_pem.to_owned();
            s.previous_ca_pem = previous.map(str::to_owned);
            true
        });
    }

    /// The names the broker's serving certificate is for, after a renewal.
    pub fn set_broker_hosts(&self, hosts: Vec<String>) {
        self.update(|s| {
            if s.broker_hosts == hosts {
                return false;
            }
            s.broker_hosts = hosts;
            true
        });
    }

    /// Swaps in a changed copy when `change` says it changed something.
    fn update(&self, change: impl FnOnce(&mut InjectSettings) -> bool) {
        let mut settings = self.settings.write().unwrap_or_else(|p| p.into_inner());
        let mut next = (**settings).clone();
        if change(&mut next) {
            *settings = std::sync::Arc::new(next);
        }
    }

    /// Asks the certificate keeper to read the Secret again now.
    pub fn request_ca_recheck(&self) {
        self.ca_recheck.notify_one();
    }

    /// What [`Self::request_ca_recheck`] wakes.
    pub fn ca_recheck(&self) -> std::sync::Arc<tokio::sync::Notify> {
        self.ca_recheck.clone()
    }
}

/// Why a pod's sidecar token (or memory) could be read through the node ([`node_reach`]); the
/// webhook turns each into its refusal message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeReach {
    HostNetwork,
    HostPid,
    HostIpc,
    ShareProcessNamespace,
    Privileged { field: String },
    HostPath { field: String, volume: String },
    SidecarUid { field: String },
}

fn field_env(name: &str, field_path: &str) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value: None,
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                api_version: Some("v1".to_owned()),
                field_path: field_path.to_owned(),
            }),
            ..Default::default()
        }),
    }
}

fn http_probe(admin: u16, path: &str, period: i32, failure_threshold: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: IntOrString::Int(i32::from(admin)),
            scheme: Some("HTTP".to_owned()),
            ..Default::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failure_threshold),
        timeout_seconds: Some(1),
        success_threshold: Some(1),
        ..Default::default()
    }
}

fn tcp_port(port: u16, name: Option<&str>) -> ContainerPort {
    ContainerPort {
        container_port: i32::from(port),
        name: name.map(str::to_owned),
        protocol: Some("TCP".to_owned()),
        ..Default::default()
    }
}

/// The sidecar's arguments before its `--key=`s: where it serves its admin endpoints and
/// which broker it asks (the `byok-proxy` image's entrypoint is the proxy: no subcommand).
fn proxy_args(settings: &InjectSettings) -> [String; 2] {
    [
        format!("--admin-addr=0.0.0.0:{}", settings.ports.admin),
        format!("--broker-url={}", settings.broker_url),
    ]
}

/// The sidecar's whole environment: the pod's identity. (Its trust in the broker is the
/// mounted trust bundle, which can change while it runs; releases before put the CA here.)
fn proxy_env() -> Vec<EnvVar> {
    vec![
        field_env("POD_NAME", "metadata.name"),
        field_env("POD_NAMESPACE", "metadata.namespace"),
    ]
}

/// The native sidecar serving `keys` (name, loopback port), as the webhook injects it.
pub fn container(settings: &InjectSettings, keys: &[(&str, u16)]) -> Container {
    let mut args = proxy_args(settings).to_vec();
    args.extend(
        keys.iter()
            .map(|(name, port)| format!("--key={name}={port}")),
    );
    let mut ports = vec![tcp_port(settings.ports.admin, Some(ADMIN_PORT_NAME))];
    ports.extend(keys.iter().map(|(_, port)| tcp_port(*port, None)));
    Container {
        name: SIDECAR_NAME.to_owned(),
        image: Some(settings.proxy_image.clone()),
        image_pull_policy: Some(settings.pull_policy.clone()),
        args: Some(args),
        env: Some(proxy_env()),
        ports: Some(ports),
        resources: Some(settings.resources.clone()),
        restart_policy: Some("Always".to_owned()),
        startup_probe: Some(http_probe(
            settings.ports.admin,
            "/readyz",
            STARTUP_PERIOD_SECONDS,
            STARTUP_FAILURE_THRESHOLD,
        )),
        liveness_probe: Some(http_probe(settings.ports.admin, "/livez", 10, 3)),
        security_context: Some(SecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(SIDECAR_UID),
            run_as_group: Some(SIDECAR_UID),
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities {
                add: None,
                drop: Some(vec!["ALL".to_owned()]),
            }),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".to_owned(),
                localhost_profile: None,
            }),
            ..Default::default()
        }),
        volume_mounts: Some(vec![
            VolumeMount {
                name: TOKEN_VOLUME.to_owned(),
                mount_path: TOKEN_DIR.to_owned(),
                read_only: Some(true),
                ..Default::default()
            },
            VolumeMount {
                name: NO_API_TOKEN_VOLUME.to_owned(),
                mount_path: API_TOKEN_DIR.to_owned(),
                read_only: Some(true),
                ..Default::default()
            },
            VolumeMount {
                name: TRUST_VOLUME.to_owned(),
                mount_path: names::TRUST_BUNDLE_DIR.to_owned(),
                read_only: Some(true),
                ..Default::default()
            },
        ]),
        termination_message_path: Some(TERMINATION_MESSAGE_PATH.to_owned()),
        termination_message_policy: Some("File".to_owned()),
        ..Default::default()
    }
}

/// See [`NO_API_TOKEN_VOLUME`].
pub fn no_api_token_volume() -> Volume {
    Volume {
        name: NO_API_TOKEN_VOLUME.to_owned(),
        empty_dir: Some(Default::default()),
        ..Default::default()
    }
}

/// The namespace's trust bundle, the whole ConfigMap: the kubelet refreshes such a mount when
/// the ConfigMap changes (a `subPath` mount it never refreshes, so none is accepted).
pub fn trust_volume() -> Volume {
    Volume {
        name: TRUST_VOLUME.to_owned(),
        config_map: Some(ConfigMapVolumeSource {
            name: names::TRUST_BUNDLE_CONFIGMAP.to_owned(),
            default_mode: Some(DEFAULT_MODE),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Whether `v` is [`trust_volume`], as injected or as the API server defaulted it; any
/// `items` only map the bundle to its own name.
pub fn is_our_trust_volume(v: &Volume) -> bool {
    let Some(cm) = v.config_map.as_ref() else {
        return false;
    };
    let items_ok = cm.items.as_deref().is_none_or(|items| {
        items.iter().all(|i| {
            i.key == names::TRUST_BUNDLE_KEY
                && i.path == names::TRUST_BUNDLE_KEY
                && i.mode.is_none()
                && i.user.is_none()
        })
    });
    cm.name == names::TRUST_BUNDLE_CONFIGMAP
        && cm.optional != Some(true)
        && cm.default_user.is_none()
        && items_ok
        && *v
            == Volume {
                name: TRUST_VOLUME.to_owned(),
                config_map: Some(cm.clone()),
                ..Default::default()
            }
}

/// The projected broker token only the sidecar mounts.
pub fn token_volume() -> Volume {
    Volume {
        name: TOKEN_VOLUME.to_owned(),
        projected: Some(ProjectedVolumeSource {
            default_mode: Some(DEFAULT_MODE),
            sources: Some(vec![VolumeProjection {
                service_account_token: Some(ServiceAccountTokenProjection {
                    audience: Some(TOKEN_AUDIENCE.to_owned()),
                    expiration_seconds: Some(TOKEN_EXPIRY_SECONDS),
                    path: TOKEN_FILE.to_owned(),
                    user: None,
                }),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Refuses a pod from which the sidecar's token (or memory) can be read through the node:
/// host namespaces, privileged containers and hostPath volumes (app, init and ephemeral
/// containers alike), and another container running as the sidecar's UID. The capabilities
/// mesh init containers need (`NET_ADMIN`, `NET_RAW`) stay allowed: with the broker's CA
/// pinned they expose nothing. The webhook checks this at creation and the broker on the pod
/// as stored now, every time it serves it.
pub fn node_reach(spec: &PodSpec) -> Result<(), NodeReach> {
    if spec.host_network == Some(true) {
        return Err(NodeReach::HostNetwork);
    }
    if spec.host_pid == Some(true) {
        return Err(NodeReach::HostPid);
    }
    if spec.host_ipc == Some(true) {
        return Err(NodeReach::HostIpc);
    }
    if spec.share_process_namespace == Some(true) {
        return Err(NodeReach::ShareProcessNamespace);
    }
    if spec
        .security_context
        .as_ref()
        .and_then(|s| s.run_as_user)
        .is_some_and(|uid| uid == SIDECAR_UID)
    {
        return Err(NodeReach::SidecarUid {
            field: "spec.securityContext.runAsUser".to_owned(),
        });
    }
    for (i, v) in spec.volumes.iter().flatten().enumerate() {
        if v.host_path.is_some() {
            return Err(NodeReach::HostPath {
                field: format!("spec.volumes[{i}]"),
                volume: v.name.clone(),
            });
        }
    }
    // (field, name, security) of every container, app, init and ephemeral.
    let of = |list: &str, i: usize, name: &'_ String, security: Option<&'_ SecurityContext>| {
        (format!("spec.{list}[{i}]"), name.clone(), security.cloned())
    };
    let containers = (spec.containers.iter().enumerate())
        .map(|(i, c)| of("containers", i, &c.name, c.security_context.as_ref()))
        .chain(
            (spec.init_containers.iter().flatten().enumerate())
                .map(|(i, c)| of("initContainers", i, &c.name, c.security_context.as_ref())),
        )
        .chain(
            (spec.ephemeral_containers.iter().flatten().enumerate()).map(|(i, c)| {
                of(
                    "ephemeralContainers",
                    i,
                    &c.name,
                    c.security_context.as_ref(),
                )
            }),
        );
    for (field, name, security) in containers {
        let Some(security) = security else { continue };
        if security.privileged == Some(true) {
            return Err(NodeReach::Privileged {
                field: format!("{field}.securityContext.privileged"),
            });
        }
        if name != SIDECAR_NAME && security.run_as_user == Some(SIDECAR_UID) {
            return Err(NodeReach::SidecarUid {
                field: format!("{field}.securityContext.runAsUser"),
            });
        }
    }
    Ok(())
}

/// Whether the pod's sidecar mounts the namespace's trust bundle (rather than holding its CA
/// in env, as releases before did).
pub fn trusts_namespace_bundle(spec: &PodSpec) -> bool {
    spec.init_containers
        .iter()
        .flatten()
        .filter(|c| c.name == SIDECAR_NAME)
        .flat_map(|c| c.volume_mounts.iter().flatten())
        .any(|m| m.name == TRUST_VOLUME)
}

/// Whether the token holder's mounts are the accepted ones: the token volume at
/// [`TOKEN_DIR`], the empty volume over [`API_TOKEN_DIR`] and the trust bundle at
/// [`names::TRUST_BUNDLE_DIR`], each read-only, whole (no `subPath`, which would also freeze
/// the bundle), without propagation; no other volume (one mounted over the binary or the CA
/// bundle would change what runs or whom it trusts). Its trust comes from exactly one place:
/// the mounted bundle (this release on), or `BYOK_BROKER_CA` (releases before; see
/// [`shape`]).
fn holder_mounts_accepted(c: &Container, volumes: &[Volume]) -> bool {
    let mounts = c.volume_mounts.as_deref().unwrap_or_default();
    let accepted = |m: &VolumeMount| {
        let place = match m.name.as_str() {
            TOKEN_VOLUME => TOKEN_DIR,
            NO_API_TOKEN_VOLUME => API_TOKEN_DIR,
            TRUST_VOLUME => names::TRUST_BUNDLE_DIR,
            _ => return false,
        };
        m.mount_path.trim_end_matches('/') == place
            && m.read_only == Some(true)
            && m.sub_path.as_deref().is_none_or(str::is_empty)
            && m.sub_path_expr.as_deref().is_none_or(str::is_empty)
            && m.mount_propagation.as_deref().is_none_or(|p| p == "None")
    };
    let volume = |name: &str| volumes.iter().find(|v| v.name == name);
    // The empty volume must be just that (nothing the application could fill in).
    let empty_ok = volume(NO_API_TOKEN_VOLUME).is_none_or(|v| {
        v.empty_dir.is_some()
            && Volume {
                name: v.name.clone(),
                empty_dir: v.empty_dir.clone(),
                ..Volume::default()
            } == *v
    });
    // The trust bundle is the namespace's, which only the operator writes, mounted once,
    // exactly when the env names no CA.
    let trust_mounts = mounts.iter().filter(|m| m.name == TRUST_VOLUME).count();
    let ca_in_env = c
        .env
        .iter()
        .flatten()
        .any(|e| e.name == shape::LEGACY_CA_VAR);
    let trust_ok = match (trust_mounts, ca_in_env) {
        (1, false) => volume(TRUST_VOLUME).is_some_and(is_our_trust_volume),
        (0, true) => true,
        _ => false,
    };
    // The token volume holds the token alone, for us, short-lived.
    let token_ok = volume(TOKEN_VOLUME).is_some_and(|v| {
        let Some(projected) = v.projected.as_ref() else {
            return false;
        };
        let sources = projected.sources.as_deref().unwrap_or_default();
        v.host_path.is_none()
            && sources.len() == 1
            && sources[0].service_account_token.as_ref().is_some_and(|t| {
                t.audience.as_deref() == Some(TOKEN_AUDIENCE)
                    && t.path == TOKEN_FILE
                    && t.expiration_seconds
                        .is_some_and(|e| e <= TOKEN_EXPIRY_SECONDS)
            })
    });
    mounts.iter().all(accepted)
        && mounts.iter().filter(|m| m.name == TOKEN_VOLUME).count() == 1
        && mounts
            .iter()
            .filter(|m| m.name == NO_API_TOKEN_VOLUME)
            .count()
            <= 1
        && empty_ok
        && token_ok
        && trust_ok
}

/// Whether the token holder runs locked down as injected: not privileged, no privilege
/// escalation or added capabilities, a read-only root filesystem, not root.
fn holder_security_accepted(c: &Container) -> bool {
    let Some(s) = c.security_context.as_ref() else {
        return false;
    };
    s.privileged != Some(true)
        && s.allow_privilege_escalation == Some(false)
        && s.read_only_root_filesystem == Some(true)
        && s.run_as_user.is_some_and(|u| u != 0)
        && s.capabilities
            .as_ref()
            .is_none_or(|c| c.add.as_deref().is_none_or(<[String]>::is_empty))
}

/// Whether the only thing in the pod that can read a `byok.dev` token is a sidecar of the
/// accepted shape, as some release of this webhook injected it: its run settings as
/// [`shape::runs_our_proxy`] accepts them (the `byok-proxy` image, or the operator's
/// image running `proxy` as releases before it injected, asking this broker at a name its certificate is for and trusting this broker's CA, nothing
/// else steering it), its mounts and security context as injected, in a pod that reaches
/// nothing of the node and resolves the broker's name as the cluster does.
///
/// The broker serves a pod only when this holds. Containers, their args, env, mounts and the
/// pod's volumes cannot change after creation, so it proves the token's holder is our proxy
/// talking to our broker: a pod made without the inject label (the webhook never saw it) and
/// labelled later fails, and so do a sidecar whose image was swapped (images are the one
/// mutable part) and an ephemeral container mounting the token or targeting the sidecar.
pub fn token_held_only_by_sidecar(spec: &PodSpec, settings: &InjectSettings) -> bool {
    let token_volumes: BTreeSet<&str> = spec
        .volumes
        .iter()
        .flatten()
        .filter(|v| {
            v.projected
                .as_ref()
                .and_then(|p| p.sources.as_ref())
                .is_some_and(|sources| {
                    sources.iter().any(|s| {
                        s.service_account_token
                            .as_ref()
                            .is_some_and(|t| t.audience.as_deref() == Some(TOKEN_AUDIENCE))
                    })
                })
        })
        .map(|v| v.name.as_str())
        .collect();
    if token_volumes != BTreeSet::from([TOKEN_VOLUME]) || node_reach(spec).is_err() {
        return false;
    }
    let mounts_token = |mounts: &Option<Vec<VolumeMount>>| {
        mounts
            .iter()
            .flatten()
            .any(|m| token_volumes.contains(m.name.as_str()))
    };
    if spec
        .containers
        .iter()
        .any(|c| mounts_token(&c.volume_mounts))
    {
        return false;
    }
    let ephemeral_reaches_it = spec.ephemeral_containers.iter().flatten().any(|c| {
        mounts_token(&c.volume_mounts) || c.target_container_name.as_deref() == Some(SIDECAR_NAME)
    });
    if ephemeral_reaches_it {
        return false;
    }
    let mut holders = spec
        .init_containers
        .iter()
        .flatten()
        .filter(|c| mounts_token(&c.volume_mounts));
    let (Some(holder), None) = (holders.next(), holders.next()) else {
        return false;
    };
    // Nothing else reaches into it: no block device (a file over its CA bundle), no
    // resource claim (a device driver can add mounts and env), its termination message
    // where every release put it.
    let nothing_else = holder.volume_devices.as_deref().is_none_or(<[_]>::is_empty)
        && holder
            .resources
            .as_ref()
            .and_then(|r| r.claims.as_deref())
            .is_none_or(<[_]>::is_empty)
        && holder
            .termination_message_path
            .as_deref()
            .is_none_or(|p| p == TERMINATION_MESSAGE_PATH);
    holder.name == SIDECAR_NAME
        && nothing_else
        && shape::resolves_broker_as_the_cluster_does(spec, &settings.broker_hosts)
        && runs_our_proxy(holder, settings)
        && holder_mounts_accepted(holder, spec.volumes.as_deref().unwrap_or_default())
        && holder_security_accepted(holder)
}

/// Whether `c` runs the proxy as some release injected it, talking to this broker: the
/// accepted shape is defined by properties in [`shape`], so that pods injected before
/// an upgrade keep their keys.
fn runs_our_proxy(c: &Container, settings: &InjectSettings) -> bool {
    let accepted: Vec<&str> = std::iter::once(settings.broker_ca_pem.as_str())
        .chain(settings.previous_ca_pem.as_deref())
        .collect();
    shape::runs_our_proxy(c, &settings.programs(), &accepted, &settings.broker_hosts)
}
