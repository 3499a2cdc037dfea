package cli_test

import (
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kmsgate/kmsgate/internal/apptest"
	"github.com/kmsgate/kmsgate/internal/errs"
)

// TestTenantCreateChecksProviders: the offline CLI knows the provider ids from kms.json and refuses
// unknown ones before anything is stored; the same request through the running server's admin
// socket is refused with the same code.
func TestTenantCreateChecksProviders(t *testing.T) {
	data, cfg := t.TempDir(), t.TempDir()
	kms := `{"defaultProvider":"db","providers":[{"id":"db","type":"db"},{"id":"other-db","type":"db"}]}`
	if err := os.WriteFile(filepath.Join(cfg, "kms.json"), []byte(kms), 0o600); err != nil {
		t.Fatal(err)
	}
	dirs := []string{"--data-dir", data, "--config-dir", cfg}
	for _, c := range []struct {
		args []string
		code string
	}{
		{[]string{"--providers", "nosuch", "--default-provider", "alsonope"}, "unknown_provider"},
		{[]string{"--default-provider", "alsonope"}, "unknown_provider"},
		{[]string{"--providers", "db", "--default-provider", "other-db"}, "default_provider_not_allowed"},
	} {
		out, err := run(t, append(append([]string{"tenant", "create", "t1"}, c.args...), dirs...)...)
		if !errors.Is(err, errs.BadInput) || errs.CodeOf(err) != c.code {
			t.Fatalf("offline create %v: %v %s, want a %s refusal", c.args, err, out, c.code)
		}
	}
	out, err := run(t, append([]string{"tenant", "list"}, dirs...)...)
	if err != nil || strings.Contains(out, `"t1"`) {
		t.Fatalf("a refused tenant was stored: %v %s", err, out)
	}
	out, err = run(t, append([]string{"tenant", "create", "t2", "--providers", "db,other-db", "--default-provider", "other-db"}, dirs...)...)
	if err != nil {
		t.Fatalf("offline create with configured providers: %v %s", err, out)
	}

	apptest.Start(t, apptest.Options{DataDir: data, ConfigDir: cfg})
	// Serve opens the admin socket in the background: wait for it, or the CLI would fall back to
	// the (locked) data dir.
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
	out, err = run(t, append([]string{"tenant", "create", "t3", "--providers", "nosuch"}, dirs...)...)
	if err == nil || !strings.Contains(err.Error(), "unknown_provider") {
		t.Fatalf("create through the socket with an unknown provider: %v %s", err, out)
	}
	out, err = run(t, append([]string{"tenant", "create", "t4", "--providers", "db", "--default-provider", "other-db"}, dirs...)...)
	if err == nil || !strings.Contains(err.Error(), "default_provider_not_allowed") {
		t.Fatalf("create through the socket with a default outside the allow-list: %v %s", err, out)
	}
}
