//! What the webhook refuses after a pod exists: the changes that would turn a pod the
//! webhook never injected into one the broker serves, or change what runs with the
//! sidecar's token; and `exec`, `attach` (and, where the chart asks, `port-forward`) into
//! the sidecar. Pure.
//!
//! The broker checks the pod as stored on every request anyway (the accepted shape, see
//! `patch::token_held_only_by_sidecar`); refusing these at the API server keeps a swapped
//! image from ever running (a kubelet restarts a native sidecar on an image change) and
//! tells the person at the keyboard why.

use k8s_openapi::api::core::v1::Pod;

use super::patch::{MAX_KEYS, SIDECAR_NAME, SidecarPorts};
use crate::names::{self, PROVIDER_KEYS_ANNOTATION};

/// Why an update or a connection is refused; the message is shown by kubectl.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Guarded {
    #[error(
        "label {}={} can only be set when a pod is created (the webhook injects the {SIDECAR_NAME} sidecar then); create the pod with it",
        names::INJECT_LABEL,
        names::INJECT_VALUE
    )]
    LateOptIn,
    #[error(
        "annotation {PROVIDER_KEYS_ANNOTATION} of a pod using byok keys cannot change after creation (the sidecar serves the keys it was created with); recreate the pod"
    )]
    KeysChanged,
    #[error(
        "the image of the {SIDECAR_NAME} sidecar cannot change after creation (it holds the pod's key token); recreate the pod"
    )]
    SidecarImageChanged,
    #[error(
        "{0} into the {SIDECAR_NAME} container is refused: it holds the pod's key token; use the application's containers"
    )]
    IntoSidecar(&'static str),
    #[error(
        "port-forward to port {0} is refused: it is a port of the {SIDECAR_NAME} sidecar, which serves the pod's keys"
    )]
    PortForwardToSidecar(i64),
    #[error(
        "port-forward to a pod using byok keys is refused: the ports a request names do not bind its streams (kubectl names them only once connected), and the {SIDECAR_NAME} sidecar's would serve the pod's keys"
    )]
    PortForwardToOptedIn,
    #[error(
        "ephemeral container \"{0}\" is refused in a pod using byok keys: it targets the {SIDECAR_NAME} sidecar, mounts its token, is privileged or runs as its user"
    )]
    EphemeralReachesSidecar(String),
    #[error(
        "tokens for audience \"{}\" are for the kubelet to mount into the {SIDECAR_NAME} sidecar; with one, anyone could ask the key broker for the pod's keys",
        names::TOKEN_AUDIENCE
    )]
    BrokerToken,
}

/// A TokenRequest (`serviceaccounts/token` CREATE) by `username` in `groups` for
/// `audiences`: a `byok.dev` token is the kubelet's to mint (for the projected volume of an
/// injected sidecar), nobody else's. So `serviceaccounts/token` create stops being key
/// access.
pub fn token_request(
    username: &str,
    groups: &[String],
    audiences: &[String],
) -> Result<(), Guarded> {
    let for_broker = audiences.iter().any(|a| a == names::TOKEN_AUDIENCE);
    let node = username.starts_with("system:node:") && groups.iter().any(|g| g == "system:nodes");
    if for_broker && !node {
        return Err(Guarded::BrokerToken);
    }
    Ok(())
}

/// A `CONNECT` to a pod's `subresource` (`exec`, `attach`, `portforward`); `opted_in`:
/// whether the pod uses keys (from the pod cache); `sidecar_ports`: the ports its sidecar may
/// listen on ([`sidecar_ports`]).
pub fn connect(
    subresource: &str,
    container: Option<&str>,
    ports: &[i64],
    opted_in: bool,
    sidecar_ports: &std::collections::BTreeSet<i64>,
) -> Result<(), Guarded> {
    match subresource {
        "exec" if container == Some(SIDECAR_NAME) => Err(Guarded::IntoSidecar("exec")),
        "attach" if container == Some(SIDECAR_NAME) => Err(Guarded::IntoSidecar("attach")),
        // kubectl and client-go name the ports in stream headers, after admission, and those
        // need not be the ports the request names: a pod with a sidecar is refused whole.
        "portforward" if opted_in => Err(Guarded::PortForwardToOptedIn),
        "portforward" => match ports.iter().find(|p| sidecar_ports.contains(p)) {
            Some(p) => Err(Guarded::PortForwardToSidecar(*p)),
            None => Ok(()),
        },
        _ => Ok(()),
    }
}

/// An `UPDATE` of `pods/ephemeralcontainers` (kubectl debug) of an opted-in pod: no
/// ephemeral container may target the sidecar, mount its token, be privileged or run as
/// its user (the broker would refuse the pod from then on; this says so before).
pub fn ephemeral(new: &Pod) -> Result<(), Guarded> {
    use super::patch::{SIDECAR_UID, TOKEN_VOLUME};
    let spec = new.spec.as_ref();
    for c in spec
        .and_then(|s| s.ephemeral_containers.as_ref())
        .into_iter()
        .flatten()
    {
        let security = c.security_context.as_ref();
        let reaches = c.target_container_name.as_deref() == Some(SIDECAR_NAME)
            || c.volume_mounts
                .iter()
                .flatten()
                .any(|m| m.name == TOKEN_VOLUME)
            || security.and_then(|s| s.privileged) == Some(true)
            || security.and_then(|s| s.run_as_user) == Some(SIDECAR_UID);
        if reaches {
            return Err(Guarded::EphemeralReachesSidecar(c.name.clone()));
        }
    }
    Ok(())
}

/// The ports a sidecar may listen on, for a pod not known to use keys (one that is, is refused
/// whole): the configured ones and the defaults, each admin port and its [`MAX_KEYS`] key
/// ports.
pub fn sidecar_ports(configured: SidecarPorts) -> std::collections::BTreeSet<i64> {
    [configured, SidecarPorts::default()]
        .into_iter()
        .flat_map(|p| std::iter::once(p.admin).chain(p.keys(MAX_KEYS)))
        .map(i64::from)
        .collect()
}

/// An `UPDATE` of a pod from `old` to `new`.
pub fn update(old: &Pod, new: &Pod) -> Result<(), Guarded> {
    let opted_in = |p: &Pod| names::opts_in(p.metadata.labels.as_ref());
    let keys = |p: &Pod| {
        p.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(PROVIDER_KEYS_ANNOTATION))
            .cloned()
    };
    if opted_in(new) && !opted_in(old) {
        return Err(Guarded::LateOptIn);
    }
    if opted_in(new) && keys(new) != keys(old) {
        return Err(Guarded::KeysChanged);
    }
    let sidecar_image = |p: &Pod| {
        p.spec
            .as_ref()
            .and_then(|s| s.init_containers.as_ref())
            .and_then(|c| c.iter().find(|c| c.name == SIDECAR_NAME))
            .map(|c| c.image.clone())
    };
    if sidecar_image(new) != sidecar_image(old) {
        return Err(Guarded::SidecarImageChanged);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(labelled: bool, keys: Option<&str>, image: Option<&str>) -> Pod {
        let mut p = json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "app"}]}});
        if labelled {
            p["metadata"]["labels"] = json!({(names::INJECT_LABEL): names::INJECT_VALUE});
        }
        if let Some(keys) = keys {
            p["metadata"]["annotations"] = json!({(PROVIDER_KEYS_ANNOTATION): keys});
        }
        if let Some(image) = image {
            p["spec"]["initContainers"] = json!([{"name": SIDECAR_NAME, "image": image}]);
        }
        serde_json::from_value(p).expect("pod")
    }

    #[test]
    fn updates_that_would_reach_the_key_are_refused() {
        let injected = pod(true, Some("ant"), Some("byok/proxy:1"));
        // A pod created past the webhook, labelled later.
        assert_eq!(
            update(
                &pod(false, Some("ant"), None),
                &pod(true, Some("ant"), None)
            ),
            Err(Guarded::LateOptIn)
        );
        assert_eq!(
            update(
                &injected,
                &pod(true, Some("ant,other"), Some("byok/proxy:1"))
            ),
            Err(Guarded::KeysChanged)
        );
        assert_eq!(
            update(&injected, &pod(true, Some("ant"), Some("evil/steal:1"))),
            Err(Guarded::SidecarImageChanged)
        );
        // Also once the label is gone: the sidecar still holds the token.
        assert_eq!(
            update(&injected, &pod(false, Some("ant"), Some("evil/steal:1"))),
            Err(Guarded::SidecarImageChanged)
        );
    }

    #[test]
    fn ordinary_updates_pass() {
        let injected = pod(true, Some("ant"), Some("byok/proxy:1"));
        assert_eq!(update(&injected, &injected), Ok(()));
        // Opting out; other labels and annotations; pods that never opted in.
        assert_eq!(
            update(&injected, &pod(false, None, Some("byok/proxy:1"))),
            Ok(())
        );
        let mut relabelled = injected.clone();
        relabelled
            .metadata
            .labels
            .get_or_insert_with(Default::default)
            .insert("team".into(), "a".into());
        assert_eq!(update(&injected, &relabelled), Ok(()));
        assert_eq!(
            update(&pod(false, None, None), &pod(false, Some("x"), None)),
            Ok(())
        );
    }

    #[test]
    fn ephemeral_containers_keep_off_the_sidecar() {
        let with = |e: serde_json::Value| {
            let mut p =
                serde_json::to_value(pod(true, Some("ant"), Some("byok/proxy:1"))).expect("pod");
            p["spec"]["ephemeralContainers"] = json!([e]);
            serde_json::from_value::<Pod>(p).expect("pod")
        };
        assert_eq!(
            ephemeral(&with(
                json!({"name": "debug", "targetContainerName": "app"})
            )),
            Ok(())
        );
        for bad in [
            json!({"name": "d", "targetContainerName": SIDECAR_NAME}),
            json!({"name": "d", "volumeMounts": [{"name": "byok-token", "mountPath": "/t"}]}),
            json!({"name": "d", "securityContext": {"privileged": true}}),
            json!({"name": "d", "securityContext": {"runAsUser": 15532}}),
        ] {
            assert!(ephemeral(&with(bad.clone())).is_err(), "{bad}");
        }
    }

    #[test]
    fn only_nodes_mint_broker_tokens() {
        let nodes = vec!["system:nodes".to_owned(), "system:authenticated".to_owned()];
        let ours = vec![names::TOKEN_AUDIENCE.to_owned()];
        assert_eq!(token_request("system:node:n1", &nodes, &ours), Ok(()));
        assert_eq!(
            token_request("alice", &["system:authenticated".to_owned()], &ours),
            Err(Guarded::BrokerToken)
        );
        // A user named like a node but not in the nodes group.
        assert_eq!(
            token_request("system:node:n1", &[], &ours),
            Err(Guarded::BrokerToken)
        );
        assert_eq!(
            token_request("alice", &[], &["https://kubernetes.default.svc".to_owned()]),
            Ok(())
        );
    }

    fn connect(
        subresource: &str,
        container: Option<&str>,
        ports: &[i64],
        opted_in: bool,
    ) -> Result<(), Guarded> {
        super::connect(
            subresource,
            container,
            ports,
            opted_in,
            &sidecar_ports(SidecarPorts::default()),
        )
    }

    #[test]
    fn moved_ports_are_refused_for_pods_not_known_to_use_keys() {
        let ports = sidecar_ports(SidecarPorts {
            admin: 16120,
            first_key: 16100,
        });
        for p in [16120, 16100, 16115, 15120, 15100, 15115] {
            assert_eq!(
                super::connect("portforward", None, &[p], false, &ports),
                Err(Guarded::PortForwardToSidecar(p))
            );
        }
        assert_eq!(
            super::connect("portforward", None, &[16116], false, &ports),
            Ok(())
        );
    }

    #[test]
    fn connections_into_the_sidecar_are_refused() {
        assert_eq!(
            connect("exec", Some(SIDECAR_NAME), &[], true),
            Err(Guarded::IntoSidecar("exec"))
        );
        assert_eq!(
            connect("attach", Some(SIDECAR_NAME), &[], true),
            Err(Guarded::IntoSidecar("attach"))
        );
        assert_eq!(connect("exec", Some("app"), &[], true), Ok(()));
        assert_eq!(connect("exec", None, &[], true), Ok(()));
        assert_eq!(
            connect("portforward", None, &[8080, 15100], false),
            Err(Guarded::PortForwardToSidecar(15100))
        );
        assert_eq!(
            connect("portforward", None, &[15120], false),
            Err(Guarded::PortForwardToSidecar(15120))
        );
        // A pod using keys: refused whatever the request names (the streams may differ).
        assert_eq!(
            connect("portforward", None, &[8080], true),
            Err(Guarded::PortForwardToOptedIn)
        );
        assert_eq!(connect("portforward", None, &[8080, 15116], false), Ok(()));
        // What kubectl sends: no ports in the request.
        assert_eq!(
            connect("portforward", None, &[], true),
            Err(Guarded::PortForwardToOptedIn)
        );
        assert_eq!(connect("portforward", None, &[], false), Ok(()));
    }
}
