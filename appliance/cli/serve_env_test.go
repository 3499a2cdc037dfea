package cli_test

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/kmsgate/kmsgate/appliance/cli"
	"github.com/kmsgate/kmsgate/internal/apptest"
)

// TestServeScrubsMasterKeyFromEnv: once serve has read KMSGATE_MASTER_KEY, the variable is gone
// from the process environment (children and /proc/<pid>/environ would otherwise expose it), and
// the key it held is the one the server runs with.
func TestServeScrubsMasterKeyFromEnv(t *testing.T) {
	t.Setenv("KMSGATE_MASTER_KEY", apptest.MasterKey)
	data := t.TempDir()
	cmd := cli.NewRootCmd(cli.BuildInfo{Version: "test"})
	var out bytes.Buffer
	cmd.SetOut(&out)
	cmd.SetErr(&out)
	cmd.SetArgs([]string{"serve", "--listen", "127.0.0.1:0", "--data-dir", data, "--config-dir", t.TempDir(),
		"--admin-socket", filepath.Join(data, "admin.sock"), "--shutdown-grace", "5s"})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- cmd.ExecuteContext(ctx) }()
	// The admin socket exists once the server is serving.
	deadline := time.Now().Add(20 * time.Second)
	for {
		if _, err := os.Stat(filepath.Join(data, "admin.sock")); err == nil {
			break
		}
		select {
		case err := <-done:
			t.Fatalf("serve ended early: %v\n%s", err, out.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatal("server did not start")
		}
		time.Sleep(20 * time.Millisecond)
	}
	if v, ok := os.LookupEnv("KMSGATE_MASTER_KEY"); ok {
		t.Errorf("KMSGATE_MASTER_KEY is still in the environment while serving (%d bytes)", len(v))
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("serve: %v\n%s", err, out.String())
	}
}
