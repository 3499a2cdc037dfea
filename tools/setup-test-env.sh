#!/usr/bin/env bash
# Installs everything the tests and the benchmark need, idempotently: Debian packages (SoftHSM2,
# OpenSC, openssl, promtool, iproute2, PostgreSQL), staticcheck, local-kms (AWS KMS API server) and a Vault
# binary built from the module proxy (cached under ~/.cache/kmsgate-tools). A missing dependency is
# an error here, never a skipped test later.
set -euo pipefail
cd "$(dirname "$0")/.."

need_pkgs=()
command -v softhsm2-util >/dev/null || need_pkgs+=(softhsm2)
[ -e /usr/lib/softhsm/libsofthsm2.so ] || need_pkgs+=(softhsm2)
command -v pkcs11-tool >/dev/null || need_pkgs+=(opensc)
command -v openssl >/dev/null || need_pkgs+=(openssl)
command -v jq >/dev/null || need_pkgs+=(jq)
command -v curl >/dev/null || need_pkgs+=(curl)
command -v promtool >/dev/null || need_pkgs+=(prometheus)
command -v ip >/dev/null || need_pkgs+=(iproute2)
command -v unshare >/dev/null || need_pkgs+=(util-linux)
command -v gcc >/dev/null || need_pkgs+=(gcc libc6-dev)
command -v systemd-analyze >/dev/null || need_pkgs+=(systemd)
command -v dpkg-deb >/dev/null || need_pkgs+=(dpkg)
# The store tests start their own PostgreSQL servers from the Debian server binaries.
compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || need_pkgs+=(postgresql)
if [ ${#need_pkgs[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "missing Debian packages: ${need_pkgs[*]} — run as root or: sudo apt-get install ${need_pkgs[*]}" >&2
    exit 1
  fi
  echo "installing Debian packages: ${need_pkgs[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
fi

GOBIN=$(go env GOPATH)/bin
[ -x "$GOBIN/staticcheck" ] || go install honnef.co/go/tools/cmd/staticcheck@v0.8.2

if [ -x tools/install-test-deps.sh ]; then
  tools/install-test-deps.sh
fi
