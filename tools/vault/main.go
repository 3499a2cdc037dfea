// Command vault builds HashiCorp Vault's own CLI/server from the module proxy so that CI can run a
// real Vault dev server: Vault is neither go-installable (its go.mod has replace directives) nor in
// Debian. This is a test tool only; the product's go.mod never depends on it.
package main

import (
	"os"

	"github.com/hashicorp/vault/command"
)

func main() {
	os.Exit(command.Run(os.Args[1:]))
}
