# The project's verbs. `make run` and `make test` set everything up on a fresh machine.
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: help run test test-unit test-chart chaos e2e e2e-kind lint fmt crd tools build image control-plane-up control-plane-down clean

help: ## List the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-20s %s\n", $$1, $$2}'

run: ## Local control plane (or $$KUBECONFIG's cluster) + agent + example; Ctrl-C stops it all
	hack/run-local.sh

test: ## Every check and test, against a real kube-apiserver + etcd built here
	hack/test.sh

test-unit: ## Unit and property tests only (no control plane)
	$(CARGO) test --lib

bench: ## Benchmarks vs the seed's algorithm and the API write floor; regenerates docs/benchmarks.md
	hack/bench.sh

chaos: ## The long chaos test: 30 agent kills and an API-server kill over 3 minutes of churn
	PORTASSIGN_CHAOS_SECONDS=180 PORTASSIGN_CHAOS_KILLS=30 $(CARGO) test --test chaos -- --nocapture

test-chart: ## Helm chart checks, install and RBAC proof against $$KUBECONFIG's cluster
	hack/test-chart.sh

e2e: ## End-to-end suite on a local control plane: chart installed, agents as local processes
	hack/e2e-local.sh

e2e-kind: ## Same end-to-end suite on a kind cluster, agents as the chart's DaemonSet (needs Docker)
	hack/e2e-kind.sh

lint: ## Formatting and clippy, warnings denied
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings

fmt: ## Format the code
	$(CARGO) fmt --all

crd: build ## Regenerate crds/ (and the chart's copy) from src/api.rs
	target/debug/portassign crd > crds/portassignment.yaml
	@if [ -d charts/portassign/crds ]; then cp crds/portassignment.yaml charts/portassign/crds/portassignment.yaml; fi

build: ## Build the portassign binary (debug)
	$(CARGO) build

tools: ## Build kube-apiserver, etcd, kubectl and helm from Go modules into the cache
	hack/build-tools.sh

control-plane-up: ## Start a local control plane in .local/control-plane (prints its kubeconfig)
	hack/control-plane.sh up .local/control-plane

control-plane-down: ## Stop the control plane started by control-plane-up
	hack/control-plane.sh down .local/control-plane

IMAGE ?= portassign:dev
image: ## Build the container image (needs a Docker engine; none runs on the CI machine)
	docker build -t $(IMAGE) .

clean: ## Remove build output (the tools cache under ~/.cache/portassign stays)
	$(CARGO) clean
	rm -rf .local
