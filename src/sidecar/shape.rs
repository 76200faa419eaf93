//! How the sidecar may run and still be served: the accepted shape of its run settings,
//! defined by properties rather than by equality with what this release injects, so that pods
//! injected by earlier releases (other admin port, broker URL, image tag, resources, keys)
//! keep their keys after an upgrade, and a copy that changes whom the sidecar trusts or where
//! its token goes does not get one.
//!
//! What matters, and why:
//! - **Trust**: the sidecar mounts the namespace's trust bundle (`byok-broker-ca`, which only
//!   the operator may write; the mount is checked with the pod's volumes in
//!   `patch::holder_mounts_accepted`), or, as releases before trust bundles injected it,
//!   holds the CA in `BYOK_BROKER_CA`, which must then be one the broker accepts. The sidecar
//!   completes TLS, and so sends its token, only to a server proving a certificate from that
//!   CA for the URL's host. That CA may issue certificates for other names too (a shared
//!   cert-manager issuer), so the URL's host must be one the broker's own certificate is for
//!   (a renamed Service kept as an alias, `localhost` for `127.0.0.1`); its port and path do
//!   not matter. The pod must resolve those names as the cluster does (no `hostAliases` for
//!   them, no DNS servers of its own: see `resolves_broker_as_the_cluster_does`).
//! - **Where the token and key go**: nothing else may steer the proxy: `proxy` with only the
//!   flags below, no other variable (`BYOK_TOKEN_FILE`, proxy variables, `SSL_CERT_FILE`), no
//!   `envFrom`, no command, working directory, lifecycle hook or exec probe of its own.
//! - **Not relevant**: the admin address, the keys and their ports (the broker checks the pod's
//!   annotation), the image's tag (the repository is checked, and a change of image after
//!   creation is caught by `controller::swaps`), resources, pull policy, probes' timings.
//!
//! Each release's injected sidecar is kept as a fixture (`fixtures/sidecars/`): every one
//! must stay accepted (`e2e/tests/sidecar_shapes.rs` and the tests below).

use k8s_openapi::api::core::v1::{Container, EnvVar};

/// The programs that have been the sidecar: each image repository with the arguments that
/// come before the flags. Since the `byok-proxy` image, its entrypoint is the proxy itself
/// (no subcommand); releases before it injected the operator's own image running
/// `byok-operator proxy`, and their pods keep that shape for their lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Program<'a> {
    /// `registry/name` of the image (see [`image_repository`]).
    pub repository: &'a str,
    /// The subcommand before the flags (`proxy` in the operator's image), if any.
    pub subcommand: Option<&'a str>,
}

/// The subcommand of the operator's binary that ran the proxy before the `byok-proxy` image.
pub const LEGACY_SUBCOMMAND: &str = "proxy";

/// The flags the sidecar may be run with: the ones that only say where it listens, which
/// keys it serves and which broker it asks. Anything else (`--broker-ca`, `--token-file`,
/// `--namespace`, a flag of a later release not yet known here) is refused.
fn args_accepted(args: &[String], subcommand: Option<&str>, broker_hosts: &[String]) -> bool {
    // `$(VAR)` is expanded by the kubelet: what runs would not be what was checked.
    if args.iter().any(|a| a.contains("$(")) {
        return false;
    }
    let flags = match (subcommand, args.split_first()) {
        (None, _) => args,
        (Some(wanted), Some((first, flags))) if first == wanted => flags,
        (Some(_), _) => return false,
    };
    let (mut brokers, mut admins, mut keys) = (0, 0, 0);
    for flag in flags {
        if let Some(url) = flag.strip_prefix("--broker-url=") {
            brokers += 1;
            let https = url::Url::parse(url).is_ok_and(|u| {
                let host = u.host_str().map(|h| {
                    h.trim_start_matches('[')
                        .trim_end_matches(']')
                        .to_ascii_lowercase()
                });
                u.scheme() == "https"
                    && host.is_some_and(|h| broker_hosts.contains(&h))
                    && u.username().is_empty()
                    && u.password().is_none()
            });
            if !https {
                return false;
            }
        } else if let Some(addr) = flag.strip_prefix("--admin-addr=") {
            admins += 1;
            if addr.parse::<std::net::SocketAddr>().is_err() {
                return false;
            }
        } else if let Some(key) = flag.strip_prefix("--key=") {
            keys += 1;
            if crate::proxy::parse_key_arg(key).is_err() {
                return false;
            }
        } else {
            return false;
        }
    }
    brokers == 1 && admins <= 1 && keys >= 1
}

/// The variable in which releases before trust bundles gave the sidecar the broker's CA.
pub const LEGACY_CA_VAR: &str = "BYOK_BROKER_CA";

/// The variables the sidecar may have: the pod's name and namespace from the downward API,
/// each once, in any order, and (sidecars injected before trust bundles) the broker's CA,
/// one of `accepted_cas`.
fn env_accepted(env: &[EnvVar], accepted_cas: &[&str]) -> bool {
    let field = |name: &str, path: &str| {
        env.iter().filter(|e| e.name == name).exactly_one(|e| {
            e.value.is_none()
                && e.value_from.as_ref().is_some_and(|from| {
                    from.config_map_key_ref.is_none()
                        && from.secret_key_ref.is_none()
                        && from.resource_field_ref.is_none()
                        && from.file_key_ref.is_none()
                        && from.field_ref.as_ref().is_some_and(|f| {
                            f.field_path == path
                                && f.api_version.as_deref().is_none_or(|v| v == "v1")
                        })
                })
        })
    };
    let legacy = env.iter().any(|e| e.name == LEGACY_CA_VAR);
    let ca = !legacy
        || env
            .iter()
            .filter(|e| e.name == LEGACY_CA_VAR)
            .exactly_one(|e| {
                e.value_from.is_none()
                    && e.value
                        .as_deref()
                        .is_some_and(|pem| accepted_cas.contains(&pem))
            });
    env.len() == 2 + usize::from(legacy)
        && ca
        && field("POD_NAME", "metadata.name")
        && field("POD_NAMESPACE", "metadata.namespace")
}

/// One item, and it passes `check`.
trait ExactlyOne<T> {
    fn exactly_one(self, check: impl Fn(T) -> bool) -> bool;
}

impl<T, I: Iterator<Item = T>> ExactlyOne<T> for I {
    fn exactly_one(mut self, check: impl Fn(T) -> bool) -> bool {
        match (self.next(), self.next()) {
            (Some(only), None) => check(only),
            _ => false,
        }
    }
}

/// Whether `c` runs the proxy the way a release of this operator injected it, talking to
/// this broker (at one of `broker_hosts`, trusting one of `accepted_cas`) and nothing else,
/// as one of `programs` (an image of its repository, its arguments after its subcommand).
pub fn runs_our_proxy(
    c: &Container,
    programs: &[Program<'_>],
    accepted_cas: &[&str],
    broker_hosts: &[String],
) -> bool {
    let no_exec = [&c.startup_probe, &c.liveness_probe, &c.readiness_probe]
        .iter()
        .all(|p| p.as_ref().is_none_or(|p| p.exec.is_none()));
    let repository = image_repository(c.image.as_deref().unwrap_or_default());
    // Any program of this repository whose arguments these are (should two share a
    // repository, each is tried).
    let runs_a_program = c.args.as_deref().is_some_and(|args| {
        programs.iter().any(|p| {
            !p.repository.is_empty()
                && p.repository == repository
                && args_accepted(args, p.subcommand, broker_hosts)
        })
    });
    runs_a_program
        && c.restart_policy.as_deref() == Some("Always")
        && c.command.is_none()
        && c.working_dir.is_none()
        && c.lifecycle.is_none()
        && c.env_from.as_ref().is_none_or(Vec::is_empty)
        && env_accepted(c.env.as_deref().unwrap_or_default(), accepted_cas)
        && no_exec
}

/// Whether the pod resolves the broker's names as the cluster does: no `hostAliases` entry
/// for one of them and no DNS servers of its own (`dnsPolicy: None`, `dnsConfig.nameservers`).
/// With a CA that also issues certificates for others, either would send the sidecar's token
/// to whoever holds one for the broker's name.
pub fn resolves_broker_as_the_cluster_does(
    spec: &k8s_openapi::api::core::v1::PodSpec,
    broker_hosts: &[String],
) -> bool {
    let aliased = spec.host_aliases.iter().flatten().any(|alias| {
        alias
            .hostnames
            .iter()
            .flatten()
            .any(|h| broker_hosts.contains(&h.to_ascii_lowercase()))
    });
    let own_dns = spec.dns_policy.as_deref() == Some("None")
        || spec
            .dns_config
            .as_ref()
            .and_then(|d| d.nameservers.as_ref())
            .is_some_and(|n| !n.is_empty());
    !aliased && !own_dns
}

/// `registry/name` of an image reference, without its tag or digest.
pub fn image_repository(image: &str) -> &str {
    let without_digest = image.split('@').next().unwrap_or(image);
    // A tag is after the last `:` that comes after the last `/` (a registry port is not a tag).
    match without_digest.rfind(':') {
        Some(colon) if !without_digest[colon..].contains('/') => &without_digest[..colon],
        _ => without_digest,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    fn hosts() -> Vec<String> {
        ["byok.ns.svc", "localhost", "10.0.0.1", "b", "::1"]
            .map(str::to_owned)
            .to_vec()
    }

    #[test]
    fn the_flags_that_only_say_where_it_listens_and_whom_it_asks_are_accepted() {
        for ok in [
            &[
                "proxy",
                "--admin-addr=0.0.0.0:15090",
                "--broker-url=https://byok.ns.svc:9444",
                "--key=a=15100",
            ][..],
            &[
                "proxy",
                "--broker-url=https://localhost:1",
                "--key=a=15100",
                "--key=b=15101",
            ],
            &[
                "proxy",
                "--key=a=15100",
                "--admin-addr=[::]:16090",
                "--broker-url=https://10.0.0.1",
            ],
        ] {
            assert!(args_accepted(&args(ok), Some("proxy"), &hosts()), "{ok:?}");
            // The byok-proxy image: the same flags with no subcommand, and never with one.
            assert!(args_accepted(&args(&ok[1..]), None, &hosts()), "{ok:?}");
            assert!(!args_accepted(&args(ok), None, &hosts()), "{ok:?}");
            assert!(
                !args_accepted(&args(&ok[1..]), Some("proxy"), &hosts()),
                "{ok:?}"
            );
        }
        for bad in [
            &[][..],
            &["verify", "--broker-url=https://b", "--key=a=15100"],
            &["proxy", "--key=a=15100"],
            &["proxy", "--broker-url=http://b", "--key=a=15100"],
            &["proxy", "--broker-url=https://user:pw@b", "--key=a=15100"],
            &[
                "proxy",
                "--broker-url=https://b",
                "--broker-url=https://c",
                "--key=a=15100",
            ],
            &["proxy", "--broker-url=https://b"],
            &[
                "proxy",
                "--broker-url=https://b",
                "--key=a=15100",
                "--broker-ca=x",
            ],
            &[
                "proxy",
                "--broker-url=https://b",
                "--key=a=15100",
                "--token-file=/tmp/t",
            ],
            &[
                "proxy",
                "--broker-url=https://b",
                "--key=a=15100",
                "--namespace=other",
            ],
            &["proxy", "--broker-url", "https://b", "--key=a=15100"],
            &["proxy", "--broker-url=https://b", "--key=a=15100", "--"],
            &["proxy", "--broker-url=https://b", "--key=a=nope"],
            &[
                "proxy",
                "--broker-url=https://b",
                "--key=a=15100",
                "--admin-addr=x",
            ],
            // A host the broker's certificate is not for (its CA may sign for others).
            &[
                "proxy",
                "--broker-url=https://grab.team-a.svc",
                "--key=a=15100",
            ],
            &[
                "proxy",
                "--broker-url=https://attacker.example:443",
                "--key=a=15100",
            ],
            // Expanded by the kubelet after the check.
            &["proxy", "--broker-url=https://$(HOST)", "--key=a=15100"],
            &["proxy", "--broker-url=https://b", "--key=$(K)=15100"],
        ] {
            assert!(
                !args_accepted(&args(bad), Some("proxy"), &hosts()),
                "{bad:?}"
            );
            if let Some(("proxy", flags)) = bad.split_first().map(|(c, f)| (*c, f)) {
                assert!(!args_accepted(&args(flags), None, &hosts()), "{bad:?}");
            }
        }
    }

    #[test]
    fn image_repositories_ignore_tags_and_digests_not_registry_ports() {
        assert_eq!(
            image_repository("ghcr.io/byok/proxy:1.0"),
            "ghcr.io/byok/proxy"
        );
        assert_eq!(
            image_repository("registry:5000/byok/proxy@sha256:abc"),
            "registry:5000/byok/proxy"
        );
        assert_eq!(
            image_repository("registry:5000/byok/proxy"),
            "registry:5000/byok/proxy"
        );
    }
}
