#!/bin/sh
# Installs the real backends the provider tests start (idempotent; CI calls it before `make test`):
#   - local-kms (AWS KMS API server) into $(go env GOPATH)/bin
#   - Vault, built from tools/vault into $HOME/.cache/kmsgate-tools/vault
# SoftHSM2 comes from the OS packages (apt-get install -y softhsm2 opensc).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
LOCAL_KMS_VERSION=v0.0.0-20260228092603-2a5e92d09ab6
gobin=$(go env GOPATH | cut -d: -f1)/bin
if [ -n "${KMSGATE_LOCAL_KMS_BIN:-}" ] && [ -x "$KMSGATE_LOCAL_KMS_BIN" ]; then
	echo "local-kms: using $KMSGATE_LOCAL_KMS_BIN"
else
	# go install is itself idempotent and fast when the module is cached and built.
	GOBIN=$gobin go install "github.com/nsmithuk/local-kms@$LOCAL_KMS_VERSION"
	echo "local-kms: $gobin/local-kms"
fi
if [ -n "${KMSGATE_VAULT_BIN:-}" ] && [ -x "$KMSGATE_VAULT_BIN" ]; then
	echo "vault: using $KMSGATE_VAULT_BIN"
else
	"$here/vault/build.sh"
fi
