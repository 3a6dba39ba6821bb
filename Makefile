# The project's verbs. `make run` and `make test` set everything up on a fresh machine.
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: help run test test-unit test-chart package fuzz chaos e2e e2e-kind e2e-kind-dra bench-kind kind-up kind-down image image-offline lint fmt crd tools build bench control-plane-up control-plane-down clean

help: ## List the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-20s %s\n", $$1, $$2}'

run: ## Local control plane (or $$KUBECONFIG's cluster) + agent + example; Ctrl-C stops it all
	hack/run-local.sh

test: ## Every check and test, against a real kube-apiserver + etcd built here
	hack/test.sh

test-unit: ## Unit and property tests only (no control plane)
	$(CARGO) test --workspace --lib

bench: ## Benchmarks vs the seed's algorithm and the API write floor; regenerates docs/benchmarks.md
	hack/bench.sh

fuzz: ## Every cargo-fuzz target for FUZZ_SECONDS each (default 60); installs cargo-fuzz on first use
	hack/fuzz.sh

chaos: ## The long chaos test: 30 agent kills and an API-server kill over 3 minutes of churn
	PORTASSIGN_CHAOS_SECONDS=180 PORTASSIGN_CHAOS_KILLS=30 $(CARGO) test --test chaos -- --nocapture

test-chart: ## The chart: helm lint and helm-unittest, then its checks against a local API server
	hack/chart-unittest.sh
	$(CARGO) test -p portassign-e2e --test chart

package: ## The chart archive in dist/, reproducible (same sources, same bytes), with Artifact Hub annotations
	hack/package.sh dist

e2e: ## The end-to-end suite on a local control plane (chart installed with helm, agents as processes)
	$(CARGO) build --bin portassign
	$(CARGO) test -p portassign-e2e --test suite -- --nocapture

e2e-kind: ## The end-to-end suite and the real-pod scenarios on the offline kind cluster (KEEP_CLUSTER=1 keeps it)
	hack/kind/test.sh

e2e-kind-dra: ## Only the DRA scenarios of e2e-kind, on a fresh install (for work on the driver)
	KIND_ONLY=dra_scenarios_alone hack/kind/test.sh

bench-kind: ## Pod start with a port through DRA against a fixed hostPort, on the kind cluster (docs/dra-benchmark.md)
	KIND_ONLY=dra_pod_start_against_a_fixed_host_port hack/kind/test.sh

kind-up: ## Start the offline kind cluster (built and cached here); prints its kubeconfig
	hack/kind/cluster.sh up

kind-down: ## Delete the kind cluster and stop the private Docker engine
	hack/kind/cluster.sh down

lint: ## Formatting and clippy, warnings denied
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt: ## Format the code
	$(CARGO) fmt --all

crd: build ## Regenerate crds/ (and the chart's copy) from src/api.rs
	target/debug/portassign crd > crds/portassignment.yaml
	@if [ -d charts/portassign/crds ]; then cp crds/portassignment.yaml charts/portassign/crds/portassignment.yaml; fi

build: ## Build the portassign binary (debug)
	$(CARGO) build

tools: ## Build kube-apiserver, etcd, kubectl, helm, helm-unittest and promtool from Go modules into the cache
	hack/build-tools.sh etcd kube-apiserver kubectl helm helm-unittest promtool

control-plane-up: ## Start a local control plane in .local/control-plane (prints its kubeconfig)
	hack/control-plane.sh up .local/control-plane

control-plane-down: ## Stop the control plane started by control-plane-up
	hack/control-plane.sh down .local/control-plane

IMAGE ?= portassign:dev
image: ## Build the container image from public bases (needs a Docker engine and a registry to pull from)
	docker build -t $(IMAGE) .

image-offline: ## Build the same runtime image with no registry (prebuilt binary, local base); prints its name
	hack/kind/image.sh

clean: ## Remove build output (the tools cache under ~/.cache/portassign stays)
	$(CARGO) clean
	rm -rf .local
