// Command kmsgate is the HSM signing gateway appliance.
package main

import (
	"context"
	"fmt"
	"os"

	"github.com/kmsgate/kmsgate/appliance"
)

// Stamped by the linker (see Makefile).
var (
	version = "dev"
	commit  = "unknown"
)

func main() {
	cmd := appliance.NewRootCmd(appliance.BuildInfo{Version: version, Commit: commit})
	if err := cmd.ExecuteContext(context.Background()); err != nil {
		fmt.Fprintln(os.Stderr, "kmsgate:", err)
		os.Exit(1)
	}
}
