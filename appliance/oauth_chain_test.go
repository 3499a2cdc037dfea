package appliance_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/sha256"
	"encoding/base64"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/kmsgate/kmsgate/appliance"
	"github.com/kmsgate/kmsgate/internal/apptest"
	"github.com/kmsgate/kmsgate/internal/keyutil"
)

// TestOAuthChainedGateways: kmsgate A's http provider authenticates to kmsgate B with OAuth2
// client credentials at B's token endpoint. A's own system key then lives behind B too (A's
// default provider), so A's token endpoint works through B's.
func TestOAuthChainedGateways(t *testing.T) {
	b := apptest.Start(t, apptest.Options{})
	bKey := b.CreateTenant("gateway-a")
	a := apptest.Start(t, apptest.Options{KMSJSON: fmt.Sprintf(`{"defaultProvider":"b","providers":[{"id":"b","type":"http",`+
		`"baseUrl":%q,"auth":{"type":"oauth2-client-credentials","tokenUrl":%q,"clientId":%q,"clientSecret":"${B_KEY}"}}]}`,
		b.URL, b.URL+"/api/oauth2/token", credentialID(bKey)), Env: map[string]string{"B_KEY": bKey}})
	if got := a.App.Tokens().Keys().ProviderID(); got != "b" {
		t.Fatalf("A's system key in %q", got)
	}
	aKey := a.CreateTenant("issuer")
	st, out := eudiploTokenFetch(t, a.URL+"/oauth2/token", credentialID(aKey), aKey)
	if st != 200 {
		t.Fatalf("A's token: %d %v", st, out)
	}
	tok := out["access_token"].(string)
	st, body := a.Do("POST", "/keys", tok, map[string]string{"kid": "k1", "alg": "ES256"})
	if st != 200 {
		t.Fatalf("create on A: %d %s", st, body)
	}
	var gen struct {
		PublicJWK keyutil.JWK `json:"publicJwk"`
	}
	apptest.JSON(t, body, &gen)
	pub, err := keyutil.ParsePublicJWK(gen.PublicJWK)
	if err != nil {
		t.Fatal(err)
	}
	msg := []byte("to be signed")
	st, body = a.Do("POST", "/keys/k1/sign", tok, map[string]string{"data": base64.StdEncoding.EncodeToString(msg)})
	if st != 200 {
		t.Fatalf("sign on A: %d %s", st, body)
	}
	var sr struct{ Signature string }
	apptest.JSON(t, body, &sr)
	rs, err := base64.RawURLEncoding.DecodeString(sr.Signature)
	if err != nil {
		t.Fatal(err)
	}
	h := sha256.Sum256(msg)
	if !ecdsa.Verify(pub, h[:], bigInt(rs[:32]), bigInt(rs[32:])) {
		t.Fatal("signature through A and B does not verify")
	}
	if st, body = a.Do("DELETE", "/keys/k1", tok, nil); st != 204 && st != 200 {
		t.Fatalf("delete on A: %d %s", st, body)
	}
}

// TestExternalIssuerChainedGateways chains A → B with A's http provider in
// oauth2-client-credentials mode against an EXTERNAL token URL: a third kmsgate, C, plays the
// organisation's OAuth2 server (client credentials, ES256 JWTs, a JWKS URL), and B trusts C
// through auth.json. B never sees an API key of its own.
func TestExternalIssuerChainedGateways(t *testing.T) {
	c := apptest.Start(t, apptest.Options{Tweak: func(o *appliance.Options) { o.PublicURL = "https://idp.example.test" }})
	cKey := c.CreateTenant("gateway-a")
	cfg := t.TempDir()
	authJSON := fmt.Sprintf(`{"issuers":[{"issuer":"https://idp.example.test","jwksUrl":%q,"audience":"https://idp.example.test",`+
		`"algorithms":["ES256"],"tenantClaim":"tenant","rolesClaim":"roles"}]}`, c.URL+"/.well-known/jwks.json")
	if err := os.WriteFile(filepath.Join(cfg, "auth.json"), []byte(authJSON), 0o600); err != nil {
		t.Fatal(err)
	}
	b := apptest.Start(t, apptest.Options{ConfigDir: cfg})
	b.CreateTenant("gateway-a")
	a := apptest.Start(t, apptest.Options{KMSJSON: fmt.Sprintf(`{"defaultProvider":"b","providers":[{"id":"b","type":"http",`+
		`"baseUrl":%q,"auth":{"type":"oauth2-client-credentials","tokenUrl":%q,"clientId":%q,"clientSecret":"${C_KEY}"}}]}`,
		b.URL, c.URL+"/oauth2/token", credentialID(cKey)), Env: map[string]string{"C_KEY": cKey}})
	aKey := a.CreateTenant("issuer")
	ctx := context.Background()
	before, err := b.App.KeyCount(ctx, "gateway-a")
	if err != nil {
		t.Fatal(err)
	}

	st, body := a.Do("POST", "/keys", aKey, map[string]string{"kid": "k1", "alg": "ES256"})
	if st != 200 {
		t.Fatalf("create on A (backed by B, token from C): %d %s", st, body)
	}
	// The key lives on B under gateway-a, the tenant C's token names.
	if n, err := b.App.KeyCount(ctx, "gateway-a"); err != nil || n != before+1 {
		t.Fatalf("keys on B for gateway-a after the create: %d (before %d) %v", n, before, err)
	}
	var gen struct {
		PublicJWK keyutil.JWK `json:"publicJwk"`
	}
	apptest.JSON(t, body, &gen)
	pub, err := keyutil.ParsePublicJWK(gen.PublicJWK)
	if err != nil {
		t.Fatal(err)
	}
	msg := []byte("to be signed")
	st, body = a.Do("POST", "/keys/k1/sign", aKey, map[string]string{"data": base64.StdEncoding.EncodeToString(msg)})
	if st != 200 {
		t.Fatalf("sign on A: %d %s", st, body)
	}
	var sr struct{ Signature string }
	apptest.JSON(t, body, &sr)
	rs, err := base64.RawURLEncoding.DecodeString(sr.Signature)
	if err != nil {
		t.Fatal(err)
	}
	h := sha256.Sum256(msg)
	if !ecdsa.Verify(pub, h[:], bigInt(rs[:32]), bigInt(rs[32:])) {
		t.Fatal("signature through A and B does not verify")
	}
	if st, body = a.Do("DELETE", "/keys/k1", aKey, nil); st != 204 {
		t.Fatalf("delete on A: %d %s", st, body)
	}
	if n, err := b.App.KeyCount(ctx, "gateway-a"); err != nil || n != before {
		t.Fatalf("keys on B for gateway-a after the delete: %d, want %d (%v)", n, before, err)
	}
}
