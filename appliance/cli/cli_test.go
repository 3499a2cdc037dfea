package cli_test

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/kmsgate/kmsgate/internal/apptest"
)

// run returns what the command printed on stdout (stderr carries notes and warnings, see runSplit).
func run(t *testing.T, args ...string) (string, error) {
	t.Helper()
	out, _, err := runSplit(t, args...)
	return out, err
}

func TestTenantCLIOfflineAndThroughSocket(t *testing.T) {
	data := t.TempDir()
	// Server stopped: the CLI opens the data dir directly.
	out, err := run(t, "tenant", "create", "issuer-1", "--name", "Issuer One", "--data-dir", data)
	if err != nil {
		t.Fatalf("offline create: %v %s", err, out)
	}
	var created struct {
		ID     string   `json:"id"`
		APIKey string   `json:"apiKey"`
		Roles  []string `json:"roles"`
	}
	if err := json.Unmarshal([]byte(out), &created); err != nil || created.ID != "issuer-1" ||
		!strings.HasPrefix(created.APIKey, "kmsgate_") || strings.Join(created.Roles, ",") != "manage,sign" {
		t.Fatalf("offline create printed %q (%v)", out, err)
	}
	if _, err := run(t, "tenant", "create", "issuer-1", "--data-dir", data); err == nil {
		t.Fatal("creating an existing tenant must fail")
	}

	// Server running: the data dir is locked, so the CLI must go through the admin socket.
	in := apptest.Start(t, apptest.Options{DataDir: data})
	if st, body := in.Do("POST", "/keys", created.APIKey, map[string]string{"kid": "k"}); st != 200 {
		t.Fatalf("offline-created key does not work on the server: %d %s", st, body)
	}
	out, err = run(t, "tenant", "create", "issuer-2", "--roles", "sign", "--data-dir", data)
	if err != nil {
		t.Fatalf("create through socket: %v %s", err, out)
	}
	var c2 struct{ APIKey string }
	json.Unmarshal([]byte(out), &c2)
	if st, _ := in.Do("POST", "/keys", c2.APIKey, map[string]string{"kid": "k"}); st != 403 {
		t.Fatalf("a sign-only key may not create keys, got %d", st)
	}
	out, err = run(t, "tenant", "list", "--data-dir", data)
	if err != nil || !strings.Contains(out, `"issuer-1"`) || !strings.Contains(out, `"issuer-2"`) || strings.Contains(out, "kmsgate_") {
		t.Fatalf("list: %v %s", err, out)
	}
	out, err = run(t, "tenant", "revoke", "issuer-1", "--data-dir", data)
	if err != nil || !strings.Contains(out, "revoked") {
		t.Fatalf("revoke: %v %s", err, out)
	}
	// Revocation through the socket takes effect in the running server at once.
	if st, _ := in.Do("GET", "/keys/k", created.APIKey, nil); st != 401 {
		t.Fatalf("revoked key still accepted: %d", st)
	}
	if _, err := run(t, "tenant", "revoke", "no-such-tenant", "--data-dir", data); err == nil {
		t.Fatal("revoking an unknown tenant must fail")
	}
}

func TestConfigCheckRedacts(t *testing.T) {
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "kms.json"), []byte(`{"defaultProvider":"db","providers":[
	 {"id":"v","type":"vault","vaultUrl":"http://127.0.0.1:8200","vaultToken":"${TEST_VAULT_TOKEN}"}]}`), 0o600)
	t.Setenv("TEST_VAULT_TOKEN", "hvs.super-secret-token")
	out, err := run(t, "config", "check", "--config-dir", dir)
	if err != nil || strings.Contains(out, "super-secret") || !strings.Contains(out, "<redacted>") || !strings.Contains(out, "config OK") {
		t.Fatalf("config check: %v\n%s", err, out)
	}
	os.WriteFile(filepath.Join(dir, "kms.json"), []byte(`{"defaultProvider":"nope","providers":[]}`), 0o600)
	if out, err := run(t, "config", "check", "--config-dir", dir); err == nil || !strings.Contains(err.Error(), "defaultProvider") {
		t.Fatalf("invalid config accepted: %v %s", err, out)
	}
	out, err = run(t, "version")
	if err != nil || !strings.Contains(out, "1.2.3") {
		t.Fatalf("version: %v %s", err, out)
	}
}
