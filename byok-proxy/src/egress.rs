//! The base URL policy (SSRF) and the one HTTP client every outbound provider call uses.
//!
//! Two layers:
//! - [`check_shape`] and [`check_host`] judge a URL before any request: `https`, no userinfo,
//!   query or fragment; port 443, not `localhost`, not a raw IP literal. Raw-IP hosts never
//!   reach a DNS resolver, so `check_host` must run before every request (the
//!   [`Verifier`](crate::providers::Verifier) does it).
//! - [`http_client`] builds a client whose DNS resolver drops every address
//!   [`forbidden_ip`] names (loopback, private, link-local, metadata, …) and fails with
//!   [`AddressRejected`] when nothing is left. reqwest dials exactly the addresses the resolver
//!   returns, so this is the connect-time check against the address actually dialled, safe
//!   against DNS rebinding. Redirects are never followed and proxies are never used (a proxy
//!   would resolve the name itself, out of our sight).
//!
//! `allow_private` (the `--insecure-allow-private-base-urls` flag) lifts `check_host` and the
//! resolver filter, never `check_shape`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use url::{Host, Url};

/// Connect timeout for provider calls; the total timeout is [`EgressConfig::timeout`].
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Judges the shape of a base URL: `https`, a host, no userinfo, no query, no fragment.
/// Never lifted, not even by `allow_private`. Messages never echo the URL (userinfo could
/// hold a secret).
pub fn check_shape(url: &Url) -> Result<(), String> {
    if url.scheme() != "https" {
        return Err(format!("the scheme must be https, not {:?}", url.scheme()));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("the URL must not carry userinfo (user:password@)".into());
    }
    if url.query().is_some() {
        return Err("the URL must not have a query (?...)".into());
    }
    if url.fragment().is_some() {
        return Err("the URL must not have a fragment (#...)".into());
    }
    match url.host() {
        None => Err("the URL has no host".into()),
        Some(Host::Domain("")) => Err("the URL has an empty host".into()),
        Some(_) => Ok(()),
    }
}

/// Judges the host and port of a base URL: port 443, not `localhost` or `*.localhost`, not a
/// raw IP literal (v4 or v6, in any notation the URL parser accepts). Lifted by
/// `allow_private`.
pub fn check_host(url: &Url) -> Result<(), String> {
    match url.port_or_known_default() {
        Some(443) => {}
        Some(p) => return Err(format!("the port must be 443, not {p}")),
        None => return Err("the URL has no port and no default port".into()),
    }
    match url.host() {
        None => Err("the URL has no host".into()),
        Some(Host::Ipv4(_)) | Some(Host::Ipv6(_)) => {
            Err("the host must be a DNS name, not an IP address".into())
        }
        Some(Host::Domain(d)) => {
            let d = d.trim_end_matches('.').to_ascii_lowercase();
            if d.is_empty() {
                Err("the URL has an empty host".into())
            } else if d == "localhost" || d.ends_with(".localhost") {
                Err("the host must not be localhost".into())
            } else {
                Ok(())
            }
        }
    }
}

/// Names the class of an address the egress policy refuses, or `None` for a public address.
/// The class names the rule, never the address, so a message built from it cannot serve as
/// an oracle for what an internal name resolves to.
///
/// IPv6 forms that carry an IPv4 address are judged as that address: IPv4-mapped
/// (`::ffff:a.b.c.d`), IPv4-translated (`::ffff:0:a.b.c.d`), IPv4-compatible (`::a.b.c.d`),
/// NAT64 (`64:ff9b::/96` and the local-use `64:ff9b:1::/48`, the IPv4 address in the last 32
/// bits) and 6to4 (`2002:aabb:ccdd::/48`). Public IPv4 addresses thus stay reachable on an
/// IPv6-only cluster with DNS64. Teredo (`2001::/32`) is refused outright: its embedded
/// addresses are a relay server's and an obfuscated client's, not the destination's.
pub fn forbidden_ip(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => forbidden_v4(v4),
        IpAddr::V6(v6) => forbidden_v6(v6),
    }
}

/// Cloud instance metadata endpoints. Checked before the ranges that contain some of them
/// (link-local, CGNAT, 192.0.0.0/24) so that the class says what the address is.
const METADATA_V4: [Ipv4Addr; 5] = [
    // AWS, GCP, Azure IMDS, OpenStack, DigitalOcean, ...
    Ipv4Addr::new(169, 254, 169, 254),
    // AWS ECS task metadata.
    Ipv4Addr::new(169, 254, 170, 2),
    // Azure wireserver.
    Ipv4Addr::new(168, 63, 129, 16),
    // Alibaba Cloud.
    Ipv4Addr::new(100, 100, 100, 200),
    // Oracle Cloud.
    Ipv4Addr::new(192, 0, 0, 192),
];

const METADATA_V6: [Ipv6Addr; 2] = [
    // AWS IMDS over IPv6.
    Ipv6Addr::new(0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x0254),
    // GCP metadata server on IPv6-only instances.
    Ipv6Addr::new(0xfd20, 0x00ce, 0, 0, 0, 0, 0, 0x0254),
];

fn forbidden_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let o = ip.octets();
    if METADATA_V4.contains(&ip) {
        return Some("metadata");
    }
    if ip.is_unspecified() {
        return Some("unspecified");
    }
    if o[0] == 0 {
        return Some("this-network (0.0.0.0/8)");
    }
    if ip.is_loopback() {
        return Some("loopback");
    }
    if ip.is_private() {
        return Some("private");
    }
    if ip.is_link_local() {
        return Some("link-local");
    }
    if o[0] == 100 && (o[1] & 0xc0) == 64 {
        return Some("CGNAT (100.64.0.0/10)");
    }
    if ip.is_broadcast() {
        return Some("broadcast");
    }
    if ip.is_multicast() {
        return Some("multicast");
    }
    if ip.is_documentation() {
        return Some("documentation");
    }
    if o[0] == 192 && o[1] == 0 && o[2] == 0 {
        return Some("reserved (192.0.0.0/24)");
    }
    if o[0] == 198 && (o[1] & 0xfe) == 18 {
        return Some("benchmarking (198.18.0.0/15)");
    }
    if o[0] >= 240 {
        return Some("reserved (240.0.0.0/4)");
    }
    None
}

fn forbidden_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let s = ip.segments();
    if METADATA_V6.contains(&ip) {
        return Some("metadata");
    }
    // Before the IPv4-compatible rule, which would judge :: and ::1 as 0.0.0.0 and 0.0.0.1.
    if ip.is_unspecified() {
        return Some("unspecified");
    }
    if ip.is_loopback() {
        return Some("loopback");
    }
    let last_32 = Ipv4Addr::from_bits(ip.to_bits() as u32);
    // IPv4-mapped ::ffff:a.b.c.d
    if let Some(v4) = ip.to_ipv4_mapped() {
        return forbidden_v4(v4);
    }
    // IPv4-translated ::ffff:0:a.b.c.d (SIIT)
    if s[..4].iter().all(|&x| x == 0) && s[4] == 0xffff && s[5] == 0 {
        return forbidden_v4(last_32);
    }
    // IPv4-compatible ::a.b.c.d (deprecated, but some stacks still route it)
    if s[..6].iter().all(|&x| x == 0) {
        return forbidden_v4(last_32);
    }
    // NAT64 well-known prefix 64:ff9b::/96
    if s[0] == 0x64 && s[1] == 0xff9b && s[2..6].iter().all(|&x| x == 0) {
        return forbidden_v4(last_32);
    }
    // NAT64 local-use prefix 64:ff9b:1::/48 (RFC 8215): the local translator dials the
    // embedded IPv4 address, so that address decides.
    if s[0] == 0x64 && s[1] == 0xff9b && s[2] == 1 {
        return forbidden_v4(last_32);
    }
    // 6to4 2002:aabb:ccdd::/48 embeds a.b.c.d
    if s[0] == 0x2002 {
        return forbidden_v4(Ipv4Addr::from_bits(
            (u32::from(s[1]) << 16) | u32::from(s[2]),
        ));
    }
    if s[0] == 0x2001 && s[1] == 0 {
        return Some("Teredo (2001::/32)");
    }
    if (s[0] & 0xfe00) == 0xfc00 {
        return Some("unique-local");
    }
    if (s[0] & 0xffc0) == 0xfe80 {
        return Some("link-local");
    }
    if (s[0] & 0xffc0) == 0xfec0 {
        return Some("site-local");
    }
    if (s[0] & 0xff00) == 0xff00 {
        return Some("multicast");
    }
    if s[0] == 0x2001 && s[1] == 0x0db8 {
        return Some("documentation");
    }
    if s[0] == 0x0100 && s[1..4].iter().all(|&x| x == 0) {
        return Some("discard-only (100::/64)");
    }
    None
}

/// The resolver found only addresses the egress policy refuses; no connection was attempted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("every address of {host} is refused by the egress policy ({class})")]
pub struct AddressRejected {
    /// The name that was resolved.
    pub host: String,
    /// The class of the first refused address, as named by [`forbidden_ip`].
    pub class: &'static str,
}

/// The resolver returned no address at all.
#[derive(Debug, thiserror::Error)]
#[error("{0} resolved to no address")]
struct NoAddress(String);

/// How to build the HTTP client for provider calls.
#[derive(Clone)]
pub struct EgressConfig {
    /// `--insecure-allow-private-base-urls`: skip the host checks and the resolver filter.
    pub allow_private: bool,
    /// `--extra-ca-file`: PEM with one or more CA certificates trusted in addition to the
    /// normal roots.
    pub extra_ca_pem: Option<Vec<u8>>,
    /// The DNS resolver to wrap; `None` is the system resolver. Tests inject one.
    pub resolver: Option<Arc<dyn Resolve>>,
    /// `--egress-proxy`: reach providers through this HTTP proxy (CONNECT).
    pub proxy: Option<EgressProxy>,
    /// Total timeout of one request (connect, TLS, headers and body).
    pub timeout: Duration,
}

impl Default for EgressConfig {
    fn default() -> Self {
        EgressConfig {
            allow_private: false,
            extra_ca_pem: None,
            resolver: None,
            proxy: None,
            timeout: Duration::from_secs(10),
        }
    }
}

impl std::fmt::Debug for EgressConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EgressConfig")
            .field("allow_private", &self.allow_private)
            .field("extra_ca_pem", &self.extra_ca_pem.as_ref().map(|p| p.len()))
            .field("resolver", &self.resolver.as_ref().map(|_| "custom"))
            .field("proxy", &self.proxy)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// Builds the one HTTP client for provider calls: redirects off, https only, no proxy but
/// `--egress-proxy`,
/// connect timeout 5s, total timeout `cfg.timeout`, the extra CA trusted in addition to the
/// normal roots, and (unless `allow_private`) a resolver that drops forbidden addresses.
pub fn http_client(cfg: &EgressConfig) -> anyhow::Result<reqwest::Client> {
    let mut builder = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .https_only(true)
        .referer(false)
        .connect_timeout(CONNECT_TIMEOUT.min(cfg.timeout))
        .timeout(cfg.timeout)
        .user_agent(concat!("byok-operator/", env!("CARGO_PKG_VERSION")));
    if let Some(pem) = &cfg.extra_ca_pem {
        let certs = reqwest::Certificate::from_pem_bundle(pem)
            .map_err(|e| anyhow::anyhow!("the extra CA file is not valid PEM: {e}"))?;
        if certs.is_empty() {
            anyhow::bail!("the extra CA file holds no certificate");
        }
        builder = builder.tls_certs_merge(certs);
    }
    builder = match &cfg.proxy {
        // The proxy resolves the provider's name itself: the address filter runs before
        // the request instead ([`check_target`]), and the resolver here only finds the
        // proxy, which may well have a private address.
        Some(proxy) => {
            let mut p = reqwest::Proxy::all(proxy.url.as_str())?;
            if let Some((user, pass)) = proxy.credentials() {
                p = p.basic_auth(&user, &pass);
            }
            builder.proxy(p)
        }
        None => builder.no_proxy(),
    };
    if cfg.allow_private || cfg.proxy.is_some() {
        if cfg.allow_private {
            tracing::warn!(
                "INSECURE: private, loopback and metadata base URLs are allowed for provider calls \
                 (--insecure-allow-private-base-urls); never use this in production"
            );
        }
        if let Some(resolver) = &cfg.resolver {
            builder = builder.dns_resolver(resolver.clone());
        }
    } else {
        builder = builder.dns_resolver(Arc::new(FilteringResolver {
            inner: cfg.resolver.clone(),
        }));
    }
    Ok(builder.build()?)
}

/// An admin-set HTTP proxy that provider calls go through (`CONNECT host:443`): the operator's
/// verification calls and, passed down by the broker, every sidecar's.
#[derive(Clone)]
pub struct EgressProxy {
    /// `http://host:port`, without credentials.
    pub url: Url,
    /// `user:password` from the URL, for `Proxy-Authorization: Basic`.
    userinfo: Option<secrecy::SecretString>,
}

impl std::fmt::Debug for EgressProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EgressProxy")
            .field("url", &self.url.as_str())
            .field("credentials", &self.userinfo.as_ref().map(|_| "redacted"))
            .finish()
    }
}

impl EgressProxy {
    /// Parses `http://[user:password@]host:port`. Messages never echo the URL.
    pub fn parse(text: &str) -> Result<EgressProxy, String> {
        let mut url = Url::parse(text).map_err(|e| format!("--egress-proxy is not a URL: {e}"))?;
        if url.scheme() != "http" {
            return Err(format!(
                "--egress-proxy must be http://host:port (the tunnel to the provider is TLS end to end), not {:?}",
                url.scheme()
            ));
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err("--egress-proxy has no host".into());
        }
        if url.path() != "/" || url.query().is_some() || url.fragment().is_some() {
            return Err("--egress-proxy must have no path, query or fragment".into());
        }
        let userinfo = (!url.username().is_empty()).then(|| {
            let user = percent_decode(url.username());
            let pass = percent_decode(url.password().unwrap_or_default());
            secrecy::SecretString::from(format!("{user}:{pass}"))
        });
        let _ = url.set_username("");
        let _ = url.set_password(None);
        Ok(EgressProxy { url, userinfo })
    }

    /// `(user, password)`, if the URL had them.
    pub fn credentials(&self) -> Option<(String, String)> {
        use secrecy::ExposeSecret;
        let text = self.userinfo.as_ref()?.expose_secret();
        let (u, p) = text.split_once(':')?;
        Some((u.to_owned(), p.to_owned()))
    }

    /// The proxy's host (brackets removed from an IPv6 address) and port.
    pub fn host_port(&self) -> (String, u16) {
        let host = self.url.host_str().unwrap_or_default();
        let host = host.trim_start_matches('[').trim_end_matches(']');
        (
            host.to_owned(),
            self.url.port_or_known_default().unwrap_or(80),
        )
    }

    /// `host:port` of the proxy.
    pub fn authority(&self) -> String {
        let (host, port) = self.host_port();
        authority(&host, port)
    }

    /// The URL as the broker passes it to sidecars (credentials included).
    pub fn to_url_with_credentials(&self) -> String {
        let mut url = self.url.clone();
        if let Some((user, pass)) = self.credentials() {
            let _ = url.set_username(&user);
            let _ = url.set_password(Some(&pass));
        }
        url.to_string()
    }
}

/// `host:port`, an IPv6 address in brackets (as in a URL or a CONNECT request).
pub fn authority(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// The address a URL host names literally (`[::1]` included), if it is one.
pub fn ip_literal(host: &str) -> Option<IpAddr> {
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .ok()
}

fn percent_decode(s: &str) -> String {
    url::form_urlencoded::parse(format!("x={s}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

/// Before a request through an egress proxy: the addresses the provider's name resolves to
/// here must pass the policy (the proxy resolves it again: its own policy must block
/// internal destinations too). A name this resolver cannot resolve is left to the proxy;
/// clusters that reach providers only through a proxy often cannot.
pub async fn check_target(
    host: &str,
    resolver: Option<&Arc<dyn Resolve>>,
) -> Result<(), AddressRejected> {
    if let Some(ip) = ip_literal(host) {
        return match forbidden_ip(ip) {
            Some(class) => Err(AddressRejected {
                host: host.to_owned(),
                class,
            }),
            None => Ok(()),
        };
    }
    let addrs: Vec<SocketAddr> = match resolver {
        Some(r) => match r
            .resolve(
                <Name as std::str::FromStr>::from_str(host).map_err(|_| AddressRejected {
                    host: host.to_owned(),
                    class: "invalid name",
                })?,
            )
            .await
        {
            Ok(addrs) => addrs.collect(),
            Err(_) => return Ok(()),
        },
        None => match tokio::net::lookup_host((host, 443)).await {
            Ok(addrs) => addrs.collect(),
            Err(_) => return Ok(()),
        },
    };
    match filter_addrs(host, addrs) {
        Ok(_) => Ok(()),
        Err(e) => match e.downcast::<AddressRejected>() {
            Ok(rejected) => Err(*rejected),
            // No address at all: left to the proxy.
            Err(_) => Ok(()),
        },
    }
}

/// Wraps a resolver and drops every address [`forbidden_ip`] names.
struct FilteringResolver {
    inner: Option<Arc<dyn Resolve>>,
}

impl Resolve for FilteringResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let host = name.as_str().to_owned();
        let inner = self.inner.clone();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> = match inner {
                Some(resolver) => resolver.resolve(name).await?.collect(),
                None => tokio::net::lookup_host((host.as_str(), 0)).await?.collect(),
            };
            filter_addrs(&host, addrs).map(|kept| Box::new(kept.into_iter()) as Addrs)
        })
    }
}

/// Drops every address [`forbidden_ip`] names; fails with [`AddressRejected`] when none is left.
pub fn filter_addrs(
    host: &str,
    addrs: Vec<SocketAddr>,
) -> Result<Vec<SocketAddr>, Box<dyn std::error::Error + Send + Sync>> {
    let mut first_class = None;
    let kept: Vec<SocketAddr> = addrs
        .into_iter()
        .filter(|a| match forbidden_ip(a.ip()) {
            Some(class) => {
                // The class only, like every message here: the address itself would tell
                // whoever reads the logs what an internal name resolves to.
                tracing::debug!(host, class, "egress policy dropped an address");
                first_class.get_or_insert(class);
                false
            }
            None => true,
        })
        .collect();
    match (kept.is_empty(), first_class) {
        (false, _) => Ok(kept),
        (true, Some(class)) => Err(Box::new(AddressRejected {
            host: host.to_owned(),
            class,
        })),
        (true, None) => Err(Box::new(NoAddress(host.to_owned()))),
    }
}

/// Finds the [`AddressRejected`] behind a request error, if the egress policy caused it.
pub fn rejected_address(err: &reqwest::Error) -> Option<&AddressRejected> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = source {
        if let Some(rejected) = e.downcast_ref::<AddressRejected>() {
            return Some(rejected);
        }
        source = e.source();
    }
    None
}

/// True when the egress policy refused every address of the host (map it to
/// `Reason::BaseURLRejected`).
pub fn is_rejected_address(err: &reqwest::Error) -> bool {
    rejected_address(err).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    fn v(s: &str) -> Option<&'static str> {
        forbidden_ip(IpAddr::from_str(s).expect("test address"))
    }

    #[test]
    fn forbidden_ip_table() {
        let cases: &[(&str, Option<&str>)] = &[
            ("127.0.0.1", Some("loopback")),
            ("127.255.0.9", Some("loopback")),
            ("10.0.0.1", Some("private")),
            ("172.16.5.4", Some("private")),
            ("172.31.255.255", Some("private")),
            ("192.168.1.1", Some("private")),
            ("169.254.169.254", Some("metadata")),
            ("169.254.170.2", Some("metadata")),
            ("169.254.1.1", Some("link-local")),
            ("100.64.0.1", Some("CGNAT (100.64.0.0/10)")),
            ("100.127.255.254", Some("CGNAT (100.64.0.0/10)")),
            ("0.0.0.0", Some("unspecified")),
            ("0.1.2.3", Some("this-network (0.0.0.0/8)")),
            ("255.255.255.255", Some("broadcast")),
            ("224.0.0.1", Some("multicast")),
            ("192.0.2.1", Some("documentation")),
            ("198.51.100.7", Some("documentation")),
            ("203.0.113.9", Some("documentation")),
            ("198.18.0.1", Some("benchmarking (198.18.0.0/15)")),
            ("240.0.0.1", Some("reserved (240.0.0.0/4)")),
            ("::1", Some("loopback")),
            ("::", Some("unspecified")),
            ("fc00::1", Some("unique-local")),
            ("fd12:3456::1", Some("unique-local")),
            ("fd00:ec2::254", Some("metadata")),
            ("fe80::1", Some("link-local")),
            ("ff02::1", Some("multicast")),
            ("2001:db8::1", Some("documentation")),
            ("::ffff:10.0.0.1", Some("private")),
            ("::ffff:127.0.0.1", Some("loopback")),
            ("::ffff:169.254.169.254", Some("metadata")),
            ("::10.0.0.1", Some("private")),
            ("64:ff9b::a9fe:a9fe", Some("metadata")),
            ("64:ff9b::10.1.2.3", Some("private")),
            ("64:ff9b:1::a00:1", Some("private")),
            ("64:ff9b:1::a9fe:a9fe", Some("metadata")),
            ("2002:a00:1::1", Some("private")),
            ("::ffff:0:10.0.0.1", Some("private")),
            ("168.63.129.16", Some("metadata")),
            ("100.100.100.200", Some("metadata")),
            ("192.0.0.192", Some("metadata")),
            ("192.0.0.8", Some("reserved (192.0.0.0/24)")),
            ("fd20:ce::254", Some("metadata")),
            ("2001::1", Some("Teredo (2001::/32)")),
            (
                "2001:0:4136:e378:8000:63bf:3fff:fdd2",
                Some("Teredo (2001::/32)"),
            ),
            (
                "2001:0:ffff:ffff:ffff:ffff:ffff:ffff",
                Some("Teredo (2001::/32)"),
            ),
            // public addresses pass
            ("8.8.8.8", None),
            ("1.1.1.1", None),
            ("100.128.0.1", None),
            ("172.32.0.1", None),
            ("2606:4700:4700::1111", None),
            ("::ffff:8.8.8.8", None),
            ("64:ff9b::808:808", None),
            ("64:ff9b:1::808:808", None),
            ("2002:808:808::1", None),
            ("168.63.129.17", None),
            ("2001:1::1", None),
            ("2001:4860:4860::8888", None),
        ];
        for (ip, want) in cases {
            assert_eq!(v(ip), *want, "{ip}");
        }
    }

    /// Refused IPv4 addresses: one or more per rule, range edges included.
    const REFUSED_V4: &[&str] = &[
        "0.0.0.0",
        "0.1.2.3",
        "0.255.255.255",
        "127.0.0.1",
        "127.255.255.255",
        "10.0.0.0",
        "10.255.255.255",
        "172.16.0.1",
        "172.31.255.255",
        "192.168.0.1",
        "192.168.255.255",
        "169.254.0.1",
        "169.254.255.255",
        "169.254.169.254",
        "169.254.170.2",
        "168.63.129.16",
        "100.100.100.200",
        "192.0.0.192",
        "100.64.0.0",
        "100.127.255.255",
        "255.255.255.255",
        "224.0.0.1",
        "239.255.255.255",
        "192.0.2.1",
        "198.51.100.1",
        "203.0.113.255",
        "192.0.0.0",
        "192.0.0.255",
        "198.18.0.0",
        "198.19.255.255",
        "240.0.0.1",
        "254.255.255.254",
    ];

    /// Public IPv4 addresses, many just outside a refused range.
    const PUBLIC_V4: &[&str] = &[
        "1.1.1.1",
        "8.8.8.8",
        "93.184.216.34",
        "9.255.255.255",
        "11.0.0.0",
        "100.63.255.255",
        "100.128.0.0",
        "126.255.255.255",
        "128.0.0.0",
        "168.63.129.17",
        "169.253.255.255",
        "169.255.0.0",
        "172.15.255.255",
        "172.32.0.0",
        "192.0.1.255",
        "192.0.3.0",
        "192.167.255.255",
        "192.169.0.0",
        "198.17.255.255",
        "198.20.0.0",
        "223.255.255.255",
    ];

    /// Every IPv6 form that carries `v4`, named.
    fn embedded_forms(v4: Ipv4Addr) -> [(&'static str, Ipv6Addr); 6] {
        let bits = u128::from(v4.to_bits());
        [
            ("mapped", v4.to_ipv6_mapped()),
            ("translated", Ipv6Addr::from_bits((0xffff << 48) | bits)),
            ("compatible", Ipv6Addr::from_bits(bits)),
            ("NAT64", Ipv6Addr::from_bits((0x0064_ff9b << 96) | bits)),
            (
                "local NAT64",
                Ipv6Addr::from_bits((0x0064_ff9b_0001 << 80) | bits),
            ),
            (
                "6to4",
                Ipv6Addr::from_bits((0x2002 << 112) | (bits << 80) | 1),
            ),
        ]
    }

    #[test]
    fn embedded_ipv4_is_judged_as_itself() {
        for sample in REFUSED_V4 {
            let v4 = Ipv4Addr::from_str(sample).expect("test address");
            let class = forbidden_v4(v4);
            assert!(class.is_some(), "{sample} must be refused");
            for (form, v6) in embedded_forms(v4) {
                assert_eq!(forbidden_v6(v6), class, "{form} {v6} of {sample}");
            }
        }
        for sample in PUBLIC_V4 {
            let v4 = Ipv4Addr::from_str(sample).expect("test address");
            assert_eq!(forbidden_v4(v4), None, "{sample} must pass");
            for (form, v6) in embedded_forms(v4) {
                assert_eq!(forbidden_v6(v6), None, "{form} {v6} of {sample}");
            }
        }
    }

    #[test]
    fn rejection_names_the_rule_not_the_address() {
        let a = |s: &str| SocketAddr::from_str(s).expect("addr");
        for (addr, class) in [
            ("10.1.2.3:0", "private"),
            ("169.254.169.254:0", "metadata"),
            ("100.100.100.200:0", "metadata"),
            ("[::ffff:10.9.8.7]:0", "private"),
            ("[64:ff9b::a09:807]:0", "private"),
            (
                "[2001:0:4136:e378:8000:63bf:3fff:fdd2]:0",
                "Teredo (2001::/32)",
            ),
        ] {
            let err = filter_addrs("internal.example", vec![a(addr)]).expect_err(addr);
            let msg = err.to_string();
            let ip = a(addr).ip().to_string();
            assert!(
                msg.contains("internal.example") && msg.contains(class),
                "{msg}"
            );
            assert!(!msg.contains(&ip), "{msg} reveals {ip}");
            assert!(!format!("{err:?}").contains(&ip), "{err:?} reveals {ip}");
        }
    }

    fn url(s: &str) -> Url {
        Url::parse(s).expect("test URL")
    }

    #[test]
    fn shape_checks() {
        assert!(check_shape(&url("https://api.anthropic.com")).is_ok());
        assert!(check_shape(&url("https://llm.example.com:8443/v1")).is_ok());
        for bad in [
            "http://api.openai.com/v1",
            "ftp://example.com",
            "https://user:pass@example.com",
            "https://user@example.com",
            "https://example.com/v1?x=1",
            "https://example.com/v1?",
            "https://example.com/#frag",
            "unix:/var/run/x.sock",
            "data:text/plain,hi",
        ] {
            assert!(check_shape(&url(bad)).is_err(), "{bad}");
        }
        let msg = check_shape(&url("https://alice:s3cret@example.com")).unwrap_err();
        assert!(!msg.contains("s3cret") && !msg.contains("alice"), "{msg}");
    }

    #[test]
    fn host_checks() {
        assert!(check_host(&url("https://api.anthropic.com")).is_ok());
        assert!(check_host(&url("https://api.anthropic.com:443/v1")).is_ok());
        assert!(check_host(&url("https://myres.openai.azure.com.")).is_ok());
        for bad in [
            "https://example.com:8443",
            "https://example.com:80",
            "https://localhost",
            "https://LOCALHOST.",
            "https://foo.localhost",
            "https://127.0.0.1",
            "https://10.0.0.1",
            "https://169.254.169.254",
            "https://8.8.8.8",
            "https://[::1]",
            "https://[::ffff:10.0.0.1]",
            "https://[fd00:ec2::254]",
            "https://2130706433",
            "https://0x7f.1",
            "https://017700000001",
        ] {
            assert!(check_host(&url(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn filter_drops_forbidden_and_keeps_public() {
        let a = |s: &str| SocketAddr::from_str(s).expect("addr");
        let kept = filter_addrs(
            "mixed.test",
            vec![a("10.0.0.1:0"), a("93.184.216.34:0"), a("[::1]:0")],
        )
        .expect("one public address remains");
        assert_eq!(kept, vec![a("93.184.216.34:0")]);

        for forbidden in [
            "10.0.0.1:0",
            "169.254.169.254:0",
            "127.0.0.1:0",
            "[::ffff:10.0.0.1]:0",
        ] {
            let err = filter_addrs("evil.test", vec![a(forbidden)]).expect_err(forbidden);
            let rejected = err
                .downcast_ref::<AddressRejected>()
                .expect("typed AddressRejected");
            assert_eq!(rejected.host, "evil.test");
        }
        let err = filter_addrs("empty.test", vec![]).expect_err("no address");
        assert!(err.downcast_ref::<AddressRejected>().is_none());
    }

    /// A resolver that maps every name to fixed addresses and counts its calls.
    struct FixedResolver {
        addrs: Vec<SocketAddr>,
        calls: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl Resolve for FixedResolver {
        fn resolve(&self, _name: Name) -> Resolving {
            self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let addrs = self.addrs.clone();
            Box::pin(async move { Ok(Box::new(addrs.into_iter()) as Addrs) })
        }
    }

    fn client_with(
        addrs: Vec<SocketAddr>,
    ) -> (reqwest::Client, Arc<std::sync::atomic::AtomicUsize>) {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let cfg = EgressConfig {
            resolver: Some(Arc::new(FixedResolver {
                addrs,
                calls: calls.clone(),
            })),
            timeout: Duration::from_secs(3),
            ..EgressConfig::default()
        };
        (http_client(&cfg).expect("client"), calls)
    }

    /// Loopback only: even if the filter were broken, the dial would go to 127.0.0.1.
    #[tokio::test]
    async fn resolver_filter_rejects_loopback_live() {
        let (client, calls) = client_with(vec!["127.0.0.1:0".parse().expect("addr")]);
        let err = client
            .get("https://loopback.test/v1/models")
            .send()
            .await
            .expect_err("must be refused");
        assert!(is_rejected_address(&err), "{err:?}");
        assert_eq!(rejected_address(&err).map(|r| r.class), Some("loopback"));
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn plain_http_is_refused_before_any_dial() {
        let (client, calls) = client_with(vec!["127.0.0.1:0".parse().expect("addr")]);
        let err = client
            .get("http://plain.test/")
            .send()
            .await
            .expect_err("http is refused");
        assert!(!is_rejected_address(&err));
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 0);
    }

    #[test]
    fn extra_ca_must_be_pem() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let cfg = EgressConfig {
            extra_ca_pem: Some(b"not a pem".to_vec()),
            ..EgressConfig::default()
        };
        assert!(http_client(&cfg).is_err());
    }

    /// Panics unless the test runs in a network namespace whose only interface is `lo`
    /// (and `BYOK_NETNS_ONLY=1`): if the filter were broken the test would dial private and
    /// metadata addresses, and they must be unreachable. Reads `/proc/self/net/*`, which
    /// follows the current network namespace (`/sys/class/net` does not without a sysfs
    /// remount).
    fn assert_loopback_only_netns() {
        assert_eq!(
            std::env::var("BYOK_NETNS_ONLY").as_deref(),
            Ok("1"),
            "run under `unshare --net` with BYOK_NETNS_ONLY=1 (make test does)"
        );
        let dev = std::fs::read_to_string("/proc/self/net/dev").expect("/proc/self/net/dev");
        let ifaces: Vec<&str> = dev
            .lines()
            .skip(2)
            .filter_map(|l| l.split(':').next())
            .map(str::trim)
            .collect();
        assert_eq!(
            ifaces,
            vec!["lo"],
            "this test must run in a loopback-only network namespace"
        );
        let routes = std::fs::read_to_string("/proc/self/net/route").unwrap_or_default();
        assert!(
            routes
                .lines()
                .skip(1)
                .all(|l| l.trim().is_empty() || l.starts_with("lo")),
            "no IPv4 route may leave loopback"
        );
        let routes6 = std::fs::read_to_string("/proc/self/net/ipv6_route").unwrap_or_default();
        assert!(
            routes6
                .lines()
                .all(|l| l.split_whitespace().last().is_none_or(|i| i == "lo")),
            "no IPv6 route may leave loopback"
        );
    }

    #[tokio::test]
    #[ignore = "runs in a loopback-only netns via make test"]
    async fn netns_resolver_filter_rejects_private_and_metadata() {
        assert_loopback_only_netns();
        for (addr, class) in [
            ("10.0.0.1:0", "private"),
            ("169.254.169.254:0", "metadata"),
            ("127.0.0.1:0", "loopback"),
            ("[fd00:ec2::254]:0", "metadata"),
            ("[::ffff:10.0.0.1]:0", "private"),
            ("100.64.0.1:0", "CGNAT (100.64.0.0/10)"),
        ] {
            let (client, calls) = client_with(vec![addr.parse().expect("addr")]);
            let err = client
                .get("https://forbidden.test/v1/models")
                .send()
                .await
                .expect_err(addr);
            assert!(is_rejected_address(&err), "{addr}: {err:?}");
            assert_eq!(rejected_address(&err).map(|r| r.class), Some(class));
            assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
        }
    }

    #[test]
    fn egress_proxy_urls() {
        let p = EgressProxy::parse("http://ops:p%40ss@proxy.corp:3128").expect("parsed");
        assert_eq!(p.authority(), "proxy.corp:3128");
        assert_eq!(p.credentials(), Some(("ops".into(), "p@ss".into())));
        assert!(!format!("{p:?}").contains("p@ss"));
        assert!(!p.url.as_str().contains("ops"));
        assert!(
            EgressProxy::parse("http://proxy.corp:3128")
                .expect("parsed")
                .credentials()
                .is_none()
        );
        for bad in [
            "https://proxy:3128",
            "socks5://proxy:1080",
            "http://proxy:3128/path",
            "proxy:3128",
            "http://:3128",
        ] {
            let err = EgressProxy::parse(bad).expect_err(bad);
            assert!(!err.contains("p@ss"));
        }
    }

    #[tokio::test]
    async fn targets_behind_a_proxy_are_checked_before_the_connect() {
        let resolver = |addrs: Vec<SocketAddr>| -> Arc<dyn Resolve> {
            Arc::new(FixedResolver {
                addrs,
                calls: Arc::default(),
            })
        };
        let private = resolver(vec!["10.1.2.3:443".parse().expect("addr")]);
        let rejected = check_target("provider.test", Some(&private))
            .await
            .expect_err("refused");
        assert_eq!(rejected.class, "private");
        let public = resolver(vec!["8.8.8.8:443".parse().expect("addr")]);
        assert!(check_target("provider.test", Some(&public)).await.is_ok());
        // A name only the proxy can resolve is left to it.
        let nothing = resolver(Vec::new());
        assert!(check_target("provider.test", Some(&nothing)).await.is_ok());
        assert!(check_target("169.254.169.254", None).await.is_err());
    }
}
