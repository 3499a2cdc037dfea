package cli_test

import (
	"encoding/json"
	"net"
	"path/filepath"
	"testing"
	"time"

	"github.com/kmsgate/kmsgate/appliance/authn"
	"github.com/kmsgate/kmsgate/internal/apptest"
)

// TestSystemKeyRotate: `kmsgate system-key rotate` makes a new key sign tokens through the running
// server; /.well-known/jwks.json then publishes both, and a token signed before the rotation is
// still accepted. Without a running server the command refuses.
func TestSystemKeyRotate(t *testing.T) {
	data := t.TempDir()
	if _, err := run(t, "system-key", "rotate", "--data-dir", data); err == nil {
		t.Fatal("rotate without a running server succeeded")
	}
	in := apptest.Start(t, apptest.Options{DataDir: data})
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		c, err := net.Dial("unix", filepath.Join(data, "admin.sock"))
		if err == nil {
			c.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("admin socket never answered")
		}
	}
	key := in.CreateTenant("acme")
	kids := func() []string {
		t.Helper()
		st, body := in.Do("GET", "/.well-known/jwks.json", "", nil)
		if st != 200 {
			t.Fatalf("jwks: %d %s", st, body)
		}
		var set struct {
			Keys []struct {
				Kid string `json:"kid"`
			} `json:"keys"`
		}
		apptest.JSON(t, body, &set)
		var out []string
		for _, k := range set.Keys {
			out = append(out, k.Kid)
		}
		return out
	}
	before := kids()
	if len(before) != 1 {
		t.Fatalf("jwks before the rotation: %v, want one key", before)
	}
	old, err := in.App.Tokens().ClientCredentials(t.Context(), authn.TokenRequest{GrantType: "client_credentials",
		ClientID: key[len("kmsgate_") : len("kmsgate_")+16], ClientSecret: key})
	if err != nil {
		t.Fatal(err)
	}

	out, err := run(t, "system-key", "rotate", "--data-dir", data)
	if err != nil {
		t.Fatalf("rotate: %v %s", err, out)
	}
	var res struct {
		KID string `json:"kid"`
	}
	if err := json.Unmarshal([]byte(out), &res); err != nil || res.KID == "" || res.KID == before[0] {
		t.Fatalf("rotate printed %s (%v); old kid %s", out, err, before[0])
	}
	after := kids()
	if len(after) != 2 || !contains(after, res.KID) || !contains(after, before[0]) {
		t.Fatalf("jwks after the rotation: %v, want the new %s and the old %s", after, res.KID, before[0])
	}
	if st, body := in.Do("POST", "/keys", old.AccessToken, map[string]string{"kid": "k1"}); st != 200 {
		t.Fatalf("a token from before the rotation: %d %s", st, body)
	}
}

func contains(list []string, s string) bool {
	for _, v := range list {
		if v == s {
			return true
		}
	}
	return false
}
