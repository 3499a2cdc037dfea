#!/bin/sh
# Builds HashiCorp Vault's own binary from this tool module into $HOME/.cache/kmsgate-tools/vault
# (or $KMSGATE_TOOLS_DIR/vault), only when it is missing or was built from a different
# go.mod/go.sum/main.go. The first build takes ~6 minutes and ~6 GB of RAM on 2 cores.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out_dir=${KMSGATE_TOOLS_DIR:-$HOME/.cache/kmsgate-tools}
out=$out_dir/vault
stamp=$out_dir/vault.sha256
key=$(cat "$here/go.mod" "$here/go.sum" "$here/main.go" | sha256sum | cut -d' ' -f1)
if [ -x "$out" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$key" ]; then
	echo "vault: $out is up to date"
	exit 0
fi
mkdir -p "$out_dir"
echo "vault: building $out (this takes several minutes the first time)"
cd "$here"
# -buildvcs=false: the tool module lives inside the product's repository.
GOFLAGS=-buildvcs=false go build -o "$out.tmp" .
mv "$out.tmp" "$out"
echo "$key" >"$stamp"
"$out" version
