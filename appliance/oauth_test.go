package appliance_test

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"math/big"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"testing"
	"time"

	jose "github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"

	"github.com/kmsgate/kmsgate/appliance"
	"github.com/kmsgate/kmsgate/appliance/authn"
	"github.com/kmsgate/kmsgate/appliance/tenants"
	"github.com/kmsgate/kmsgate/internal/apptest"
	"github.com/kmsgate/kmsgate/internal/keyutil"
	"github.com/kmsgate/kmsgate/internal/testenv"
)

// eudiploTokenFetch sends exactly what EUDIPLO's http adapter sends in oauth2-client-credentials
// mode: a form body with the client's id and secret, no Basic, no scope.
func eudiploTokenFetch(t *testing.T, tokenURL, clientID, secret string) (int, map[string]any) {
	t.Helper()
	form := url.Values{"grant_type": {"client_credentials"}, "client_id": {clientID}, "client_secret": {secret}}
	resp, err := http.Post(tokenURL, "application/x-www-form-urlencoded", strings.NewReader(form.Encode()))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var out map[string]any
	b, _ := io.ReadAll(resp.Body)
	if err := json.Unmarshal(b, &out); err != nil {
		t.Fatalf("token answer %d is not JSON: %s", resp.StatusCode, b)
	}
	return resp.StatusCode, out
}

// tokenRequest posts a token request with an optional Basic header and content type.
func tokenRequest(t *testing.T, tokenURL, contentType, body string, basic []string) (int, http.Header, map[string]any) {
	t.Helper()
	req, err := http.NewRequest("POST", tokenURL, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", contentType)
	if basic != nil {
		req.SetBasicAuth(basic[0], basic[1])
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var out map[string]any
	b, _ := io.ReadAll(resp.Body)
	if err := json.Unmarshal(b, &out); err != nil {
		t.Fatalf("token answer %d is not JSON: %s", resp.StatusCode, b)
	}
	return resp.StatusCode, resp.Header, out
}

func credentialID(apiKey string) string {
	return strings.SplitN(strings.TrimPrefix(apiKey, "kmsgate_"), "_", 2)[0]
}

// fetchJWKS reads /.well-known/jwks.json as an independent verifier would.
func fetchJWKS(t *testing.T, in *apptest.Instance) jose.JSONWebKeySet {
	t.Helper()
	st, body := in.Do("GET", "/.well-known/jwks.json", "", nil)
	if st != 200 {
		t.Fatalf("jwks: %d %s", st, body)
	}
	var set jose.JSONWebKeySet
	apptest.JSON(t, body, &set)
	return set
}

// hsmGateway starts kmsgate with SoftHSM2 as its default (so system-key) provider.
func hsmGateway(t *testing.T, tweak func(*appliance.Options)) *apptest.Instance {
	hsm := testenv.NewSoftHSM(t, 1)
	return apptest.Start(t, apptest.Options{Tweak: tweak, KMSJSON: fmt.Sprintf(
		`{"defaultProvider":"hsm","providers":[{"id":"hsm","type":"pkcs11","library":%q,"slot":%q,"pin":"${PIN}"},`+
			`{"id":"db","type":"db"}]}`,
		hsm.Library, hsm.Tokens[0].Label), Env: map[string]string{"PIN": hsm.Tokens[0].PIN}})
}

// TestOAuthEUDIPLOClient: a client doing what EUDIPLO's adapter does in oauth2-client-credentials
// mode gets a token from kmsgate (system key in SoftHSM2) and creates, signs with, imports and
// deletes keys with it; the token verifies independently against the published JWKS. The system
// key does not count against the tenant's quota (2 keys here, both used) and is not in its /jwks.
func TestOAuthEUDIPLOClient(t *testing.T) {
	in := hsmGateway(t, func(o *appliance.Options) { o.MaxKeysPerTenant = 2 })
	// Without the key-chain bootstrap, so the tenant's quota of 2 is all the test's; its keys in
	// db, which can import (the system key is in the HSM, the default provider).
	res, err := in.App.Tenants().CreateTenant(context.Background(), tenants.CreateTenantRequest{ID: "acme", DefaultProvider: "db"})
	if err != nil {
		t.Fatal(err)
	}
	apiKey := res.APIKey
	clientID := credentialID(apiKey)

	// Discovery.
	st, body := in.Do("GET", "/.well-known/oauth-authorization-server", "", nil)
	if st != 200 {
		t.Fatalf("metadata: %d %s", st, body)
	}
	var md map[string]any
	apptest.JSON(t, body, &md)
	const iss = "https://issuer.example.test"
	if md["issuer"] != iss || md["token_endpoint"] != iss+"/oauth2/token" || md["jwks_uri"] != iss+"/.well-known/jwks.json" {
		t.Fatalf("metadata: %s", body)
	}
	if fmt.Sprint(md["grant_types_supported"]) != "[client_credentials]" ||
		fmt.Sprint(md["token_endpoint_auth_methods_supported"]) != "[client_secret_basic client_secret_post]" {
		t.Fatalf("metadata: %s", body)
	}
	set := fetchJWKS(t, in)
	if len(set.Keys) != 1 || set.Keys[0].Algorithm != "ES256" || set.Keys[0].Use != "sig" || !set.Keys[0].Valid() {
		t.Fatalf("jwks: %+v", set)
	}
	if _, isPub := set.Keys[0].Key.(*ecdsa.PublicKey); !isPub {
		t.Fatalf("jwks key is %T", set.Keys[0].Key)
	}

	if got := in.App.Tokens().Keys().ProviderID(); got != "hsm" {
		t.Fatalf("system key in provider %q, want the default provider hsm", got)
	}

	// EUDIPLO's request at EUDIPLO's path: 201; at the RFC path: 200.
	st, tok := eudiploTokenFetch(t, in.URL+"/api/oauth2/token", clientID, apiKey)
	if st != 201 || tok["token_type"] != "Bearer" || tok["expires_in"] != float64(300) {
		t.Fatalf("EUDIPLO path: %d %v", st, tok)
	}
	if st, tok2 := eudiploTokenFetch(t, in.URL+"/oauth2/token", clientID, apiKey); st != 200 || tok2["access_token"] == "" {
		t.Fatalf("RFC path: %d %v", st, tok2)
	}
	// Basic with a JSON body, and Basic with a form body.
	st, hdr, tok3 := tokenRequest(t, in.URL+"/oauth2/token", "application/json", `{"grant_type":"client_credentials"}`,
		[]string{clientID, apiKey})
	if st != 200 || tok3["access_token"] == nil || hdr.Get("Cache-Control") != "no-store" {
		t.Fatalf("Basic+JSON: %d %v", st, tok3)
	}
	if st, _, tok4 := tokenRequest(t, in.URL+"/oauth2/token", "application/x-www-form-urlencoded", "grant_type=client_credentials",
		[]string{clientID, apiKey}); st != 200 || tok4["access_token"] == nil {
		t.Fatalf("Basic+form: %d %v", st, tok4)
	}
	// JSON body with the credentials in it.
	jb, _ := json.Marshal(map[string]string{"grant_type": "client_credentials", "client_id": clientID, "client_secret": apiKey})
	if st, _, tok5 := tokenRequest(t, in.URL+"/api/oauth2/token", "application/json", string(jb), nil); st != 201 || tok5["access_token"] == nil {
		t.Fatalf("JSON body: %d %v", st, tok5)
	}

	// Independent verification of the token against the published key set.
	raw := tok["access_token"].(string)
	var parsed *jwt.JSONWebToken
	var pub *ecdsa.PublicKey
	parsed, err = jwt.ParseSigned(raw, []jose.SignatureAlgorithm{jose.ES256})
	if err != nil {
		t.Fatal(err)
	}
	if parsed.Headers[0].KeyID != set.Keys[0].KeyID {
		t.Fatalf("token kid %q, published %q", parsed.Headers[0].KeyID, set.Keys[0].KeyID)
	}
	var std jwt.Claims
	var extra struct {
		Tenant string   `json:"tenant"`
		Roles  []string `json:"roles"`
	}
	if err := parsed.Claims(set.Keys[0].Key, &std, &extra); err != nil {
		t.Fatalf("token does not verify against /.well-known/jwks.json: %v", err)
	}
	if err := std.Validate(jwt.Expected{Issuer: iss, Subject: clientID, AnyAudience: jwt.Audience{iss}, Time: time.Now()}); err != nil {
		t.Fatal(err)
	}
	if std.ID == "" || std.IssuedAt == nil || std.NotBefore == nil || std.Expiry.Time().Sub(std.IssuedAt.Time()) != 5*time.Minute {
		t.Fatalf("claims: %+v", std)
	}
	if extra.Tenant != "acme" || !slices.Equal(extra.Roles, []string{"manage", "sign"}) {
		t.Fatalf("claims: %+v", extra)
	}
	// And with crypto/ecdsa on the raw r‖s, without a JOSE library.
	parts := strings.Split(raw, ".")
	sig, _ := base64.RawURLEncoding.DecodeString(parts[2])
	if !keyutil.VerifyRaw(set.Keys[0].Key.(*ecdsa.PublicKey), []byte(parts[0]+"."+parts[1]), sig) {
		t.Fatal("token signature does not verify with crypto/ecdsa")
	}

	// The EUDIPLO operations with the token.
	st, body = in.Do("POST", "/keys", raw, map[string]string{"kid": "issuer-active", "alg": "ES256"})
	if st != 200 {
		t.Fatalf("generate: %d %s", st, body)
	}
	var gen struct {
		PublicJWK keyutil.JWK `json:"publicJwk"`
	}
	apptest.JSON(t, body, &gen)
	pub, err = keyutil.ParsePublicJWK(gen.PublicJWK)
	if err != nil {
		t.Fatal(err)
	}
	msg := []byte("eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ4In0")
	st, body = in.Do("POST", "/keys/issuer-active/sign", raw, map[string]string{"data": base64.StdEncoding.EncodeToString(msg), "alg": "ES256"})
	if st != 200 {
		t.Fatalf("sign: %d %s", st, body)
	}
	var sr struct{ Signature string }
	apptest.JSON(t, body, &sr)
	rs, err := base64.RawURLEncoding.DecodeString(strings.TrimRight(sr.Signature, "="))
	if err != nil {
		rs, _ = base64.StdEncoding.DecodeString(sr.Signature)
	}
	h := sha256.Sum256(msg)
	if len(rs) != 64 || !ecdsa.Verify(pub, h[:], bigInt(rs[:32]), bigInt(rs[32:])) {
		t.Fatalf("signature does not verify: %s", body)
	}
	imp, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	pj, _ := keyutil.PrivateJWK(imp, "imported", "ES256")
	if st, body = in.Do("POST", "/keys/imported/import", raw, map[string]any{"privateJwk": pj, "alg": "ES256"}); st != 200 {
		t.Fatalf("import: %d %s (the system key must not count against the quota of 2)", st, body)
	}
	// The quota is full with the tenant's two keys: the system key is outside it.
	if st, body = in.Do("POST", "/keys", raw, map[string]string{"kid": "third"}); st != 403 || !bytes.Contains(body, []byte("quota_exceeded")) {
		t.Fatalf("third key: %d %s", st, body)
	}
	st, body = in.Do("GET", "/jwks", raw, nil)
	if st != 200 || bytes.Contains(body, []byte(set.Keys[0].KeyID)) {
		t.Fatalf("tenant /jwks: %d %s", st, body)
	}
	for _, kid := range []string{"issuer-active", "imported"} {
		if st, body = in.Do("DELETE", "/keys/"+kid, raw, nil); st != 200 && st != 204 {
			t.Fatalf("delete %s: %d %s", kid, st, body)
		}
		if st, _ = in.Do("GET", "/keys/"+kid, apiKey, nil); st != 404 {
			t.Fatalf("deleted %s still there: %d", kid, st)
		}
	}
}

func bigInt(b []byte) *big.Int { return new(big.Int).SetBytes(b) }

// TestOAuthTokenEndpointErrors: RFC 6749 error answers of the token endpoint.
func TestOAuthTokenEndpointErrors(t *testing.T) {
	in := apptest.Start(t, apptest.Options{})
	apiKey := in.CreateTenant("acme", tenants.RoleSign)
	other := in.CreateTenant("beta")
	id := credentialID(apiKey)
	form := func(v url.Values) string { return v.Encode() }
	cases := []struct {
		name, ct, body string
		basic          []string
		status         int
		code           string
	}{
		{"wrong secret", "application/x-www-form-urlencoded", form(url.Values{"grant_type": {"client_credentials"},
			"client_id": {id}, "client_secret": {apiKey + "x"}}), nil, 401, "invalid_client"},
		{"another credential's key", "application/x-www-form-urlencoded", form(url.Values{"grant_type": {"client_credentials"},
			"client_id": {id}, "client_secret": {other}}), nil, 401, "invalid_client"},
		{"no credentials", "application/x-www-form-urlencoded", "grant_type=client_credentials", nil, 401, "invalid_client"},
		{"wrong Basic", "application/x-www-form-urlencoded", "grant_type=client_credentials", []string{id, "nope"}, 401, "invalid_client"},
		{"unsupported grant", "application/x-www-form-urlencoded", form(url.Values{"grant_type": {"password"},
			"client_id": {id}, "client_secret": {apiKey}}), nil, 400, "unsupported_grant_type"},
		{"scope wider than the roles", "application/x-www-form-urlencoded", form(url.Values{"grant_type": {"client_credentials"},
			"client_id": {id}, "client_secret": {apiKey}, "scope": {"sign manage"}}), nil, 400, "invalid_scope"},
		{"unknown scope", "application/json", `{"grant_type":"client_credentials","scope":"admin"}`, []string{id, apiKey}, 400, "invalid_scope"},
		{"Basic and body secret", "application/x-www-form-urlencoded", form(url.Values{"client_secret": {apiKey}}),
			[]string{id, apiKey}, 400, "invalid_request"},
		{"JSON not an object", "application/json", `[1]`, nil, 400, "invalid_request"},
		{"JSON non-string member", "application/json", `{"client_id":1}`, nil, 400, "invalid_request"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			st, hdr, out := tokenRequest(t, in.URL+"/oauth2/token", c.ct, c.body, c.basic)
			if st != c.status || out["error"] != c.code || out["error_description"] == "" || out["access_token"] != nil {
				t.Fatalf("got %d %v, want %d %s", st, out, c.status, c.code)
			}
			if st == 401 && hdr.Get("WWW-Authenticate") == "" {
				t.Fatal("401 without WWW-Authenticate")
			}
		})
	}
	// A narrowing scope is granted and the token carries only that role.
	st, _, out := tokenRequest(t, in.URL+"/oauth2/token", "application/x-www-form-urlencoded",
		form(url.Values{"client_id": {credentialID(other)}, "client_secret": {other}, "scope": {"sign"}}), nil)
	if st != 200 || out["scope"] != "sign" {
		t.Fatalf("narrowing scope: %d %v", st, out)
	}
	tok := out["access_token"].(string)
	if st, body := in.Do("POST", "/keys", tok, map[string]string{"kid": "k"}); st != 403 {
		t.Fatalf("sign-only token created a key: %d %s", st, body)
	}
	if st, body := in.Do("POST", "/keys", other, map[string]string{"kid": "k"}); st != 200 {
		t.Fatalf("create with API key: %d %s", st, body)
	}
	if st, body := in.Do("POST", "/keys/k/sign", tok, map[string]string{"data": "bQ=="}); st != 200 {
		t.Fatalf("sign-only token cannot sign: %d %s", st, body)
	}
}

// TestOAuthTokenTTL: --token-ttl sets expires_in and exp; a minute or less is refused at start-up.
func TestOAuthTokenTTL(t *testing.T) {
	in := apptest.Start(t, apptest.Options{Tweak: func(o *appliance.Options) { o.TokenTTL = 2 * time.Minute }})
	key := in.CreateTenant("acme")
	st, out := eudiploTokenFetch(t, in.URL+"/oauth2/token", credentialID(key), key)
	if st != 200 || out["expires_in"] != float64(120) {
		t.Fatalf("%d %v", st, out)
	}
	for _, ttl := range []time.Duration{60 * time.Second, time.Second} {
		_, err := appliance.Open(context.Background(), appliance.Options{ConfigDir: t.TempDir(), DataDir: t.TempDir(),
			MasterKeyEnv: apptest.MasterKey, PublicURL: "https://x.test", TokenTTL: ttl, AdminSocket: "-"})
		if err == nil || !strings.Contains(err.Error(), "token TTL") {
			t.Fatalf("TTL %v: %v", ttl, err)
		}
	}
}

// TestOAuthNegativeTokens: every bad token is 401 on a write, and nothing is written.
func TestOAuthNegativeTokens(t *testing.T) {
	in := apptest.Start(t, apptest.Options{})
	apiKey := in.CreateTenant("acme")
	id := credentialID(apiKey)
	toks := in.App.Tokens()
	ctx := context.Background()
	now := time.Now()
	const iss = "https://issuer.example.test"
	good := func() authn.Claims {
		return authn.Claims{Issuer: iss, Subject: id, Audience: iss, IssuedAt: now.Unix(), NotBefore: now.Unix(),
			Expiry: now.Add(5 * time.Minute).Unix(), ID: "j", Tenant: "acme", Roles: []string{"manage", "sign"}}
	}
	mint := func(mod func(*authn.Claims)) string {
		c := good()
		mod(&c)
		s, err := toks.Mint(ctx, c)
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	set := fetchJWKS(t, in)
	activeKID := set.Keys[0].KeyID
	payload := func() string {
		b, _ := json.Marshal(good())
		return base64.RawURLEncoding.EncodeToString(b)
	}
	hdr := func(h map[string]string) string {
		b, _ := json.Marshal(h)
		return base64.RawURLEncoding.EncodeToString(b)
	}
	attacker, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	es256 := func(kid string) string {
		input := hdr(map[string]string{"alg": "ES256", "kid": kid, "typ": "JWT"}) + "." + payload()
		d := sha256.Sum256([]byte(input))
		r, s, _ := ecdsa.Sign(rand.Reader, attacker, d[:])
		sig := make([]byte, 64)
		r.FillBytes(sig[:32])
		s.FillBytes(sig[32:])
		return input + "." + base64.RawURLEncoding.EncodeToString(sig)
	}
	// HS256 keyed with the published public key, in the forms an alg-confusion attack uses.
	pubJSON, _ := json.Marshal(set.Keys[0])
	pubPEM, _ := keyutil.PublicPEM(set.Keys[0].Key.(*ecdsa.PublicKey))
	hs256 := func(secret []byte) string {
		input := hdr(map[string]string{"alg": "HS256", "kid": activeKID, "typ": "JWT"}) + "." + payload()
		m := hmac.New(sha256.New, secret)
		m.Write([]byte(input))
		return input + "." + base64.RawURLEncoding.EncodeToString(m.Sum(nil))
	}

	revokedKey, err := in.App.Tenants().AddKey(ctx, "acme", nil, "to-revoke")
	if err != nil {
		t.Fatal(err)
	}
	st, tr := eudiploTokenFetch(t, in.URL+"/oauth2/token", revokedKey.CredentialID, revokedKey.Key)
	if st != 200 {
		t.Fatalf("token for the credential to revoke: %d %v", st, tr)
	}
	revokedTok := tr["access_token"].(string)
	if st, body := in.Do("GET", "/jwks", revokedTok, nil); st != 200 {
		t.Fatalf("token before revocation: %d %s", st, body)
	}
	if _, err := in.App.Tenants().Revoke(ctx, revokedKey.CredentialID, tenants.RevokeCredential); err != nil {
		t.Fatal(err)
	}

	cases := map[string]string{
		"expired": mint(func(c *authn.Claims) {
			c.IssuedAt, c.NotBefore, c.Expiry = now.Add(-10*time.Minute).Unix(), now.Add(-10*time.Minute).Unix(), now.Add(-time.Minute).Unix()
		}),
		"not yet valid":              mint(func(c *authn.Claims) { c.NotBefore = now.Add(5 * time.Minute).Unix() }),
		"issued later":               mint(func(c *authn.Claims) { c.IssuedAt = now.Add(5 * time.Minute).Unix() }),
		"wrong audience":             mint(func(c *authn.Claims) { c.Audience = "eudiplo-service" }),
		"wrong issuer":               mint(func(c *authn.Claims) { c.Issuer = "https://evil.example.test" }),
		"other tenant":               mint(func(c *authn.Claims) { c.Tenant = "beta" }),
		"unknown subject":            mint(func(c *authn.Claims) { c.Subject = "0123456789abcdef" }),
		"no exp":                     mint(func(c *authn.Claims) { c.Expiry = 0 }),
		"alg none":                   hdr(map[string]string{"alg": "none", "typ": "JWT"}) + "." + payload() + ".",
		"alg none with kid":          hdr(map[string]string{"alg": "none", "kid": activeKID}) + "." + payload() + ".",
		"HS256 with the public JWK":  hs256(pubJSON),
		"HS256 with the public PEM":  hs256(pubPEM),
		"unknown kid":                es256("attacker-key"),
		"foreign key, published kid": es256(activeKID),
		"revoked credential":         revokedTok,
		"garbage":                    "not-a-jwt",
		"tampered payload": func() string {
			p := strings.Split(mint(func(*authn.Claims) {}), ".")
			c := good()
			c.Roles = append(c.Roles, "export")
			b, _ := json.Marshal(c)
			return p[0] + "." + base64.RawURLEncoding.EncodeToString(b) + "." + p[2]
		}(),
	}
	// The control: a token minted the same way with good claims works.
	if st, body := in.Do("GET", "/jwks", mint(func(*authn.Claims) {}), nil); st != 200 {
		t.Fatalf("control token refused: %d %s", st, body)
	}
	for name, tok := range cases {
		t.Run(name, func(t *testing.T) {
			kid := "k-" + strings.ReplaceAll(name, " ", "-")
			st, body := in.Do("POST", "/keys", tok, map[string]string{"kid": kid})
			if st != 401 {
				t.Fatalf("create with a bad token: %d %s", st, body)
			}
			if st, body := in.Do("POST", "/keys/"+kid+"/import", tok, map[string]any{}); st != 401 {
				t.Fatalf("import with a bad token: %d %s", st, body)
			}
			if st, _ := in.Do("GET", "/keys/"+kid, apiKey, nil); st != 404 {
				t.Fatalf("a key was written: %d", st)
			}
		})
	}
}
