package extauth_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/kmsgate/kmsgate/appliance/extauth"
	"github.com/kmsgate/kmsgate/appliance/tenants"
)

func env(m map[string]string) func(string) (string, bool) {
	return func(k string) (string, bool) { v, ok := m[k]; return v, ok }
}

const goodIssuer = `{"issuer":"https://idp.example/realms/eudiplo","jwksUrl":"https://idp.example/certs",
 "audience":"kmsgate","algorithms":["ES256","RS256"],"tenantClaim":"tenant","rolesClaim":"realm_access.roles"}`

func TestParse(t *testing.T) {
	iss, err := extauth.Parse([]byte(`{"issuers":[`+goodIssuer+`,
	 {"issuer":"${ISS}","jwksUrl":"${JWKS:http://127.0.0.1:8200/v1/identity/oidc/.well-known/keys}",
	  "audience":"${AUD}","algorithms":["EdDSA"],"tenantClaim":"t","rolesClaim":"scope",
	  "roleMap":{"kms:sign":["sign"]}}]}`), env(map[string]string{"ISS": "http://127.0.0.1:8200/v1/identity/oidc",
		"AUD": "client-1"}))
	if err != nil {
		t.Fatal(err)
	}
	if len(iss) != 2 || iss[1].Issuer != "http://127.0.0.1:8200/v1/identity/oidc" || iss[1].Audience != "client-1" ||
		iss[1].JWKSURL != "http://127.0.0.1:8200/v1/identity/oidc/.well-known/keys" ||
		iss[1].RoleMap["kms:sign"][0] != "sign" || iss[0].RolesClaim != "realm_access.roles" {
		t.Fatalf("parsed %+v", iss)
	}
}

func TestParseRefuses(t *testing.T) {
	with := func(field, value string) string {
		// Replace one field of goodIssuer (value is raw JSON, "" drops the field).
		parts := map[string]string{"issuer": `"https://idp.example/realms/eudiplo"`, "jwksUrl": `"https://idp.example/certs"`,
			"audience": `"kmsgate"`, "algorithms": `["ES256"]`, "tenantClaim": `"tenant"`, "rolesClaim": `"roles"`}
		parts[field] = value
		var b strings.Builder
		b.WriteString(`{"issuers":[{`)
		first := true
		for _, k := range []string{"issuer", "jwksUrl", "audience", "algorithms", "tenantClaim", "rolesClaim", "roleMap", "audiance"} {
			if v := parts[k]; v != "" {
				if !first {
					b.WriteString(",")
				}
				first = false
				b.WriteString(`"` + k + `":` + v)
			}
		}
		b.WriteString(`}]}`)
		return b.String()
	}
	for _, tc := range []struct{ name, doc, want string }{
		{"unknown top-level field", `{"issuers":[],"extra":1}`, "unknown field"},
		{"unknown issuer field", with("audiance", `"x"`), `unknown field "audiance"`},
		{"trailing data", `{"issuers":[]} {}`, "trailing data"},
		{"empty issuer", with("issuer", `""`), `"issuer" is required`},
		{"no audience", with("audience", ""), `"audience" is required`},
		{"alg none", with("algorithms", `["ES256","none"]`), `"none" is never accepted`},
		{"HS256", with("algorithms", `["HS256"]`), `"HS256" is never accepted`},
		{"hs512 lower case", with("algorithms", `["hs512"]`), `is never accepted`},
		{"unknown alg", with("algorithms", `["ES257"]`), `unknown algorithm "ES257"`},
		{"no algorithms", with("algorithms", `[]`), `"algorithms" is required`},
		{"http jwks on a network host", with("jwksUrl", `"http://idp.example/certs"`), "must be https"},
		{"ftp jwks", with("jwksUrl", `"ftp://idp.example/certs"`), "scheme must be https"},
		{"no jwksUrl", with("jwksUrl", ""), `"jwksUrl": is required`},
		{"credentials in jwksUrl", with("jwksUrl", `"https://u:p@idp.example/certs"`), "must not carry credentials"},
		{"no tenantClaim", with("tenantClaim", ""), `"tenantClaim" is required`},
		{"no rolesClaim", with("rolesClaim", ""), `"rolesClaim" is required`},
		{"roleMap to admin", with("roleMap", `{"boss":["admin"]}`), "roleMap"},
		{"roleMap to unknown", with("roleMap", `{"boss":["root"]}`), "roleMap"},
		{"roleMap to nothing", with("roleMap", `{"boss":[]}`), "maps to no role"},
		{"duplicate issuer", `{"issuers":[` + goodIssuer + `,` + goodIssuer + `]}`, "duplicate issuer"},
		{"unset placeholder", with("audience", `"${NOPE}"`), "NOPE"},
		{"issuer not an object", `{"issuers":["x"]}`, "must be an object"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := extauth.Parse([]byte(tc.doc), env(nil))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Parse(%s) = %v, want an error containing %q", tc.doc, err, tc.want)
			}
		})
	}
}

func TestLoad(t *testing.T) {
	dir := t.TempDir()
	iss, err := extauth.Load(dir, env(nil))
	if err != nil || iss != nil {
		t.Fatalf("missing auth.json: %v, %v; want no issuers", iss, err)
	}
	if err := os.WriteFile(filepath.Join(dir, extauth.FileName), []byte(`{"issuers":[{"issuer":"x"}]}`), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := extauth.Load(dir, env(nil)); err == nil || !strings.Contains(err.Error(), "auth.json") {
		t.Fatalf("bad auth.json: %v, want an error naming the file", err)
	}
}

// TestNoIssuers: a verifier without issuers refuses every token without any network access.
func TestNoIssuers(t *testing.T) {
	v, err := extauth.New(nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if len(v.Issuers()) != 0 {
		t.Fatalf("Issuers() = %v", v.Issuers())
	}
	if _, err := v.VerifyToken(context.Background(), "a.b.c"); !errors.Is(err, tenants.ErrUnauthenticated) {
		t.Fatalf("got %v, want ErrUnauthenticated", err)
	}
}

// The API's token seam (api.Deps.Tokens) takes this shape; the verifier must keep fitting it.
var _ interface {
	VerifyToken(ctx context.Context, raw string) (*tenants.Principal, error)
} = (*extauth.Verifier)(nil)
