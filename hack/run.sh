#!/usr/bin/env bash
# `make run`: the embedded default. Local control plane + CRDs + fake provider + operator (dev
# flags) + hack/demo (samples tuned to the fake provider), then `kubectl get pk -A -o wide`. Stays up until Ctrl-C, then cleans up.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v kubectl >/dev/null || { echo "make run needs kubectl on PATH" >&2; exit 1; }

run_dir=target/run
mkdir -p "$run_dir"
export KUBECONFIG=$PWD/target/envtest/kubeconfig
fake_port=${BYOK_FAKE_PORT:-18443}
fake=https://127.0.0.1:$fake_port
pids=()
cleanup() {
  trap - EXIT INT TERM
  echo; echo "stopping the operator, the fake provider and the control plane..."
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  # Stop the control plane directly, not through make: this runs while signals are flying.
  if [ -f target/envtest/envtest.pid ]; then
    envtest_pid=$(cat target/envtest/envtest.pid)
    kill "$envtest_pid" 2>/dev/null || true
    while kill -0 "$envtest_pid" 2>/dev/null; do sleep 0.2; done
    rm -f target/envtest/envtest.pid target/envtest/kubeconfig
  fi
  echo "stopped"
}
trap cleanup EXIT INT TERM

cargo build --bins --workspace
make --no-print-directory cluster-up

kubectl apply --server-side -f crds/ >/dev/null
kubectl wait --for=condition=Established crd/providerkeys.byok.dev --timeout=60s >/dev/null
kubectl create namespace byok-system --dry-run=client -o yaml | kubectl apply -f - >/dev/null

target/debug/fake-provider --listen "127.0.0.1:$fake_port" --ca-out "$run_dir/fake-ca.pem" \
  --valid-key anthropic=sk-ant-demo-accepted-by-the-fake-provider-0001 >"$run_dir/fake-provider.log" 2>&1 &
pids+=($!)
deadline=$((SECONDS + 30))
until grep -q "ready" "$run_dir/fake-provider.log" 2>/dev/null; do
  [ $SECONDS -lt $deadline ] || { echo "fake provider did not start:"; cat "$run_dir/fake-provider.log"; exit 1; }
  sleep 0.2
done

target/debug/byok-operator controller --operator-namespace byok-system \
  --insecure-allow-private-base-urls --extra-ca-file "$run_dir/fake-ca.pem" \
  --provider-endpoint "anthropic=$fake/anthropic" --provider-endpoint "openai=$fake/openai/v1" \
  --provider-endpoint "google=$fake/google" --provider-endpoint "vertex=$fake/vertex" \
  --provider-endpoint "vertex-token=$fake/vertex-token/token" --admin-addr 127.0.0.1:18080 \
  --webhook-addr 127.0.0.1:19443 --broker-addr 127.0.0.1:19444 --broker-url https://127.0.0.1:19444 \
  >"$run_dir/operator.log" 2>&1 &
pids+=($!)

kubectl apply -f hack/demo/namespace.yaml >/dev/null
kubectl apply -f hack/demo/ >/dev/null
echo "waiting for every sample ProviderKey to report Ready..."
deadline=$((SECONDS + 60))
while kubectl get pk -A -o jsonpath='{range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{"|"}{end}' | grep -qE '(^|\|)\|'; do
  [ $SECONDS -lt $deadline ] || break
  sleep 0.5
done
kubectl get pk -A -o wide
echo
echo "Logs: $run_dir/operator.log, $run_dir/fake-provider.log; metrics: http://127.0.0.1:18080/metrics"
echo "Try: KUBECONFIG=$KUBECONFIG kubectl describe pk -n byok-demo team-openai"
echo "Ctrl-C stops everything."
wait "${pids[@]}"
