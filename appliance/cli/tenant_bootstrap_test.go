package cli_test

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kmsgate/kmsgate/appliance/cli"
	"github.com/kmsgate/kmsgate/internal/apptest"
)

// runSplit runs the CLI and returns stdout and stderr apart.
func runSplit(t *testing.T, args ...string) (string, string, error) {
	t.Helper()
	cmd := cli.NewRootCmd(cli.BuildInfo{Version: "1.2.3", Commit: "abc"})
	var out, errOut bytes.Buffer
	cmd.SetOut(&out)
	cmd.SetErr(&errOut)
	cmd.SetArgs(args)
	err := cmd.Execute()
	return out.String(), errOut.String(), err
}

// TestTenantCreateReportsBootstrap: `tenant create` through a running server prints what the
// key-chain bootstrap created, skipped and failed. With the tenant's provider down the failure is
// reported (stdout JSON and a WARNING on stderr) with a safe reason — no backend address — and
// a tenant whose allow-list excludes db gets no encrypt chain on db.
func TestTenantCreateReportsBootstrap(t *testing.T) {
	data, cfg := t.TempDir(), t.TempDir()
	dead, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := dead.Addr().String()
	dead.Close() // nothing listens there: the remote KMS is down
	kms := fmt.Sprintf(`{"defaultProvider":"db","providers":[{"id":"db","type":"db"},`+
		`{"id":"remote","type":"http","baseUrl":"http://%s/kms-secret-path"}]}`, addr)
	if err := os.WriteFile(filepath.Join(cfg, "kms.json"), []byte(kms), 0o600); err != nil {
		t.Fatal(err)
	}
	in := apptest.Start(t, apptest.Options{DataDir: data, ConfigDir: cfg})
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		c, err := net.Dial("unix", filepath.Join(data, "admin.sock"))
		if err == nil {
			c.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("admin socket not listening: %v", err)
		}
	}
	dirs := []string{"--data-dir", data, "--config-dir", cfg}
	type result struct {
		ID        string
		APIKey    string
		Bootstrap struct {
			Chains []struct{ UsageType, Status, KMSProvider, Reason, Code string }
		}
	}
	parse := func(out string) (result, map[string]string) {
		var r result
		if err := json.Unmarshal([]byte(out), &r); err != nil {
			t.Fatalf("create printed %q: %v", out, err)
		}
		st := map[string]string{}
		for _, c := range r.Bootstrap.Chains {
			st[c.UsageType] = c.Status
			if strings.Contains(c.Reason, addr) || strings.Contains(c.Reason, "kms-secret-path") {
				t.Errorf("bootstrap reason leaks the backend: %q", c.Reason)
			}
		}
		return r, st
	}

	// Provider down: access and attestation failed, encrypt created on db.
	out, errOut, err := runSplit(t, append([]string{"tenant", "create", "down", "--default-provider", "remote"}, dirs...)...)
	if err != nil {
		t.Fatalf("create: %v %s %s", err, out, errOut)
	}
	r, st := parse(out)
	if r.APIKey == "" || st["access"] != "failed" || st["attestation"] != "failed" || st["encrypt"] != "created" {
		t.Fatalf("bootstrap report: %s", out)
	}
	if !strings.Contains(errOut, "WARNING") || !strings.Contains(errOut, "access") || strings.Contains(errOut, addr) {
		t.Fatalf("stderr does not say clearly what failed: %q", errOut)
	}

	// Allow-list without db: no encrypt chain, and the report says it was skipped.
	out, errOut, err = runSplit(t, append([]string{"tenant", "create", "hsm-only", "--providers", "remote",
		"--default-provider", "remote"}, dirs...)...)
	if err != nil {
		t.Fatalf("create: %v %s %s", err, out, errOut)
	}
	if _, st = parse(out); st["encrypt"] != "skipped" {
		t.Fatalf("encrypt with db outside the allow-list: %s", out)
	}
	var list []struct{ KMSProvider string }
	r, _ = parse(out)
	apptest.JSON(t, func() []byte {
		code, b := in.Do("GET", "/key-chain", r.APIKey, nil)
		if code != 200 {
			t.Fatalf("list: %d %s", code, b)
		}
		return b
	}(), &list)
	for _, c := range list {
		if c.KMSProvider == "db" {
			t.Fatal("a tenant restricted to remote got a chain on db")
		}
	}

	// All fine: everything created, nothing on stderr.
	out, errOut, err = runSplit(t, append([]string{"tenant", "create", "ok"}, dirs...)...)
	if err != nil {
		t.Fatal(err)
	}
	if _, st = parse(out); st["access"] != "created" || st["attestation"] != "created" || st["encrypt"] != "created" || errOut != "" {
		t.Fatalf("healthy bootstrap: %s / %q", out, errOut)
	}
}
