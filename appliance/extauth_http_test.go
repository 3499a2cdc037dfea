package appliance_test

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/kmsgate/kmsgate/appliance/tenants"
	"github.com/kmsgate/kmsgate/internal/apptest"
	"github.com/kmsgate/kmsgate/internal/keyutil"
	"github.com/kmsgate/kmsgate/internal/testenv"
)

// TestExternalIssuerOverHTTP drives the remote-KMS contract with identity tokens that a real
// third-party issuer (Vault's identity/oidc) signed, as EUDIPLO does in oauth2-client-credentials
// mode against an external token URL: create, sign (verified), import, delete. A token for
// another audience is a 401 that writes nothing, and kmsgate's own access tokens keep working
// beside the external issuer (each token goes to the verifier its issuer names).
func TestExternalIssuerOverHTTP(t *testing.T) {
	testenv.NeedsBackend(t, "vault")
	vi := testenv.StartVaultOIDC(t)
	aud := vi.Role("eudiplo", `{"tenant": "acme", "roles": "issuance:manage"}`, "5m")
	vi.Role("elsewhere", `{"tenant": "acme", "roles": "issuance:manage"}`, "5m")
	cfg := t.TempDir()
	authJSON, _ := json.Marshal(map[string]any{"issuers": []map[string]any{{
		"issuer": vi.Issuer, "jwksUrl": vi.JWKSURL, "audience": aud, "algorithms": []string{"ES256"},
		"tenantClaim": "tenant", "rolesClaim": "roles"}}})
	if err := os.WriteFile(filepath.Join(cfg, "auth.json"), authJSON, 0o600); err != nil {
		t.Fatal(err)
	}
	in := apptest.Start(t, apptest.Options{ConfigDir: cfg})
	apiKey := in.CreateTenant("acme")
	tok := vi.Token("eudiplo")

	msg := []byte("credential")
	sign := func(bearer, kid string) (int, []byte) {
		return in.Do("POST", "/keys/"+kid+"/sign", bearer, map[string]string{"data": base64.StdEncoding.EncodeToString(msg)})
	}
	verifyWith := func(pub *ecdsa.PublicKey, body []byte) {
		t.Helper()
		var r struct{ Signature string }
		apptest.JSON(t, body, &r)
		raw, err := base64.RawURLEncoding.DecodeString(r.Signature)
		if err != nil {
			t.Fatal(err)
		}
		der, err := keyutil.RawToDER(raw)
		if err != nil {
			t.Fatal(err)
		}
		d := sha256.Sum256(msg)
		if !ecdsa.VerifyASN1(pub, d[:], der) {
			t.Fatal("signature does not verify with crypto/ecdsa")
		}
	}

	st, body := in.Do("POST", "/keys", tok, map[string]string{"kid": "ext-1", "alg": "ES256"})
	if st != 200 {
		t.Fatalf("create with a Vault token: %d %s", st, body)
	}
	var created struct {
		PublicJWK keyutil.JWK `json:"publicJwk"`
	}
	apptest.JSON(t, body, &created)
	pub, err := keyutil.ParsePublicJWK(created.PublicJWK)
	if err != nil {
		t.Fatal(err)
	}
	st, body = sign(tok, "ext-1")
	if st != 200 {
		t.Fatalf("sign with a Vault token: %d %s", st, body)
	}
	verifyWith(pub, body)

	priv, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	jwk, _ := keyutil.PrivateJWK(priv, "", "ES256")
	if st, body := in.Do("POST", "/keys/ext-2/import", tok, map[string]any{"privateJwk": jwk, "alg": "ES256"}); st != 200 {
		t.Fatalf("import with a Vault token: %d %s", st, body)
	}
	st, body = sign(tok, "ext-2")
	if st != 200 {
		t.Fatalf("sign the imported key: %d %s", st, body)
	}
	verifyWith(&priv.PublicKey, body)
	if st, body := in.Do("DELETE", "/keys/ext-2", tok, nil); st != 204 {
		t.Fatalf("delete with a Vault token: %d %s", st, body)
	}
	if st, _ := sign(tok, "ext-2"); st != 404 {
		t.Fatalf("sign after delete: %d, want 404", st)
	}

	// Another audience: Vault signed it, but not for kmsgate.
	wrong := vi.Token("elsewhere")
	if st, body := in.Do("POST", "/keys", wrong, map[string]string{"kid": "never", "alg": "ES256"}); st != 401 {
		t.Fatalf("token for another audience: %d %s, want 401", st, body)
	}
	if st, _ := sign(tok, "never"); st != 404 {
		t.Fatalf("the refused create wrote a key: sign answered %d, want 404", st)
	}

	// kmsgate's own token beside the external issuer.
	st, body = in.Do("POST", "/oauth2/token", "", map[string]string{"grant_type": "client_credentials",
		"client_id": credentialID(apiKey), "client_secret": apiKey})
	if st != 200 {
		t.Fatalf("kmsgate token endpoint: %d %s", st, body)
	}
	var tr struct {
		AccessToken string `json:"access_token"`
	}
	apptest.JSON(t, body, &tr)
	st, body = sign(tr.AccessToken, "ext-1")
	if st != 200 {
		t.Fatalf("sign with a kmsgate token while auth.json lists Vault: %d %s", st, body)
	}
	verifyWith(pub, body)

	// Revoking the tenant refuses the external issuer's tokens too (the issuer knows nothing of
	// it), within the verifier's one-second memory of the tenant.
	if _, err := in.App.Tenants().Revoke(t.Context(), "acme", tenants.RevokeTenant); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(1500 * time.Millisecond)
	for {
		st, _ := sign(tok, "ext-1")
		if st == 401 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("a Vault token for a revoked tenant still answered %d after 1.5 s", st)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
