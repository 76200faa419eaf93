# byok-operator: the commands a newcomer needs are `make run` and `make test`.
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

CARGO ?= cargo
ENVTEST_DIR := target/envtest
ENVTEST_BIN := target/debug/envtest
# How long `make cluster-up` waits for a cold kube-apiserver.
CLUSTER_UP_TIMEOUT ?= 180

.PHONY: help
help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

.PHONY: run
run: ## Local control plane + operator + fake provider + config/samples; Ctrl-C stops it
	bash hack/run.sh

.PHONY: build
build: ## Build the byok-operator binary
	$(CARGO) build --bin byok-operator

.PHONY: crds
crds: ## Regenerate crds/ from the Rust types (a unit test fails when they drift), then make manifests
	$(CARGO) run -q --bin byok-operator -- crd > crds/byok.dev_providerkeys.yaml
	bash hack/manifests.sh

.PHONY: manifests
manifests: testbins ## Regenerate config/base, config/crd and the chart's crds/ from the chart and crds/ (a test fails on drift)
	bash hack/manifests.sh

# The image's binary (Dockerfile): static, musl, no libc needed at run time.
STATIC_TARGET := x86_64-unknown-linux-musl
STATIC_BINARY := target/$(STATIC_TARGET)/release/byok-operator
# The sidecar image's binary (Dockerfile, target `proxy`), built with the `sidecar` profile
# (Cargo.toml: fat LTO, one codegen unit, stripped).
STATIC_PROXY := target/$(STATIC_TARGET)/sidecar/byok-proxy

.PHONY: static
static: ## Build the static binaries of the images, byok-operator and byok-proxy (needs musl-tools and the rustup target x86_64-unknown-linux-musl)
	CC_x86_64_unknown_linux_musl=musl-gcc $(CARGO) build --release --locked --target $(STATIC_TARGET) --bin byok-operator
	CC_x86_64_unknown_linux_musl=musl-gcc $(CARGO) build --profile sidecar --locked --target $(STATIC_TARGET) -p byok-proxy --bin byok-proxy

.PHONY: image
image: ## Build the container images (docker or podman): byok-operator:dev and byok-proxy:dev
	$${CONTAINER_TOOL:-docker} build -t byok-operator:dev .
	$${CONTAINER_TOOL:-docker} build --target proxy -t byok-proxy:dev .

.PHONY: sidecar-fixture
sidecar-fixture: testbins ## Add the sidecar the webhook injects now to e2e/fixtures/sidecars/ (when its shape changed; the old fixtures stay)
	BYOK_WRITE_SIDECAR_FIXTURE=1 $(CARGO) test -p byok-e2e --test broker -q -- every_released_sidecar_shape

.PHONY: docs
docs: ## Regenerate docs/api.md from the CRD (a unit test fails when it drifts)
	$(CARGO) run -q --bin byok-operator -- api-docs > docs/api.md

.PHONY: testbins
testbins: ## Build (or reuse from ~/.cache) kube-apiserver, etcd, kubelet, kube-controller-manager, kube-scheduler, kube-proxy, kubectl and helm from their Go modules
	@bash e2e/k8s-testbins/build.sh >/dev/null

.PHONY: sdk-deps
sdk-deps: ## Install (or reuse from ~/.cache) the official Python, Node and Go SDKs e2e/tests/sdk.rs runs, as e2e/sdk/'s lock files pin them
	@bash e2e/sdk/install.sh

.PHONY: lint
lint: ## rustfmt and clippy, warnings are errors
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

.PHONY: test
test: lint testbins sdk-deps ## Everything CI runs: lint, unit tests, integration tests on a real control plane
	@mkdir -p target
	$(CARGO) test --workspace --all-targets 2>&1 | tee target/test-output.log
	@# Tests about private and metadata addresses, in a network namespace with only loopback:
	@# even wrong code cannot send a packet off this machine from there. Same target selection
	@# as above, so nothing is rebuilt.
	unshare --net sh -c 'ip link set lo up && BYOK_NETNS_ONLY=1 exec $(CARGO) test --offline --workspace --all-targets -q -- --ignored netns_' 2>&1 | tee -a target/test-output.log
	@# Tests with real pods: a kubelet, containerd and their pods in network, mount and PID
	@# namespaces of their own (hack/node-ns.sh), which leave nothing behind.
	@# Their sidecar image is made from the image's static binary (make static), which must run.
	@# The Helm upgrade test (e2e/tests/upgrade.rs) also needs the previous release, built
	@# from this repository's history (cached with its own target directory; here, outside the
	@# node's namespace, which has no network).
	CARGO=$(CARGO) bash e2e/k8s-testbins/previous-release.sh >/dev/null
	$(MAKE) --no-print-directory static
	BYOK_STATIC_BINARY=$$PWD/$(STATIC_BINARY) BYOK_STATIC_PROXY=$$PWD/$(STATIC_PROXY) $(CARGO) test --offline -p byok-e2e --test image --test proxy -q -- --ignored image_ 2>&1 | tee -a target/test-output.log
	BYOK_SIDECAR_BINARY=$$PWD/$(STATIC_PROXY) BYOK_OPERATOR_BINARY=$$PWD/$(STATIC_BINARY) \
	  hack/node-ns.sh $(CARGO) test --offline --workspace --all-targets -q -- --ignored node_ 2>&1 | tee -a target/test-output.log
	@awk '/^test result:/ {p += $$4; f += $$6} END {printf "tests: %d passed, %d failed\n", p, f}' target/test-output.log

.PHONY: bench
bench: testbins ## Scale and speed figures beside their aims: BENCH_KEYS ProviderKeys (10,000) on the real API server (release build)
	@# The proxy section compares with wrk, nginx (Debian: wrk, nginx-light) and the hop fixture.
	@command -v wrk >/dev/null && command -v nginx >/dev/null || \
	  { apt-get update -qq && apt-get install -y -qq wrk nginx-light; } || \
	  echo "make bench: install wrk and nginx-light for the proxy section" >&2
	$(CARGO) build --release --bin byok-operator
	@# The proxy section runs the sidecar's shipped binary (make static).
	$(MAKE) --no-print-directory static
	$(CARGO) build --release -p byok-e2e --bin hop
	$(CARGO) run --release -p byok-e2e --bin bench -- $${BENCH_KEYS:-10000} target/release/byok-operator $(STATIC_PROXY)
	@# Section `pods`: real pods on a test node (hack/node-ns.sh), the sidecar image made from
	@# the release binary.
	@if [ -z "$${BENCH_SECTIONS:-}" ] || [[ ",$${BENCH_SECTIONS}," == *",pods,"* ]]; then \
	  BYOK_SIDECAR_BINARY=$$PWD/$(STATIC_PROXY) BYOK_OPERATOR_BINARY=$$PWD/target/release/byok-operator hack/node-ns.sh \
	    $(CARGO) test --offline -p byok-e2e --test pods -q -- --ignored --exact bench_pods_create_to_first_call --nocapture; fi

.PHONY: cluster-up
cluster-up: testbins ## Start a local control plane; KUBECONFIG=target/envtest/kubeconfig; NODE=1 adds the tests' node
	@if [ -f $(ENVTEST_DIR)/envtest.pid ] && kill -0 "$$(cat $(ENVTEST_DIR)/envtest.pid)" 2>/dev/null; then \
	  echo "already running (pid $$(cat $(ENVTEST_DIR)/envtest.pid)); KUBECONFIG=$(ENVTEST_DIR)/kubeconfig"; exit 0; fi
	$(CARGO) build -p byok-e2e --bin envtest
	@mkdir -p $(ENVTEST_DIR); rm -f $(ENVTEST_DIR)/kubeconfig
	@if [ "$(NODE)" = 1 ]; then \
	  $(CARGO) build -q -p byok-operator -p byok-proxy --bins; \
	  BYOK_SIDECAR_BINARY=$$PWD/target/debug/byok-proxy BYOK_OPERATOR_BINARY=$$PWD/target/debug/byok-operator \
	  BYOK_NODE_NS_PIDFILE=$(ENVTEST_DIR)/netns.pid setsid nohup hack/node-ns.sh $(ENVTEST_BIN) $(ENVTEST_DIR) --node \
	    >$(ENVTEST_DIR)/envtest.log 2>&1 </dev/null & echo $$! >$(ENVTEST_DIR)/envtest.pid; \
	else setsid nohup $(ENVTEST_BIN) $(ENVTEST_DIR) >$(ENVTEST_DIR)/envtest.log 2>&1 </dev/null & echo $$! >$(ENVTEST_DIR)/envtest.pid; fi
	@deadline=$$((SECONDS + $(CLUSTER_UP_TIMEOUT))); \
	until [ -f $(ENVTEST_DIR)/kubeconfig ]; do \
	  if ! kill -0 "$$(cat $(ENVTEST_DIR)/envtest.pid)" 2>/dev/null || [ $$SECONDS -ge $$deadline ]; then \
	    echo "control plane did not start; $(ENVTEST_DIR)/envtest.log says:"; tail -n 40 $(ENVTEST_DIR)/envtest.log; exit 1; fi; \
	  sleep 0.2; done
	@echo "control plane up: export KUBECONFIG=$(ENVTEST_DIR)/kubeconfig"
	@if [ "$(NODE)" = 1 ]; then \
	  echo "node byok-node up; the cluster lives in its own network namespace, so run kubectl there:"; \
	  echo "  nsenter -t $$(cat $(ENVTEST_DIR)/netns.pid) -n kubectl --kubeconfig $(ENVTEST_DIR)/kubeconfig get nodes"; fi

.PHONY: cluster-down
cluster-down: ## Stop the local control plane started by cluster-up
	@if [ -f $(ENVTEST_DIR)/envtest.pid ]; then \
	  pid=$$(cat $(ENVTEST_DIR)/envtest.pid); kill "$$pid" 2>/dev/null || true; \
	  deadline=$$((SECONDS + 30)); \
	  while kill -0 "$$pid" 2>/dev/null; do \
	    if [ $$SECONDS -ge $$deadline ]; then kill -9 "$$pid"; fi; sleep 0.2; done; \
	  rm -f $(ENVTEST_DIR)/envtest.pid $(ENVTEST_DIR)/netns.pid $(ENVTEST_DIR)/kubeconfig; echo "control plane stopped"; \
	else echo "no control plane running"; fi

.PHONY: clean
clean: cluster-down ## Remove build output (the control-plane binaries stay cached in ~/.cache)
	$(CARGO) clean
