// Command kmsgate is the HSM signing gateway appliance.
package main

import (
	"context"
	"fmt"
	"os"

	"github.com/kmsgate/kmsgate/appliance/cli"
)

// Stamped by the linker (see Makefile).
var (
	version = "dev"
	commit  = "unknown"
)

func main() {
	cmd := cli.NewRootCmd(cli.BuildInfo{Version: version, Commit: commit})
	if err := cmd.ExecuteContext(context.Background()); err != nil {
		fmt.Fprintln(os.Stderr, "kmsgate:", err)
		os.Exit(1)
	}
}
