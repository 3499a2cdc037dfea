package testenv

import (
	"bytes"
	"encoding/json"
	"io"
	"net/http"
	"strings"
	"testing"
)

// VaultOIDC is a Vault dev server configured as an OIDC identity-token issuer: a named signing
// key, a userpass user (identity tokens need an entity, which the root token lacks) and roles whose
// templates put the tenant and roles into the token.
type VaultOIDC struct {
	t         testing.TB
	v         *Vault
	userToken string
	// Issuer and JWKSURL come from Vault's discovery document.
	Issuer  string
	JWKSURL string
}

// StartVaultOIDC starts a Vault dev server and configures it as an identity-token issuer.
func StartVaultOIDC(t testing.TB) *VaultOIDC {
	t.Helper()
	vi := &VaultOIDC{t: t, v: StartVault(t)}
	vi.call(vi.v.Token, "POST", "sys/auth/userpass", map[string]any{"type": "userpass"}, nil)
	vi.call(vi.v.Token, "PUT", "sys/policies/acl/oidc", map[string]any{
		"policy": `path "identity/oidc/token/*" { capabilities = ["read"] }`}, nil)
	vi.call(vi.v.Token, "POST", "auth/userpass/users/alice", map[string]any{"password": "pw-alice",
		"token_policies": "oidc"}, nil)
	vi.call(vi.v.Token, "POST", "identity/oidc/config", map[string]any{"issuer": vi.v.Addr}, nil)
	vi.call(vi.v.Token, "POST", "identity/oidc/key/k1", map[string]any{"allowed_client_ids": "*",
		"algorithm": "ES256", "rotation_period": "24h", "verification_ttl": "24h"}, nil)
	var login struct {
		Auth struct {
			ClientToken string `json:"client_token"`
		} `json:"auth"`
	}
	vi.call("", "POST", "auth/userpass/login/alice", map[string]any{"password": "pw-alice"}, &login)
	vi.userToken = login.Auth.ClientToken
	var disc struct {
		Issuer  string `json:"issuer"`
		JWKSURI string `json:"jwks_uri"`
	}
	vi.call("", "GET", "identity/oidc/.well-known/openid-configuration", nil, &disc)
	if disc.Issuer == "" || disc.JWKSURI == "" {
		t.Fatalf("vault discovery document lacks issuer or jwks_uri: %+v", disc)
	}
	vi.Issuer, vi.JWKSURL = disc.Issuer, disc.JWKSURI
	return vi
}

// Role creates an identity-token role signed by key k1 with the given claims template and ttl and
// returns its client id (the tokens' aud).
func (vi *VaultOIDC) Role(name, template, ttl string) string {
	vi.t.Helper()
	vi.call(vi.v.Token, "POST", "identity/oidc/role/"+name, map[string]any{"key": "k1", "ttl": ttl,
		"template": template}, nil)
	var r struct {
		Data struct {
			ClientID string `json:"client_id"`
		} `json:"data"`
	}
	vi.call(vi.v.Token, "GET", "identity/oidc/role/"+name, nil, &r)
	if r.Data.ClientID == "" {
		vi.t.Fatalf("vault role %s has no client_id", name)
	}
	return r.Data.ClientID
}

// Token reads a signed identity token for role from Vault, as alice.
func (vi *VaultOIDC) Token(role string) string {
	vi.t.Helper()
	var r struct {
		Data struct {
			Token string `json:"token"`
		} `json:"data"`
	}
	vi.call(vi.userToken, "GET", "identity/oidc/token/"+role, nil, &r)
	if strings.Count(r.Data.Token, ".") != 2 {
		vi.t.Fatalf("vault returned no compact JWS for role %s: %q", role, r.Data.Token)
	}
	return r.Data.Token
}

// Rotate rotates the signing key k1.
func (vi *VaultOIDC) Rotate() {
	vi.t.Helper()
	vi.call(vi.v.Token, "POST", "identity/oidc/key/k1/rotate", map[string]any{}, nil)
}

func (vi *VaultOIDC) call(token, method, path string, body any, out any) {
	vi.t.Helper()
	var rd io.Reader
	if body != nil {
		b, _ := json.Marshal(body)
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequest(method, vi.v.Addr+"/v1/"+path, rd)
	if err != nil {
		vi.t.Fatal(err)
	}
	if token != "" {
		req.Header.Set("X-Vault-Token", token)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		vi.t.Fatalf("vault %s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode/100 != 2 {
		vi.t.Fatalf("vault %s %s: %d %s", method, path, resp.StatusCode, b)
	}
	if out != nil {
		if err := json.Unmarshal(b, out); err != nil {
			vi.t.Fatalf("vault %s %s: decode %s: %v", method, path, b, err)
		}
	}
}

// SetClientID gives role the client id (the tokens' aud) clientID.
func (vi *VaultOIDC) SetClientID(role, clientID string) {
	vi.t.Helper()
	vi.call(vi.v.Token, "POST", "identity/oidc/role/"+role, map[string]any{"client_id": clientID}, nil)
}
