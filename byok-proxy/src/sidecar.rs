//! Facts about the sidecar that both sides hold: the webhook, which writes the container, and
//! the proxy, which runs in it. Its name, ports, token path, who it runs as, and the syntax of
//! the key names it serves. Kubernetes-free, so the sidecar's binary needs no Kubernetes crate.

use std::collections::BTreeMap;

/// The injected init container's name; reserved in opted-in pods.
pub const SIDECAR_NAME: &str = "byok-proxy";

/// Where the sidecar mounts its token volume; the token is `TOKEN_DIR/TOKEN_FILE`.
pub const TOKEN_DIR: &str = "/var/run/secrets/byok.dev/token";
/// The token's file name inside [`TOKEN_DIR`].
pub const TOKEN_FILE: &str = "token";

/// The sidecar's admin server (`/readyz`, `/livez`, `/metrics`). It binds 0.0.0.0 so the
/// kubelet's probes reach it; it serves no key. Outside every mesh's reserved ports (Istio
/// 15000-15099, Linkerd 4140-4191, Consul 15001/19000/20000/20200, Kuma 9901/15001/15006/
/// 15053): releases before used 15090, which is Istio's `http-envoy-prom`.
pub const ADMIN_PORT: u16 = 15120;
/// Key `i` (annotation order) is served on `127.0.0.1:(FIRST_KEY_PORT + i)`.
pub const FIRST_KEY_PORT: u16 = 15100;
/// Ports meshes use whether or not their containers declare them (Istio 1.2x sidecar and
/// ambient, Linkerd 2.1x, Consul 1.2x, Kuma 2.x): the sidecar's ports may be none of these.
pub const MESH_PORTS: [std::ops::RangeInclusive<u16>; 9] = [
    15000..=15099,
    4140..=4140,
    4143..=4143,
    4190..=4191,
    19000..=19000,
    20000..=20000,
    20200..=20200,
    9901..=9901,
    15001..=15001,
];

/// Where the sidecar listens: its admin port and the first of its key ports (key `i` on
/// `first_key + i`). Set for the cluster by the operator's flags (chart: `sidecar.adminPort`,
/// `sidecar.firstKeyPort`) and for one pod by the `byok.dev/sidecar-ports` annotation. The broker
/// does not care which (the pod's args say), so changing them keeps running pods served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SidecarPorts {
    pub admin: u16,
    pub first_key: u16,
}

impl Default for SidecarPorts {
    fn default() -> Self {
        Self {
            admin: ADMIN_PORT,
            first_key: FIRST_KEY_PORT,
        }
    }
}

impl SidecarPorts {
    /// The key ports for `keys` keys.
    pub fn keys(self, keys: usize) -> impl Iterator<Item = u16> {
        // Counted in u32: a range of u16 would overflow past 65535.
        (u32::from(self.first_key)..)
            .take(keys)
            .map_while(|p| u16::try_from(p).ok())
    }

    /// Why these ports cannot be used: privileged, past 65535 with [`MAX_KEYS`] keys, the admin
    /// port among the key ports, or one a mesh uses.
    pub fn check(self) -> Result<(), String> {
        let last_key = u32::from(self.first_key) + MAX_KEYS as u32 - 1;
        if self.admin < 1024 || self.first_key < 1024 {
            return Err("ports below 1024 need privileges the sidecar does not have".into());
        }
        if last_key > 65535 {
            return Err(format!(
                "the key ports run from the first one for {MAX_KEYS} ports: {} is too high",
                self.first_key
            ));
        }
        if (u32::from(self.first_key)..=last_key).contains(&u32::from(self.admin)) {
            return Err(format!(
                "the admin port {} is among the key ports {}-{last_key}",
                self.admin, self.first_key
            ));
        }
        let in_mesh = |p: u16| MESH_PORTS.iter().any(|r| r.contains(&p));
        let ports = std::iter::once(self.admin).chain(self.keys(MAX_KEYS));
        if let Some(p) = ports.into_iter().find(|p| in_mesh(*p)) {
            return Err(format!("port {p} is one a service mesh uses"));
        }
        Ok(())
    }

    /// `admin=PORT,keys=PORT` (either or both; the rest from `self`).
    pub fn with_annotation(self, value: &str) -> Result<Self, String> {
        let mut out = self;
        for item in value.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let (what, port) = item
                .split_once('=')
                .ok_or_else(|| format!("{} is not admin=PORT or keys=PORT", shown(item)))?;
            let port: u16 = port
                .trim()
                .parse()
                .map_err(|_| format!("{} is not a port", shown(port)))?;
            match what.trim() {
                "admin" => out.admin = port,
                "keys" => out.first_key = port,
                other => return Err(format!("{} is not admin or keys", shown(other))),
            }
        }
        out.check()?;
        Ok(out)
    }
}

/// The most ProviderKeys one pod may name.
pub const MAX_KEYS: usize = 16;
/// `runAsUser` and `runAsGroup` of the sidecar. No other container may run as it, or it
/// could read the sidecar's token and memory.
pub const SIDECAR_UID: i64 = 15532;
/// The value of the API-key variables the application gets (the proxy sets the real key).
pub const PLACEHOLDER_KEY: &str = "byok-proxy";

/// Kubernetes' longest ProviderKey name (the CRD allows 63: it is also a label value).
const MAX_KEY_NAME_LEN: usize = 63;

/// Longest piece of outside text (a key name, a condition reason) repeated in a message.
const MAX_SHOWN_CHARS: usize = 64;

/// Parses the `byok.dev/provider-keys` annotation: comma-separated ProviderKey names
/// (whitespace around items trimmed), each a DNS-1123 subdomain of at most 63 characters; at
/// least one, at most [`MAX_KEYS`], no duplicates. The error names the bad item.
pub fn parse_key_names(annotation: &str) -> Result<Vec<String>, String> {
    if annotation.trim().is_empty() {
        return Err("names no ProviderKey; list one or more, comma-separated".to_owned());
    }
    let items: Vec<&str> = annotation.split(',').map(str::trim).collect();
    if items.len() > MAX_KEYS {
        return Err(format!(
            "names {} ProviderKeys; at most {MAX_KEYS} are allowed",
            items.len()
        ));
    }
    let mut names: Vec<String> = Vec::with_capacity(items.len());
    // Two names may differ only in '-' versus '.', and then share one variable.
    let mut variables: BTreeMap<String, &str> = BTreeMap::new();
    for (i, item) in items.iter().enumerate() {
        if item.is_empty() {
            return Err(format!(
                "item {} is empty (two commas in a row, or a comma at either end)",
                i + 1
            ));
        }
        if let Err(why) = check_key_name(item) {
            return Err(format!("{} is not a ProviderKey name: {why}", shown(item)));
        }
        if names.iter().any(|n| n == item) {
            return Err(format!("{} is listed twice", shown(item)));
        }
        let var = base_url_var(item);
        if let Some(other) = variables.insert(var.clone(), item) {
            return Err(format!(
                "{} and {} would share the variable {var}; rename one of the ProviderKeys",
                shown(other),
                shown(item)
            ));
        }
        names.push((*item).to_owned());
    }
    Ok(names)
}

/// Why `name` is not a DNS-1123 subdomain of at most 63 characters.
fn check_key_name(name: &str) -> Result<(), String> {
    if name.len() > MAX_KEY_NAME_LEN {
        return Err(format!(
            "it is {} characters long; at most {MAX_KEY_NAME_LEN} are allowed",
            name.chars().count()
        ));
    }
    let label_ok = |label: &str| {
        let bytes = label.as_bytes();
        let alnum = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
        bytes.first().is_some_and(alnum)
            && bytes.last().is_some_and(alnum)
            && bytes.iter().all(|b| alnum(b) || *b == b'-')
    };
    if name.split('.').all(label_ok) {
        Ok(())
    } else {
        Err("use lowercase letters, digits, '-' and '.', each part starting and ending with a letter or digit".to_owned())
    }
}

/// `BYOK_<NAME>_BASE_URL`: the name upper-cased, `-` and `.` turned into `_`.
pub fn base_url_var(key_name: &str) -> String {
    let middle: String = key_name
        .chars()
        .map(|c| match c {
            '-' | '.' => '_',
            c => c.to_ascii_uppercase(),
        })
        .collect();
    format!("BYOK_{middle}_BASE_URL")
}

/// Outside text, quoted with control characters escaped and cut to a readable length.
pub fn shown(text: &str) -> String {
    let mut cut: String = text.chars().take(MAX_SHOWN_CHARS).collect();
    if cut.len() < text.len() {
        cut.push('…');
    }
    format!("{cut:?}")
}
