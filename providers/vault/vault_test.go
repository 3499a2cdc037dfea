package vault

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/vault/api"

	"github.com/kmsgate/kmsgate/internal/errs"
	"github.com/kmsgate/kmsgate/internal/testenv"
	"github.com/kmsgate/kmsgate/providers"
	"github.com/kmsgate/kmsgate/providers/providertest"
)

func newProvider(t *testing.T, cfg map[string]any) (*Provider, error) {
	t.Helper()
	cfg["id"], cfg["type"] = "vault", "vault"
	raw, _ := json.Marshal(cfg)
	p, err := New(context.Background(), providers.Config{ID: "vault", Type: "vault", Raw: raw}, nil)
	if err == nil {
		t.Cleanup(func() { p.Close() })
	}
	return p, err
}

func mustProvider(t *testing.T, cfg map[string]any) *Provider {
	t.Helper()
	p, err := newProvider(t, cfg)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func rootClient(t *testing.T, v *testenv.Vault) *api.Client {
	t.Helper()
	c, err := api.NewClient(&api.Config{Address: v.Addr})
	if err != nil {
		t.Fatal(err)
	}
	c.SetToken(v.Token)
	return c
}

// childToken creates a token with the root policy (the dev server has no other) and the given
// TTL and renewability.
func childToken(t *testing.T, c *api.Client, ttl string, renewable bool) string {
	t.Helper()
	s, err := c.Auth().Token().Create(&api.TokenCreateRequest{Policies: []string{"root"}, TTL: ttl,
		Renewable: &renewable})
	if err != nil {
		t.Fatal(err)
	}
	return s.Auth.ClientToken
}

func TestContractVault(t *testing.T) {
	v := testenv.StartVault(t)
	providertest.Run(t, providertest.Harness{
		New: func(t *testing.T) providers.Provider {
			return mustProvider(t, map[string]any{"vaultUrl": v.Addr + "/", "vaultToken": v.Token, "timeout": "5s"})
		},
		TenantScoped: true,
		StopBackend:  func(*testing.T) { v.Stop() },
		StartBackend: func(*testing.T) { v.Start(t) },
	})
}

// The tenant's mount is created on first use with the configured prefix, and the ExternalID
// records mount and key; a mount that disappears (Vault rebuilt) is recreated on the 404.
func TestMountPerTenant(t *testing.T) {
	v := testenv.StartVault(t)
	root := rootClient(t, v)
	p := mustProvider(t, map[string]any{"vaultUrl": v.Addr, "vaultToken": v.Token, "mountPrefix": "team-a/"})
	ctx := context.Background()
	ref, err := p.Generate(ctx, providers.KeySpec{Tenant: "acme/eu", KID: "chain-1-active", Alg: "ES256"})
	if err != nil {
		t.Fatal(err)
	}
	if ref.ExternalID != "team-a/acme_2Feu/chain-1-active" {
		t.Fatalf("ExternalID = %q", ref.ExternalID)
	}
	mounts, err := root.Sys().ListMounts()
	if err != nil {
		t.Fatal(err)
	}
	if m, ok := mounts["team-a/acme_2Feu/"]; !ok || m.Type != "transit" {
		t.Fatalf("transit mount team-a/acme_2Feu/ not created: %v", mounts)
	}
	// Key is non-exportable ecdsa-p256.
	sec, err := root.Logical().Read("team-a/acme_2Feu/keys/chain-1-active")
	if err != nil || sec == nil {
		t.Fatalf("read key: %v", err)
	}
	if sec.Data["type"] != "ecdsa-p256" || sec.Data["exportable"] != false {
		t.Fatalf("key is %v exportable=%v, want ecdsa-p256 non-exportable", sec.Data["type"], sec.Data["exportable"])
	}
	if _, err := p.Generate(ctx, providers.KeySpec{Tenant: "acme/eu", KID: "chain-1-active", Alg: "ES256"}); errs.KindOf(err) != errs.Conflict {
		t.Fatalf("second Generate of the same key: %v, want KindConflict (never silently share a key)", err)
	}
	// Unmount behind the provider's back: Generate must recreate the mount after the 404.
	if err := root.Sys().Unmount("team-a/acme_2Feu"); err != nil {
		t.Fatal(err)
	}
	if _, err := p.Generate(ctx, providers.KeySpec{Tenant: "acme/eu", KID: "chain-2", Alg: "ES256"}); err != nil {
		t.Fatalf("Generate after the mount vanished: %v", err)
	}
	// Two providers (two Vault entries in kms.json) sharing one Vault do not fight over mounts.
	p2 := mustProvider(t, map[string]any{"vaultUrl": v.Addr, "vaultToken": v.Token, "mountPrefix": "team-a/"})
	if _, err := p2.Generate(ctx, providers.KeySpec{Tenant: "acme/eu", KID: "chain-3", Alg: "ES256"}); err != nil {
		t.Fatalf("second provider on an existing mount: %v", err)
	}
}

// A renewable token with a short TTL outlives its TTL because the provider renews it.
func TestTokenRenewal(t *testing.T) {
	v := testenv.StartVault(t)
	root := rootClient(t, v)
	// 6s leaves the renewer a 3s margin (it renews at half the TTL) even on a loaded machine.
	tok := childToken(t, root, "6s", true)
	p := mustProvider(t, map[string]any{"vaultUrl": v.Addr, "vaultToken": tok})
	ctx := context.Background()
	ref, err := p.Generate(ctx, providers.KeySpec{Tenant: "t", KID: "k", Alg: "ES256"})
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(9 * time.Second)
	if _, err := p.SignMessage(ctx, ref, "ES256", []byte("still alive")); err != nil {
		t.Fatalf("sign 9s into a 6s renewable token: %v (renewal did not happen)", err)
	}
	sec, err := rootClient(t, v).Auth().Token().Lookup(tok)
	if err != nil {
		t.Fatal(err)
	}
	if ttl, _ := sec.TokenTTL(); ttl <= 0 {
		t.Fatalf("token TTL after renewals = %v", ttl)
	}
	if h := p.Health(ctx); !h.OK {
		t.Fatalf("health: %+v", h)
	}
}

// Expired and revoked tokens make Health fail with a message that says so.
func TestTokenExpiredOrRevoked(t *testing.T) {
	v := testenv.StartVault(t)
	root := rootClient(t, v)
	ctx := context.Background()

	revoked := childToken(t, root, "1h", false)
	pr := mustProvider(t, map[string]any{"vaultUrl": v.Addr, "vaultToken": revoked})
	if h := pr.Health(ctx); !h.OK {
		t.Fatalf("health before revocation: %+v", h)
	}
	if err := root.Auth().Token().RevokeOrphan(revoked); err != nil {
		t.Fatal(err)
	}
	h := pr.Health(ctx)
	if h.OK || !strings.Contains(h.Error, "vault token expired or revoked") {
		t.Fatalf("health with a revoked token: %+v", h)
	}
	if strings.Contains(h.Error, revoked) {
		t.Fatal("health error leaks the token")
	}

	short := childToken(t, root, "2s", false)
	pe := mustProvider(t, map[string]any{"vaultUrl": v.Addr, "vaultToken": short})
	time.Sleep(3 * time.Second)
	h = pe.Health(ctx)
	if h.OK || !strings.Contains(h.Error, "vault token expired or revoked") {
		t.Fatalf("health with an expired token: %+v", h)
	}
	_, err := pe.Generate(ctx, providers.KeySpec{Tenant: "t", KID: "k", Alg: "ES256"})
	if errs.KindOf(err) != errs.Forbidden || strings.Contains(err.Error(), short) {
		t.Fatalf("generate with an expired token: %v (kind %v), want KindForbidden without the token", err, errs.KindOf(err))
	}
}

// A token file is re-read when it changes (Vault Agent sink rotation).
func TestTokenFileRotation(t *testing.T) {
	v := testenv.StartVault(t)
	root := rootClient(t, v)
	file := filepath.Join(t.TempDir(), "token")
	first := childToken(t, root, "1h", false)
	if err := os.WriteFile(file, []byte(first+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	p := mustProvider(t, map[string]any{"vaultUrl": v.Addr, "vaultTokenFile": file})
	p.tok.mu.Lock()
	p.tok.checkEvery = 100 * time.Millisecond
	p.tok.mu.Unlock()
	ctx := context.Background()
	ref, err := p.Generate(ctx, providers.KeySpec{Tenant: "t", KID: "k", Alg: "ES256"})
	if err != nil {
		t.Fatal(err)
	}
	if err := root.Auth().Token().RevokeOrphan(first); err != nil {
		t.Fatal(err)
	}
	second := childToken(t, root, "1h", false)
	if err := os.WriteFile(file, []byte(second), 0o600); err != nil {
		t.Fatal(err)
	}
	time.Sleep(200 * time.Millisecond)
	if _, err := p.SignMessage(ctx, ref, "ES256", []byte("m")); err != nil {
		t.Fatalf("sign after token file rotation: %v", err)
	}
	if err := os.Remove(file); err != nil {
		t.Fatal(err)
	}
	time.Sleep(200 * time.Millisecond)
	if h := p.Health(ctx); h.OK || !strings.Contains(h.Error, "token file") {
		t.Fatalf("health with the token file gone: %+v", h)
	}
}

func TestConfig(t *testing.T) {
	bad := map[string]map[string]any{
		"missing url":      {"vaultToken": "x"},
		"no token":         {"vaultUrl": "http://127.0.0.1:1"},
		"token and file":   {"vaultUrl": "http://127.0.0.1:1", "vaultToken": "x", "vaultTokenFile": "/f"},
		"unknown field":    {"vaultUrl": "http://127.0.0.1:1", "vaultToken": "x", "transitMount": "t"},
		"bad timeout":      {"vaultUrl": "http://127.0.0.1:1", "vaultToken": "x", "timeout": "10"},
		"bad mount prefix": {"vaultUrl": "http://127.0.0.1:1", "vaultToken": "x", "mountPrefix": "/abs"},
	}
	for name, cfg := range bad {
		t.Run(name, func(t *testing.T) {
			if _, err := newProvider(t, cfg); err == nil {
				t.Fatal("accepted")
			}
		})
	}
	p := mustProvider(t, map[string]any{"vaultUrl": "http://127.0.0.1:1", "vaultToken": "s.secret-token-value", "timeout": "1s"})
	h := p.Health(context.Background())
	if h.OK || !strings.Contains(h.Error, "vault unreachable") || strings.Contains(h.Error, "secret-token-value") ||
		strings.Contains(h.Error, "127.0.0.1") {
		t.Fatalf("health of an unreachable vault: %+v", h)
	}
	if _, err := p.Import(context.Background(), providers.KeySpec{}, nil); errs.KindOf(err) != errs.NotSupported {
		t.Fatalf("Import: %v", err)
	}
}

func TestParseSignature(t *testing.T) {
	good := "vault:v3:" + strings.Repeat("A", 86)
	if v, raw, err := parseSignature(good); err != nil || v != 3 || len(raw) != 64 {
		t.Fatalf("parse %q: %d %d %v", good, v, len(raw), err)
	}
	for _, s := range []string{"", "v1:" + strings.Repeat("A", 86), "vault:v0:" + strings.Repeat("A", 86),
		"vault:vx:AAAA", "vault:v1:" + strings.Repeat("A", 94) /* 70 bytes, DER-sized */, "vault:v1:!!"} {
		if _, _, err := parseSignature(s); err == nil {
			t.Errorf("parseSignature(%q) accepted", s)
		}
	}
}

// A sealed Vault answers sys/health with 503: health must be down and name the state.
func TestHealthSealed(t *testing.T) {
	v := testenv.StartVault(t)
	p := mustProvider(t, map[string]any{"vaultUrl": v.Addr, "vaultToken": v.Token})
	ctx := context.Background()
	if h := p.Health(ctx); !h.OK {
		t.Fatalf("health before sealing: %+v", h)
	}
	if err := rootClient(t, v).Sys().Seal(); err != nil {
		t.Fatal(err)
	}
	h := p.Health(ctx)
	if h.OK || !strings.Contains(h.Error, "sealed") || !strings.Contains(h.Error, "503") {
		t.Fatalf("health of a sealed vault: %+v", h)
	}
	if _, err := p.Generate(ctx, providers.KeySpec{Tenant: "t", KID: "k", Alg: "ES256"}); errs.KindOf(err) != errs.Unavailable {
		t.Fatalf("generate on a sealed vault: %v (kind %v), want KindUnavailable", err, errs.KindOf(err))
	}
}
