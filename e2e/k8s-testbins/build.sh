#!/usr/bin/env bash
# Builds kube-apiserver, etcd, the kubelet, kube-controller-manager, kube-scheduler and kube-proxy from their Go modules (no downloads of release binaries are
# possible here) and caches them under ${BYOK_TESTBINS_CACHE:-$HOME/.cache/byok-operator/k8s-testbins}/<kube>-<etcd>/.
# Rebuilds only what is missing. Prints the cache directory on stdout; progress goes to stderr.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/versions.env"
cache_root=${BYOK_TESTBINS_CACHE:-$HOME/.cache/byok-operator/k8s-testbins}
out="$cache_root/${KUBE_VERSION}-etcd-${ETCD_VERSION}"
mkdir -p "$out"

export GOTOOLCHAIN=local GOFLAGS=-mod=readonly CGO_ENABLED=0
minor=${KUBE_VERSION#v1.}; minor=${minor%%.*}
build_date=$(date -u -d "@${SOURCE_DATE_EPOCH:-0}" +%Y-%m-%dT%H:%M:%SZ)

build() { # name, package, ldflags[, module directory]
  local name=$1 pkg=$2 ldflags=$3 module=${4:-$here}
  if [ -x "$out/$name" ]; then return; fi
  echo "building $name from $pkg (cold builds take several minutes)..." >&2
  local start=$SECONDS
  (cd "$module" && go build -trimpath -ldflags "-s -w $ldflags" -o "$out/$name.tmp" "$pkg")
  mv "$out/$name.tmp" "$out/$name" # rename last: an interrupted build never looks finished
  echo "built $name in $((SECONDS - start))s" >&2
}

kv=k8s.io/component-base/version
build kube-apiserver k8s.io/kubernetes/cmd/kube-apiserver \
  "-X $kv.gitVersion=$KUBE_VERSION -X $kv.gitMajor=1 -X $kv.gitMinor=$minor -X $kv.gitTreeState=clean -X $kv.buildDate=$build_date \
   -X k8s.io/client-go/pkg/version.gitVersion=$KUBE_VERSION -X k8s.io/client-go/pkg/version.gitMajor=1 -X k8s.io/client-go/pkg/version.gitMinor=$minor"
build etcd go.etcd.io/etcd/server/v3 ""
# The node of the tests with real pods: the same module and version as the API server.
build kubelet k8s.io/kubernetes/cmd/kubelet \
  "-X $kv.gitVersion=$KUBE_VERSION -X $kv.gitMajor=1 -X $kv.gitMinor=$minor -X $kv.gitTreeState=clean -X $kv.buildDate=$build_date"
# The Helm upgrade test runs the chart's Deployment on the test node: the controller-manager rolls
# it out (and publishes kube-root-ca.crt and EndpointSlices), the scheduler places its pods,
# kube-proxy routes its Services. Same module and version as the API server.
build kube-controller-manager k8s.io/kubernetes/cmd/kube-controller-manager \
  "-X $kv.gitVersion=$KUBE_VERSION -X $kv.gitMajor=1 -X $kv.gitMinor=$minor -X $kv.gitTreeState=clean -X $kv.buildDate=$build_date"
build kube-scheduler k8s.io/kubernetes/cmd/kube-scheduler \
  "-X $kv.gitVersion=$KUBE_VERSION -X $kv.gitMajor=1 -X $kv.gitMinor=$minor -X $kv.gitTreeState=clean -X $kv.buildDate=$build_date"
build kube-proxy k8s.io/kubernetes/cmd/kube-proxy \
  "-X $kv.gitVersion=$KUBE_VERSION -X $kv.gitMajor=1 -X $kv.gitMinor=$minor -X $kv.gitTreeState=clean -X $kv.buildDate=$build_date"
# The chart and kustomize checks: kubectl (kustomize built in, server-side apply) from the same
# module as the API server; helm from its own module (helm/go.mod), named by its version.
build kubectl k8s.io/kubernetes/cmd/kubectl \
  "-X $kv.gitVersion=$KUBE_VERSION -X $kv.gitMajor=1 -X $kv.gitMinor=$minor -X $kv.gitTreeState=clean -X $kv.buildDate=$build_date"
helm_version=$(sed -n 's#^\s*helm.sh/helm/v3 \(v[0-9.]*\).*$#\1#p' "$here/helm/go.mod")
build "helm-$helm_version" helm.sh/helm/v3/cmd/helm "-X helm.sh/helm/v3/internal/version.version=$helm_version" "$here/helm"
ln -sfn "helm-$helm_version" "$out/helm"

# The CRDs of cert-manager (Certificate, Issuer) and the Prometheus operator (ServiceMonitor),
# exactly as those projects publish them, so the API server validates the chart's optional
# objects against their real schemas. The Go module proxy is the one source reachable here.
third_party_crd() { # module, version, path in the module
  local file="$out/crds/$(basename "$3")"
  [ -s "$file" ] && return
  mkdir -p "$out/crds"
  local dir
  dir=$(cd / && GOFLAGS= go mod download -json "$1@$2" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')
  rm -f "$file.tmp"; cp "$dir/$3" "$file.tmp" && mv "$file.tmp" "$file"
}
third_party_crd github.com/cert-manager/cert-manager "$CERT_MANAGER_VERSION" deploy/crds/cert-manager.io_certificates.yaml
third_party_crd github.com/cert-manager/cert-manager "$CERT_MANAGER_VERSION" deploy/crds/cert-manager.io_issuers.yaml
third_party_crd github.com/prometheus-operator/prometheus-operator "$PROMETHEUS_OPERATOR_VERSION" \
  example/prometheus-operator-crd/monitoring.coreos.com_servicemonitors.yaml
echo "$out"
