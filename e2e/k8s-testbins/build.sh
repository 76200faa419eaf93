#!/usr/bin/env bash
# Builds kube-apiserver, etcd and the kubelet from their Go modules (no downloads of release binaries are
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

build() { # name, package, ldflags
  local name=$1 pkg=$2 ldflags=$3
  if [ -x "$out/$name" ]; then return; fi
  echo "building $name from $pkg (cold builds take several minutes)..." >&2
  local start=$SECONDS
  (cd "$here" && go build -trimpath -ldflags "-s -w $ldflags" -o "$out/$name.tmp" "$pkg")
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
echo "$out"
