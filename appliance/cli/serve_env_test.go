package cli_test

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
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

// TestServeKeyChainLegacyStatus: KMSGATE_KEYCHAIN_LEGACY_STATUS=true makes the served /key-chain
// answer PUT with the older 200 (on /api/key-chain too), and a value that is not a boolean, in the
// variable or the flag, stops serve before it starts.
func TestServeKeyChainLegacyStatus(t *testing.T) {
	for _, bad := range []struct{ env, flag string }{{"maybe", ""}, {"yes please", ""}, {"", "maybe"}} {
		t.Setenv("KMSGATE_KEYCHAIN_LEGACY_STATUS", bad.env)
		data := t.TempDir()
		args := []string{"serve", "--dev", "--listen", "127.0.0.1:0", "--data-dir", data, "--config-dir", t.TempDir()}
		if bad.flag != "" {
			args = append(args, "--keychain-legacy-status="+bad.flag)
		}
		cmd := cli.NewRootCmd(cli.BuildInfo{Version: "test"})
		var out bytes.Buffer
		cmd.SetOut(&out)
		cmd.SetErr(&out)
		cmd.SetArgs(args)
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		err := cmd.ExecuteContext(ctx)
		cancel()
		if err == nil || (bad.env != "" && !strings.Contains(err.Error(), "KMSGATE_KEYCHAIN_LEGACY_STATUS")) {
			t.Fatalf("env %q flag %q: serve answered %v, want a startup error", bad.env, bad.flag, err)
		}
		if _, err := os.Stat(filepath.Join(data, "dev-api-key")); err == nil {
			t.Fatalf("env %q flag %q: serve started before refusing the value", bad.env, bad.flag)
		}
	}

	t.Setenv("KMSGATE_KEYCHAIN_LEGACY_STATUS", "TRUE")
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	data := t.TempDir()
	cmd := cli.NewRootCmd(cli.BuildInfo{Version: "test"})
	var out bytes.Buffer
	cmd.SetOut(&out)
	cmd.SetErr(&out)
	cmd.SetArgs([]string{"serve", "--dev", "--listen", addr, "--data-dir", data, "--config-dir", t.TempDir(),
		"--shutdown-grace", "5s", "--log-level", "warn"})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- cmd.ExecuteContext(ctx) }()
	var key []byte
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if key, err = os.ReadFile(filepath.Join(data, "dev-api-key")); err == nil && len(key) > 0 {
			if resp, err := http.Get("http://" + addr + "/healthz"); err == nil {
				resp.Body.Close()
				break
			}
		}
		select {
		case err := <-done:
			t.Fatalf("serve ended early: %v\n%s", err, out.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatal("server did not start")
		}
	}
	send := func(method, path, body string) (int, []byte) {
		req, _ := http.NewRequest(method, "http://"+addr+path, strings.NewReader(body))
		req.Header.Set("Authorization", "Bearer "+strings.TrimSpace(string(key)))
		req.Header.Set("Content-Type", "application/json")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, b
	}
	st, b := send("POST", "/api/key-chain", `{"usageType":"access","type":"standalone"}`)
	var created struct{ ID string }
	if st != 201 || json.Unmarshal(b, &created) != nil || created.ID == "" {
		t.Fatalf("create: %d %s", st, b)
	}
	for _, p := range []string{"/key-chain/", "/api/key-chain/"} {
		if st, b := send("PUT", p+created.ID, `{"description":"legacy"}`); st != 200 || len(b) != 0 {
			t.Fatalf("PUT %s under the legacy switch: %d %q, want 200 and no body", p, st, b)
		}
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("serve: %v\n%s", err, out.String())
	}
}
