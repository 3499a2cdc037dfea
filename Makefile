# kmsgate — build, run, test, bench, package.
#   make run    build and serve on the embedded default (db provider, Badger under ./data, dev tenant)
#   make test   install test dependencies if missing, lint, and run every test under -race
#   make bench  signing benchmark (pkcs11/SoftHSM2, db, Vault) with ratios against in-process loops
#   make deb    build the .deb package into dist/
#   make vulncheck  govulncheck against the Go vulnerability database (needs network; not in make test)

GO        ?= go
VERSION   ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
COMMIT    ?= $(shell git rev-parse --short HEAD 2>/dev/null || echo unknown)
LDFLAGS   := -s -w -X main.version=$(VERSION) -X main.commit=$(COMMIT)
BIN       := bin/kmsgate
DATA_DIR  ?= ./data
CONFIG_DIR ?= ./config
LISTEN    ?= 127.0.0.1:8080
STATICCHECK_VERSION := v0.8.2
GOVULNCHECK_VERSION := v1.9.0
GOBIN     := $(shell $(GO) env GOPATH)/bin
PKGS      := ./...

.PHONY: all build run test test-deps lint vet fmt-check tidy-check staticcheck unit bench deb vulncheck clean

all: build

build:
	CGO_ENABLED=1 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o $(BIN) .

run: build
	mkdir -p $(DATA_DIR)
	$(BIN) serve --dev --data-dir $(DATA_DIR) --config-dir $(CONFIG_DIR) --listen $(LISTEN)

test-deps:
	tools/setup-test-env.sh

fmt-check:
	@out=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go' -not -path './tools/*')); \
	if [ -n "$$out" ]; then echo "gofmt needed on:"; echo "$$out"; exit 1; fi

vet:
	$(GO) vet $(PKGS)

staticcheck:
	$(GOBIN)/staticcheck $(PKGS)

# Fails when go.mod or go.sum differ from what `go mod tidy` would write (and prints the diff).
tidy-check:
	$(GO) mod tidy -diff

lint: fmt-check tidy-check vet staticcheck

# Known vulnerabilities in the dependencies and the Go standard library that the code actually
# calls. It fetches vuln.go.dev, which the network-less test environment cannot reach, so it runs
# on its own (CI with network, or before a release), never as part of make test.
vulncheck:
	$(GO) run golang.org/x/vuln/cmd/govulncheck@$(GOVULNCHECK_VERSION) $(PKGS)

# The tests run inside a private network namespace that has only loopback: local-kms (the AWS KMS
# API server) binds every interface and has no bind option, and no test may reach beyond loopback.
# Everything is downloaded and compiled before entering it.
unit:
	$(GO) mod download
	$(GO) test -race -count=1 -run '^$$' $(PKGS) >/dev/null
	tools/netns-run.sh env GOPROXY=off GOFLAGS=-mod=mod $(GO) test -race -count=1 -timeout 20m $(PKGS)
	@echo "## The HTTP contract suite once more, every appliance on PostgreSQL"
	tools/netns-run.sh env GOPROXY=off GOFLAGS=-mod=mod KMSGATE_TEST_STORE=postgres $(GO) test -race -count=1 -timeout 10m ./api

test: test-deps lint unit

bench: build
	tools/setup-test-env.sh
	$(GO) build -o bin/kmsgate-bench ./bench
	@echo "## Hot-path micro-benchmarks (allocations per signature)"
	tools/netns-run.sh env GOPROXY=off $(GO) test -run '^$$' -bench . -benchmem ./api ./hsm
	tools/netns-run.sh bin/kmsgate-bench -kmsgate $(BIN)
	@echo "## Rotation of 1,000 due chains at once (4 workers per replica): 3 replicas on PostgreSQL vs 1 on Badger"
	tools/netns-run.sh env GOPROXY=off $(GO) test -count=1 -run 'TestHARotation(ExactlyOncePostgres|Badger)$$' -v ./appliance/keychain \
	  | tools/bench-rotation.awk

deb: build
	packaging/build-deb.sh $(BIN) $(VERSION)

clean:
	rm -rf bin dist
