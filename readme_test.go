package main

import (
	"bytes"
	"context"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kmsgate/kmsgate/appliance/cli"
	"github.com/kmsgate/kmsgate/internal/testenv"
)

// TestReadmeBlocks runs the README's shell walk-throughs verbatim (only the port differs) against
// `kmsgate serve --dev`, as a user following the README would.
func TestReadmeBlocks(t *testing.T) {
	for _, c := range []struct{ marker, want string }{
		{"quickstart", "Verified OK"},
		{"keychain", "leaf.pem: OK"},
	} {
		t.Run(c.marker, func(t *testing.T) {
			out := runReadmeBlock(t, c.marker)
			if !strings.Contains(out, c.want) || !strings.Contains(out, "Verified OK") {
				t.Fatalf("%s block did not verify:\n%s", c.marker, out)
			}
		})
	}
}

func readmeBlock(t *testing.T, marker string) string {
	t.Helper()
	readme, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	_, rest, ok := strings.Cut(string(readme), "<!-- "+marker+":begin -->")
	block, _, ok2 := strings.Cut(rest, "<!-- "+marker+":end -->")
	if !ok || !ok2 {
		t.Fatalf("README has no %s markers", marker)
	}
	script := strings.TrimSpace(block)
	script = strings.TrimPrefix(script, "```sh")
	return strings.TrimSuffix(script, "```")
}

func runReadmeBlock(t *testing.T, marker string) string {
	for _, tool := range []string{"bash", "curl", "jq", "openssl"} {
		testenv.NeedsBackend(t, tool)
	}
	script := readmeBlock(t, marker)

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	script = strings.ReplaceAll(script, "127.0.0.1:8080", addr)

	work := t.TempDir()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		cmd := cli.NewRootCmd(cli.BuildInfo{Version: "test", Commit: "test"})
		cmd.SetArgs([]string{"serve", "--dev", "--data-dir", filepath.Join(work, "data"),
			"--config-dir", filepath.Join(work, "config"), "--listen", addr, "--log-level", "warn"})
		cmd.SetOut(new(bytes.Buffer))
		done <- cmd.ExecuteContext(ctx)
	}()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("serve: %v", err)
		}
	}()
	deadline := time.Now().Add(20 * time.Second)
	for {
		resp, err := http.Get("http://" + addr + "/healthz")
		if err == nil {
			resp.Body.Close()
			if _, err := os.Stat(filepath.Join(work, "data", "dev-api-key")); err == nil {
				break
			}
		}
		if time.Now().After(deadline) {
			t.Fatal("server did not come up")
		}
		time.Sleep(50 * time.Millisecond)
	}
	sh := exec.Command("bash", "-euo", "pipefail", "-c", script)
	sh.Dir = work
	out, err := sh.CombinedOutput()
	if err != nil {
		t.Fatalf("%s block failed: %v\n%s", marker, err, out)
	}
	return string(out)
}
