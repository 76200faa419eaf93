//! The Helm chart and the kustomize install, checked as users meet them: `helm lint`, `helm
//! template` of each documented variant, and every rendered object applied server-side to the
//! real API server (cert-manager's and the Prometheus operator's CRDs installed from their
//! published files, so those objects are validated against the real schemas). The generated
//! copies (`config/`, the chart's `crds/`) must match what `make manifests` writes.
//!
//! The operator running with the chart's args and RBAC is in `chart_operator.rs` (its own
//! control plane: the webhook configurations applied here point at Services with no pods).

use std::collections::BTreeSet;

use anyhow::Context as _;
use byok_e2e::envtest::TestEnv;
use byok_e2e::manifests::{
    chart_dir, helm, kubectl_apply, objects, of_kind, one, render_chart, repo, run, tools_dir,
};
use byok_e2e::operator::install_crds;
use serde_json::Value;

/// The variants the docs describe, as `--set` values.
fn variants() -> Vec<(&'static str, Vec<String>)> {
    vec![
        ("default", vec![]),
        (
            "certmanager",
            vec![
                "certManager.enabled=true".into(),
                "metrics.serviceMonitor.enabled=true".into(),
                "certificates.extraSANs={byok.example.com,10.0.0.7}".into(),
                "webhook.clientCAConfigMap=apiserver-webhook-client-ca".into(),
            ],
        ),
        (
            "certmanager-issuer",
            vec![
                "certManager.enabled=true".into(),
                "certManager.issuerRef.name=corp-ca".into(),
                "certManager.issuerRef.kind=ClusterIssuer".into(),
                "certificates.extraSANs={byok.example.com,10.0.0.7}".into(),
            ],
        ),
        (
            "keyring",
            vec!["keyring.existingSecret=restored-keyring".into()],
        ),
        (
            "netpol",
            vec![
                "networkPolicy.enabled=true".into(),
                "priorityClassName=system-cluster-critical".into(),
                "webhook.refusePortForward=true".into(),
                "webhook.refuseTokenRequests=true".into(),
            ],
        ),
        (
            "moved-broker",
            vec![
                "broker.port=9555".into(),
                "broker.previousPorts={9444}".into(),
                "broker.previousServiceNames={byok-operator}".into(),
            ],
        ),
        (
            "mirrored",
            vec![
                "image.repository=mirror.example/byok/byok-operator".into(),
                "sidecar.image.repository=mirror.example/byok/byok-proxy".into(),
                format!("sidecar.image.digest=sha256:{}", "a".repeat(64)),
            ],
        ),
        (
            "single",
            vec![
                "replicaCount=1".into(),
                "leaderElection.enabled=false".into(),
            ],
        ),
    ]
}

fn args_of(rendered: &[Value]) -> anyhow::Result<Vec<String>> {
    let deployment = one(rendered, "Deployment")?;
    let args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .context("container args")?;
    Ok(args
        .iter()
        .filter_map(|a| a.as_str().map(String::from))
        .collect())
}

fn rules(role: &Value) -> Vec<(String, String, BTreeSet<String>)> {
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut out = Vec::new();
    for rule in role["rules"].as_array().into_iter().flatten() {
        for group in strings(&rule["apiGroups"]) {
            for resource in strings(&rule["resources"]) {
                out.push((
                    group.clone(),
                    resource,
                    strings(&rule["verbs"]).into_iter().collect(),
                ));
            }
        }
    }
    out
}

fn grants(role: &Value, group: &str, resource: &str) -> bool {
    rules(role)
        .iter()
        .any(|(g, r, _)| g == group && r == resource)
}

fn named<'a>(objects: &'a [Value], kind: &str, name: &str) -> anyhow::Result<&'a Value> {
    of_kind(objects, kind)
        .into_iter()
        .find(|o| o["metadata"]["name"] == name)
        .with_context(|| format!("no {kind} {name}"))
}

#[test]
fn the_chart_lints_and_each_variant_renders_what_it_promises() -> anyhow::Result<()> {
    let chart = chart_dir().display().to_string();
    for (name, sets) in variants() {
        let mut args = vec!["lint", &chart, "--strict", "--kube-version", "1.37.2"];
        for set in &sets {
            args.extend(["--set", set]);
        }
        helm(&args).with_context(|| format!("helm lint, variant {name}"))?;

        let rendered = objects(&render_chart("r", "byok-system", &sets)?)?;
        // Never a caBundle: an upgrade or a GitOps sync must not reset what the operator or
        // cainjector set.
        let mwc = one(&rendered, "MutatingWebhookConfiguration")?;
        for webhook in mwc["webhooks"].as_array().context("webhooks")? {
            assert!(
                webhook["clientConfig"].get("caBundle").is_none(),
                "{name}: caBundle rendered"
            );
            assert_eq!(webhook["failurePolicy"], "Fail", "{name}");
            assert_eq!(webhook["sideEffects"], "NoneOnDryRun", "{name}");
            assert!(webhook["timeoutSeconds"].as_i64().is_some_and(|t| t <= 5));
            // Pod webhooks see opted-in pods only; exec only requests into the sidecar.
            // Port-forward (opt-in) sees every one: the ports a request names do not bind
            // its streams.
            match webhook["name"].as_str() {
                Some("portforward.byok.dev") => {
                    assert!(webhook["matchConditions"].is_null(), "{name}: {webhook}");
                }
                Some("inject.byok.dev" | "ephemeral.byok.dev") => assert_eq!(
                    webhook["objectSelector"]["matchLabels"]["byok.dev/inject"],
                    "true"
                ),
                Some("update.byok.dev" | "exec.byok.dev" | "token.byok.dev") => assert!(
                    webhook["matchConditions"]
                        .as_array()
                        .is_some_and(|c| !c.is_empty()),
                    "{name}: {webhook}"
                ),
                other => panic!("{name}: unexpected webhook {other:?}"),
            }
            let excluded = &webhook["namespaceSelector"]["matchExpressions"][0]["values"];
            assert!(
                excluded.as_array().is_some_and(
                    |v| v.contains(&"kube-system".into()) && v.contains(&"byok-system".into())
                ),
                "{name}: the webhook must skip kube-system and its own namespace: {excluded}"
            );
        }
        let names: Vec<&str> = mwc["webhooks"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|w| w["name"].as_str())
            .collect();
        let asked = |value: &str| sets.iter().any(|s| s == &format!("webhook.{value}=true"));
        let mut want = vec![
            "inject.byok.dev",
            "update.byok.dev",
            "ephemeral.byok.dev",
            "exec.byok.dev",
        ];
        if asked("refuseTokenRequests") {
            want.push("token.byok.dev");
        }
        if asked("refusePortForward") {
            want.push("portforward.byok.dev");
        }
        assert_eq!(names, want, "{name}");
        // The restricted Pod Security profile, on every variant.
        let pod = &one(&rendered, "Deployment")?["spec"]["template"]["spec"];
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
        assert_eq!(
            pod["securityContext"]["seccompProfile"]["type"],
            "RuntimeDefault"
        );
        let container = &pod["containers"][0];
        assert_eq!(
            container["securityContext"]["allowPrivilegeEscalation"],
            false
        );
        assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
        assert_eq!(
            container["securityContext"]["capabilities"]["drop"][0],
            "ALL"
        );
        assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/livez");
        assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
        // The sidecar has an image of its own, of the chart's version; pods of releases
        // before it run the operator's image, which stays accepted.
        let args = args_of(&rendered)?;
        let image = container["image"].as_str().context("image")?;
        assert!(
            args.contains(&format!("--operator-image={image}")),
            "{name}: {args:?}"
        );
        let tag = image.rsplit_once(':').map(|(_, t)| t).context("tag")?;
        let proxy_image = if name == "mirrored" {
            format!("mirror.example/byok/byok-proxy@sha256:{}", "a".repeat(64))
        } else {
            format!("ghcr.io/byok-dev/byok-proxy:{tag}")
        };
        assert!(
            args.contains(&format!("--proxy-image={proxy_image}")),
            "{name}: {args:?}"
        );

        let cluster_role = named(&rendered, "ClusterRole", "r-byok-operator")?;
        let cert_manager = sets.iter().any(|s| s == "certManager.enabled=true");
        match name {
            "certmanager" | "certmanager-issuer" => {
                // cainjector fills caBundle; the operator writes only the webhooks' path
                // there, and keeps that path in a Secret of its own (not cert-manager's).
                let inject = &mwc["metadata"]["annotations"]["cert-manager.io/inject-ca-from"];
                assert_eq!(inject, "byok-system/r-byok-operator-serving");
                let certificate = named(&rendered, "Certificate", "r-byok-operator-serving")?;
                let secret = certificate["spec"]["secretName"]
                    .as_str()
                    .context("secretName")?;
                assert_eq!(pod["volumes"][0]["secret"]["secretName"], secret);
                assert!(args.contains(&"--webhook-cert-dir=/etc/byok/tls".to_string()));
                assert!(
                    args.contains(
                        &"--webhook-path-secret=r-byok-operator-webhook-path".to_string()
                    ),
                    "{name}: {args:?}"
                );
                assert_ne!(secret, "r-byok-operator-webhook-path");
                let dns = certificate["spec"]["dnsNames"].to_string();
                assert!(dns.contains("r-byok-operator.byok-system.svc"), "{dns}");
                // IP SANs where they match addresses.
                let ips = certificate["spec"]["ipAddresses"].to_string();
                assert!(
                    ips.contains("10.0.0.7") && !dns.contains("10.0.0.7"),
                    "{ips} {dns}"
                );
                assert!(dns.contains("byok.example.com"), "{dns}");
            }
            _ => {
                assert!(!cert_manager);
                assert!(of_kind(&rendered, "Certificate").is_empty());
                assert!(
                    !args.iter().any(|a| a.starts_with("--webhook-path-secret")),
                    "{name}: the path lives in the TLS Secret"
                );
            }
        }
        // Every variant: the operator points the webhooks at its path (and may patch only
        // that one configuration), after its own Deployment rolled out; the chart renders
        // no path (no cluster to look the live one up in).
        assert!(args.contains(&"--webhook-configuration=r-byok-operator".to_string()));
        assert!(args.contains(&"--webhook-deployment=r-byok-operator".to_string()));
        assert!(
            grants(
                cluster_role,
                "admissionregistration.k8s.io",
                "mutatingwebhookconfigurations"
            ),
            "{name}"
        );
        assert!(
            mwc["webhooks"]
                .as_array()
                .into_iter()
                .flatten()
                .all(|w| w["clientConfig"]["service"].get("path").is_none()),
            "{name}: {mwc}"
        );
        // A moved broker: the previous port and Service name keep answering, the certificate
        // covers the old name.
        let services = of_kind(&rendered, "Service");
        if name == "moved-broker" {
            let main = named(&rendered, "Service", "r-byok-operator")?;
            let ports = main["spec"]["ports"].to_string();
            assert!(
                ports.contains(
                    r#""name":"broker-prev-0","port":9444,"protocol":"TCP","targetPort":"broker""#
                ),
                "{ports}"
            );
            let old = named(&rendered, "Service", "byok-operator")?;
            assert_eq!(old["spec"]["selector"], main["spec"]["selector"]);
            assert!(args.contains(&"--extra-san=byok-operator.byok-system.svc".to_string()));
        } else {
            assert!(
                !services
                    .iter()
                    .any(|s| s["metadata"]["name"] == "byok-operator"),
                "{name}"
            );
        }
        let client_ca = sets
            .iter()
            .any(|s| s.starts_with("webhook.clientCAConfigMap="));
        assert_eq!(
            args.contains(&"--webhook-client-ca=/etc/byok/webhook-client-ca/ca.crt".to_string()),
            client_ca,
            "{name}"
        );
        if client_ca {
            let volumes = pod["volumes"].to_string();
            assert!(
                volumes.contains(r#""configMap":{"items":[{"key":"ca.crt","path":"ca.crt"}],"name":"apiserver-webhook-client-ca"}"#),
                "{volumes}"
            );
        }
        let issuers = of_kind(&rendered, "Issuer").len();
        assert_eq!(issuers, if name == "certmanager" { 2 } else { 0 }, "{name}");
        if name == "certmanager-issuer" {
            let certificate = named(&rendered, "Certificate", "r-byok-operator-serving")?;
            assert_eq!(certificate["spec"]["issuerRef"]["kind"], "ClusterIssuer");
        }
        assert_eq!(
            args.contains(&"--no-create-keyring".to_string()),
            name == "keyring",
            "{name}: {args:?}"
        );
        if name == "keyring" {
            assert!(args.contains(&"--keyring-secret=restored-keyring".to_string()));
        }
        assert_eq!(
            of_kind(&rendered, "NetworkPolicy").len(),
            usize::from(name == "netpol")
        );
        if let Some(policy) = of_kind(&rendered, "NetworkPolicy").first() {
            let egress = policy["spec"]["egress"].to_string();
            assert_eq!(egress.matches(r#""port":443"#).count(), 1, "{egress}");
            assert!(egress.contains(r#""port":6443"#) && egress.contains(r#""port":53"#));
        }
        assert_eq!(
            of_kind(&rendered, "ServiceMonitor").len(),
            usize::from(name == "certmanager")
        );
        // One replica: no leader election, and no PDB that would block every drain.
        assert_eq!(
            of_kind(&rendered, "PodDisruptionBudget").len(),
            usize::from(name != "single")
        );
        assert_eq!(
            args.contains(&"--no-leader-election".to_string()),
            name == "single"
        );
    }
    Ok(())
}

#[test]
fn a_long_release_name_still_gives_valid_object_names() -> anyhow::Result<()> {
    let release = "a".repeat(53);
    let sets = ["certManager.enabled=true".to_string()];
    for object in objects(&render_chart(&release, "byok-system", &sets)?)? {
        let name = object["metadata"]["name"].as_str().context("name")?;
        // Services (DNS labels) are the strictest: 63 characters.
        assert!(name.len() <= 63, "{} {name} is too long", object["kind"]);
    }
    Ok(())
}

#[test]
fn watch_namespaces_trades_cluster_wide_secret_access_for_roles() -> anyhow::Result<()> {
    let cluster_wide = objects(&render_chart("r", "byok-system", &[])?)?;
    let cluster_role = named(&cluster_wide, "ClusterRole", "r-byok-operator")?;
    assert!(grants(cluster_role, "", "secrets"));

    let sets = ["watchNamespaces={team-a}".to_string()];
    let scoped = objects(&render_chart("r", "byok-system", &sets)?)?;
    let cluster_role = named(&scoped, "ClusterRole", "r-byok-operator")?;
    for resource in ["secrets", "pods"] {
        assert!(
            !grants(cluster_role, "", resource),
            "{resource} must not be cluster-wide with watchNamespaces"
        );
    }
    assert!(!grants(cluster_role, "byok.dev", "providerkeys"));
    let watched = of_kind(&scoped, "Role")
        .into_iter()
        .find(|r| r["metadata"]["namespace"] == "team-a")
        .context("a Role in team-a")?;
    for (group, resource) in [("", "secrets"), ("", "pods"), ("byok.dev", "providerkeys")] {
        assert!(grants(watched, group, resource), "{resource} in team-a");
    }
    assert!(args_of(&scoped)?.contains(&"--namespace=team-a".to_string()));
    let mwc = one(&scoped, "MutatingWebhookConfiguration")?;
    let selector = mwc["webhooks"][0]["namespaceSelector"]["matchExpressions"].to_string();
    assert!(
        selector.contains(r#""operator":"In""#) && selector.contains("team-a"),
        "{selector}"
    );
    Ok(())
}

#[test]
fn values_that_cannot_work_are_refused_by_the_chart() -> anyhow::Result<()> {
    for (sets, expected) in [
        (vec!["replicaCount=0"], "replicaCount"),
        (vec!["watchNamespaces={a,b}"], "watchNamespaces"),
        (vec!["webhook.failurePolicy=Sometimes"], "failurePolicy"),
        (vec!["broker.keyLease=five minutes"], "keyLease"),
        (vec!["sidecar.resources=lots"], "resources"),
        (vec!["leaderElection.enabled=false"], "replicaCount 1"),
        (
            vec![
                "metrics.service.enabled=false",
                "metrics.serviceMonitor.enabled=true",
            ],
            "metrics.service.enabled",
        ),
        (vec!["no.such.value=1"], "additional properties"),
        (vec!["watchNamespaces={byok-system}"], "release namespace"),
        (
            vec!["broker.previousServiceNames={r-byok-operator}"],
            "previousServiceNames",
        ),
        (
            vec!["broker.previousServiceNames={r-byok-operator-metrics}"],
            "previousServiceNames",
        ),
        (vec!["broker.previousPorts={443}"], "previousPorts"),
    ] {
        let sets: Vec<String> = sets.into_iter().map(String::from).collect();
        let refused = render_chart("r", "byok-system", &sets)
            .err()
            .with_context(|| format!("{sets:?} was accepted"))?;
        assert!(
            refused.to_string().contains(expected),
            "{sets:?}: the error should name {expected}: {refused:#}"
        );
    }
    Ok(())
}

/// Every leaf of values.yaml: its dotted path, and whether the lines just above it (or the
/// block it belongs to) carry a comment.
fn value_leaves(values: &str) -> Vec<(String, bool)> {
    let mut path: Vec<(usize, String)> = Vec::new();
    let mut commented = false;
    let mut leaves = Vec::new();
    let lines: Vec<&str> = values.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        if trimmed.starts_with('#') {
            commented = true;
            continue;
        }
        let Some((key, rest)) = trimmed.split_once(':') else {
            if trimmed.is_empty() {
                commented = false;
            }
            continue;
        };
        if trimmed.starts_with('-') || key.contains(' ') {
            continue;
        }
        while path.last().is_some_and(|(d, _)| *d >= indent) {
            path.pop();
        }
        let dotted = path
            .iter()
            .map(|(_, k)| k.as_str())
            .chain([key])
            .collect::<Vec<_>>()
            .join(".");
        // The block's first key, past comment lines (a child's own comment comes first).
        let next_is_child = lines[i + 1..]
            .iter()
            .find(|next| {
                let t = next.trim_start();
                !t.is_empty() && !t.starts_with('#')
            })
            .is_some_and(|next| next.len() - next.trim_start().len() > indent);
        if rest.trim().is_empty() && next_is_child {
            path.push((indent, key.to_string()));
        } else {
            leaves.push((dotted, commented));
        }
        commented = false;
    }
    leaves
}

#[test]
fn every_value_is_documented_and_typed() -> anyhow::Result<()> {
    let values = std::fs::read_to_string(chart_dir().join("values.yaml"))?;
    let schema: Value = serde_json::from_str(&std::fs::read_to_string(
        chart_dir().join("values.schema.json"),
    )?)?;
    let helm_doc = std::fs::read_to_string(repo().join("docs/helm.md"))?;
    let leaves = value_leaves(&values);
    assert!(leaves.len() > 40, "the values parser found only {leaves:?}");
    for (path, commented) in leaves {
        // `resources` is a free-form ResourceRequirements, documented as a whole.
        if path.starts_with("resources.") {
            continue;
        }
        assert!(commented, "values.yaml: {path} has no comment");
        let mut node = &schema;
        for part in path.split('.') {
            node = &node["properties"][part];
        }
        // A map such as nodeSelector is typed as a whole.
        assert!(!node.is_null(), "values.schema.json: no type for {path}");
        assert!(
            helm_doc.contains(&format!("`{path}`")),
            "docs/helm.md: {path} is not documented"
        );
    }
    Ok(())
}

#[test]
fn the_generated_manifests_match_the_chart_and_the_crd() -> anyhow::Result<()> {
    let out = std::env::temp_dir().join(format!("byok-manifests-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out)?;
    let script = repo().join("hack/manifests.sh");
    let status = std::process::Command::new("bash")
        .arg(&script)
        .arg(&out)
        .env("HELM", tools_dir()?.join("helm"))
        .status()?;
    anyhow::ensure!(status.success(), "hack/manifests.sh failed");
    for dir in ["config/base", "config/crd", "charts/byok-operator/crds"] {
        let names = |root: &std::path::Path| -> anyhow::Result<BTreeSet<String>> {
            Ok(std::fs::read_dir(root.join(dir))?
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect())
        };
        let (generated, committed) = (names(&out)?, names(&repo())?);
        assert_eq!(
            generated, committed,
            "{dir}: run `make manifests` and commit"
        );
        for name in generated {
            let a = std::fs::read_to_string(out.join(dir).join(&name))?;
            let b = std::fs::read_to_string(repo().join(dir).join(&name))?;
            assert!(
                a == b,
                "{dir}/{name} is stale: run `make manifests` and commit"
            );
        }
    }
    let _ = std::fs::remove_dir_all(&out);
    Ok(())
}

/// Creates the namespaces objects about to be applied live in (a chart is installed into an
/// existing namespace).
async fn ensure_namespaces(env: &TestEnv, namespaces: &[&str]) -> anyhow::Result<()> {
    use k8s_openapi::api::core::v1::Namespace;
    for ns in namespaces {
        let namespace = Namespace {
            metadata: kube::api::ObjectMeta {
                name: Some(ns.to_string()),
                ..Default::default()
            },
            ..Default::default()
        };
        match kube::Api::<Namespace>::all(env.client.clone())
            .create(&Default::default(), &namespace)
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

#[tokio::test]
async fn every_variant_and_the_kustomize_install_are_accepted_by_the_api_server()
-> anyhow::Result<()> {
    let env = TestEnv::new("chart").await?;
    install_crds(&env.client).await?;
    // cert-manager's and the Prometheus operator's CRDs, as published.
    let third_party = tools_dir()?.join("crds");
    let mut crds = String::new();
    for entry in std::fs::read_dir(&third_party)? {
        crds.push_str(&std::fs::read_to_string(entry?.path())?);
        crds.push_str("\n---\n");
    }
    kubectl_apply(&crds)?;
    let kubeconfig = byok_e2e::manifests::admin_kubeconfig()?
        .display()
        .to_string();
    run(
        &tools_dir()?.join("kubectl"),
        &[
            "--kubeconfig",
            &kubeconfig,
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/certificates.cert-manager.io",
            "crd/issuers.cert-manager.io",
            "crd/servicemonitors.monitoring.coreos.com",
        ],
        None,
    )?;

    for (name, mut sets) in variants() {
        let namespace = format!("{}-{name}", env.namespace);
        let mut namespaces = vec![namespace.clone()];
        if name == "netpol" {
            let watched = format!("{}-watched", env.namespace);
            sets.push(format!("watchNamespaces={{{watched}}}"));
            namespaces.push(watched);
        }
        let yaml = render_chart(&format!("{name}-{}", env.namespace), &namespace, &sets)?;
        let namespaces: Vec<&str> = namespaces.iter().map(String::as_str).collect();
        ensure_namespaces(&env, &namespaces).await?;
        kubectl_apply(&yaml).with_context(|| format!("variant {name}"))?;
    }

    // The kustomize install, as `kubectl apply --server-side -k config/default` would do.
    let kubectl = tools_dir()?.join("kubectl");
    let built = run(
        &kubectl,
        &[
            "kustomize",
            &repo().join("config/default").display().to_string(),
        ],
        None,
    )?;
    let built_objects = objects(&built)?;
    assert_eq!(
        one(&built_objects, "Namespace")?["metadata"]["name"],
        "byok-system"
    );
    assert!(
        built.contains(byok_operator::crdgen::SCHEMA_DIGEST_ANNOTATION),
        "the kustomize install carries the CRD with its schema digest"
    );
    kubectl_apply(&built).context("config/default")?;

    // Every sample, in a tenant namespace (their ProviderKeys and labelled Secrets pass the
    // schema and its CEL rules). The sample pod is a plain pod and is left out.
    let samples = repo().join("config/samples");
    let tenant = format!("{}-samples", env.namespace);
    let mut all = String::new();
    let mut providers = BTreeSet::new();
    for entry in std::fs::read_dir(&samples)? {
        let path = entry?.path();
        if path.file_name().is_some_and(|n| n == "pod.yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path)?;
        for object in objects(&text)? {
            match object["kind"].as_str() {
                Some("Secret") => assert_eq!(
                    object["metadata"]["labels"]["byok.dev/key-source"],
                    "true",
                    "{}: the sample Secret must be a key source",
                    path.display()
                ),
                Some("ProviderKey") => {
                    providers.insert(
                        object["spec"]["provider"]
                            .as_str()
                            .unwrap_or("")
                            .to_string(),
                    );
                }
                _ => {}
            }
        }
        all.push_str(&text);
        all.push_str("\n---\n");
    }
    assert_eq!(
        providers,
        [
            "anthropic",
            "azure",
            "google",
            "openai",
            "openai-compatible",
            "vertex"
        ]
        .map(String::from)
        .into(),
        "a sample for every provider"
    );
    ensure_namespaces(&env, &[tenant.as_str()]).await?;
    run(
        &kubectl,
        &[
            "--kubeconfig",
            &kubeconfig,
            "apply",
            "--server-side",
            "-n",
            &tenant,
            "-f",
            "-",
        ],
        Some(&all),
    )
    .context("config/samples")?;
    Ok(())
}
