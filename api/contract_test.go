package api_test

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/kmsgate/kmsgate/internal/apptest"
	"github.com/kmsgate/kmsgate/internal/keyutil"
	"github.com/kmsgate/kmsgate/internal/testenv"
)

type pubResp struct {
	PublicJWK keyutil.JWK `json:"publicJwk"`
}

type problemBody struct {
	Error string `json:"error"`
	Code  string `json:"code"`
}

func b64(b []byte) string { return base64.StdEncoding.EncodeToString(b) }

func generate(t *testing.T, in *apptest.Instance, key, kid string) *ecdsa.PublicKey {
	t.Helper()
	st, body := in.Do("POST", "/keys", key, map[string]string{"kid": kid, "alg": "ES256"})
	if st != 200 {
		t.Fatalf("generate %s: %d %s", kid, st, body)
	}
	var r pubResp
	apptest.JSON(t, body, &r)
	pub, err := keyutil.ParsePublicJWK(r.PublicJWK)
	if err != nil {
		t.Fatalf("generate returned an invalid JWK: %v", err)
	}
	if r.PublicJWK.Kid != kid || r.PublicJWK.Alg != "ES256" {
		t.Fatalf("JWK kid/alg = %q/%q", r.PublicJWK.Kid, r.PublicJWK.Alg)
	}
	return pub
}

func signRaw(t *testing.T, in *apptest.Instance, key, path string, msg []byte) []byte {
	t.Helper()
	st, body := in.Do("POST", path, key, map[string]string{"data": b64(msg), "alg": "ES256"})
	if st != 200 {
		t.Fatalf("sign %s: %d %s", path, st, body)
	}
	var r struct{ Signature string }
	apptest.JSON(t, body, &r)
	sig, err := base64.RawURLEncoding.DecodeString(r.Signature)
	if err != nil {
		t.Fatalf("signature is not base64url: %q", r.Signature)
	}
	if len(sig) != 64 {
		t.Fatalf("signature is %d bytes, want 64", len(sig))
	}
	return sig
}

func verify(t *testing.T, pub *ecdsa.PublicKey, msg, raw []byte) {
	t.Helper()
	der, err := keyutil.RawToDER(raw)
	if err != nil {
		t.Fatal(err)
	}
	d := sha256.Sum256(msg)
	if !ecdsa.VerifyASN1(pub, d[:], der) {
		t.Fatal("signature does not verify with crypto/ecdsa")
	}
}

func TestGenerateSignVerifyRestart(t *testing.T) {
	data := t.TempDir()
	in := apptest.Start(t, apptest.Options{DataDir: data})
	key := in.CreateTenant("acme")
	pub := generate(t, in, key, "access-key-chain-active")
	msg := []byte("eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ4In0")
	verify(t, pub, msg, signRaw(t, in, key, "/keys/access-key-chain-active/sign", msg))

	// Digest extension: the same key signs a SHA-256 digest.
	d := sha256.Sum256(msg)
	st, body := in.Do("POST", "/keys/access-key-chain-active/sign", key, map[string]string{"digest": b64(d[:])})
	if st != 200 {
		t.Fatalf("digest sign: %d %s", st, body)
	}
	var r struct{ Signature string }
	apptest.JSON(t, body, &r)
	raw, _ := base64.RawURLEncoding.DecodeString(r.Signature)
	verify(t, pub, msg, raw)

	// Duplicate kid → 409, and the key is unchanged.
	st, body = in.Do("POST", "/keys", key, map[string]string{"kid": "access-key-chain-active", "alg": "ES256"})
	if st != 409 {
		t.Fatalf("duplicate generate: %d %s", st, body)
	}
	verify(t, pub, msg, signRaw(t, in, key, "/keys/access-key-chain-active/sign", msg))

	// A restart keeps the key (synced Badger write, sealed material, same master key).
	in.Stop()
	in2 := apptest.Start(t, apptest.Options{DataDir: data})
	verify(t, pub, msg, signRaw(t, in2, key, "/keys/access-key-chain-active/sign", msg))

	// GET /keys/{kid} returns the same public key.
	st, body = in2.Do("GET", "/keys/access-key-chain-active", key, nil)
	var g pubResp
	apptest.JSON(t, body, &g)
	if p2, err := keyutil.ParsePublicJWK(g.PublicJWK); st != 200 || err != nil || !p2.Equal(pub) {
		t.Fatalf("GET key: %d %s", st, body)
	}
}

func TestOpenSSLVerifiesDERSignature(t *testing.T) {
	testenv.NeedsBackend(t, "openssl")
	in := apptest.Start(t, apptest.Options{})
	key := in.CreateTenant("acme")
	generate(t, in, key, "demo")
	req, _ := http.NewRequest("GET", in.URL+"/keys/demo", nil)
	req.Header.Set("Authorization", "Bearer "+key)
	req.Header.Set("Accept", "application/x-pem-file")
	resp, err := in.Client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	var pemBuf strings.Builder
	if _, err := fmt.Fprint(&pemBuf, readAll(t, resp)); err != nil {
		t.Fatal(err)
	}
	if resp.Header.Get("Content-Type") != "application/x-pem-file" || !strings.HasPrefix(pemBuf.String(), "-----BEGIN PUBLIC KEY-----") {
		t.Fatalf("PEM export: %s %q", resp.Header.Get("Content-Type"), pemBuf.String())
	}
	msg := []byte("hello kmsgate")
	st, body := in.Do("POST", "/keys/demo/sign", key, map[string]string{"data": b64(msg), "alg": "ES256", "signatureFormat": "der"})
	if st != 200 {
		t.Fatalf("sign der: %d %s", st, body)
	}
	var r struct{ Signature string }
	apptest.JSON(t, body, &r)
	der, err := base64.StdEncoding.DecodeString(r.Signature)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	write := func(name string, b []byte) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, b, 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	pemPath, sigPath, msgPath := write("pub.pem", []byte(pemBuf.String())), write("msg.sig", der), write("msg.txt", msg)
	out, err := exec.Command("openssl", "dgst", "-sha256", "-verify", pemPath, "-signature", sigPath, msgPath).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "Verified OK") {
		t.Fatalf("openssl rejects the signature: %v %s", err, out)
	}
	// And a tampered message must fail under openssl too, so the check above can fail.
	write("msg.txt", []byte("hello kmsgatE"))
	if out, err := exec.Command("openssl", "dgst", "-sha256", "-verify", pemPath, "-signature", sigPath, msgPath).CombinedOutput(); err == nil {
		t.Fatalf("openssl verified a tampered message: %s", out)
	}
}

func readAll(t *testing.T, resp *http.Response) string {
	t.Helper()
	defer resp.Body.Close()
	var b strings.Builder
	buf := make([]byte, 4096)
	for {
		n, err := resp.Body.Read(buf)
		b.Write(buf[:n])
		if err != nil {
			break
		}
	}
	return b.String()
}

func TestImportSignDeleteIsolation(t *testing.T) {
	in := apptest.Start(t, apptest.Options{})
	a := in.CreateTenant("tenant-a")
	b := in.CreateTenant("tenant-b")
	priv, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	jwk, _ := keyutil.PrivateJWK(priv, "ignored", "ES256")
	st, body := in.Do("POST", "/keys/shared%2Fkid/import", a, map[string]any{"privateJwk": jwk, "alg": "ES256"})
	if st != 200 {
		t.Fatalf("import: %d %s", st, body)
	}
	var r pubResp
	apptest.JSON(t, body, &r)
	if r.PublicJWK.D != "" {
		t.Fatal("import response leaked d")
	}
	msg := []byte("credential")
	verify(t, &priv.PublicKey, msg, signRaw(t, in, a, "/keys/shared%2Fkid/sign", msg))

	// Import again = upsert with another key.
	priv2, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	jwk2, _ := keyutil.PrivateJWK(priv2, "", "ES256")
	if st, body := in.Do("POST", "/keys/shared%2Fkid/import", a, map[string]any{"privateJwk": jwk2, "alg": "ES256"}); st != 200 {
		t.Fatalf("re-import: %d %s", st, body)
	}
	verify(t, &priv2.PublicKey, msg, signRaw(t, in, a, "/keys/shared%2Fkid/sign", msg))

	// Tenant B cannot see A's kid (404, not 403), and may own the same kid itself.
	if st, body := in.Do("POST", "/keys/shared%2Fkid/sign", b, map[string]string{"data": b64(msg)}); st != 404 {
		t.Fatalf("other tenant's kid: %d %s", st, body)
	}
	pubB := generate(t, in, b, "shared/kid")
	verify(t, pubB, msg, signRaw(t, in, b, "/keys/shared%2Fkid/sign", msg))
	verify(t, &priv2.PublicKey, msg, signRaw(t, in, a, "/keys/shared%2Fkid/sign", msg))

	// Delete: 204, sign → 404, delete again → 204; B's key untouched.
	for i := 0; i < 2; i++ {
		if st, body := in.Do("DELETE", "/keys/shared%2Fkid", a, nil); st != 204 {
			t.Fatalf("delete #%d: %d %s", i, st, body)
		}
	}
	st, body = in.Do("POST", "/keys/shared%2Fkid/sign", a, map[string]string{"data": b64(msg)})
	var p problemBody
	apptest.JSON(t, body, &p)
	if st != 404 || p.Code == "" {
		t.Fatalf("sign after delete: %d %s", st, body)
	}
	verify(t, pubB, msg, signRaw(t, in, b, "/keys/shared%2Fkid/sign", msg))
}

func TestBadInput(t *testing.T) {
	in := apptest.Start(t, apptest.Options{})
	key := in.CreateTenant("acme")
	other := in.CreateTenant("other")
	signOnly := in.App.Tenants()
	res, err := signOnly.AddKey(t.Context(), "acme", []string{"sign"}, "signer")
	if err != nil {
		t.Fatal(err)
	}
	generate(t, in, key, "k1")
	generate(t, in, other, "theirs")

	priv, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	good, _ := keyutil.PrivateJWK(priv, "", "ES256")
	offCurve := good
	offCurve.Y = base64.RawURLEncoding.EncodeToString(make([]byte, 32))
	wrongD := good
	priv2, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	other2, _ := keyutil.PrivateJWK(priv2, "", "ES256")
	wrongD.D = other2.D
	wrongKty := good
	wrongKty.Kty = "RSA"
	wrongCrv := good
	wrongCrv.Crv = "P-384"

	big := `{"kid":"x","alg":"ES256","pad":"` + strings.Repeat("a", 2<<20) + `"}`
	type tc struct {
		name, method, path, key, ctype, body string
		status                               int
		code                                 string
	}
	js := func(v any) string { b, _ := json.Marshal(v); return string(b) }
	cases := []tc{
		{"malformed json", "POST", "/keys", key, "application/json", `{"kid":`, 400, "invalid_json"},
		{"wrong type", "POST", "/keys", key, "application/json", `{"kid":5}`, 400, "invalid_type"},
		{"not an object", "POST", "/keys", key, "application/json", `[1,2]`, 400, "invalid_type"},
		{"unknown field", "POST", "/keys", key, "application/json", `{"kid":"n1","alg":"ES256","extra":true}`, 400, "unknown_field"},
		{"empty body", "POST", "/keys", key, "application/json", ``, 400, "empty_body"},
		{"trailing data", "POST", "/keys", key, "application/json", `{"kid":"n2"} {}`, 400, "invalid_json"},
		{"oversized body", "POST", "/keys", key, "application/json", big, 413, "body_too_large"},
		{"wrong content type", "POST", "/keys", key, "text/plain", `{"kid":"n3"}`, 415, "unsupported_media_type"},
		{"missing kid", "POST", "/keys", key, "application/json", `{"alg":"ES256"}`, 400, "missing_field"},
		{"unsupported alg", "POST", "/keys", key, "application/json", `{"kid":"n4","alg":"RS256"}`, 400, "unsupported_alg"},
		{"unknown provider", "POST", "/keys", key, "application/json", `{"kid":"n5","kmsProvider":"nope"}`, 400, "unknown_provider"},
		{"invalid base64", "POST", "/keys/k1/sign", key, "application/json", `{"data":"***","alg":"ES256"}`, 400, "invalid_base64"},
		{"missing data", "POST", "/keys/k1/sign", key, "application/json", `{"alg":"ES256"}`, 400, "missing_field"},
		{"data and digest", "POST", "/keys/k1/sign", key, "application/json", `{"data":"YQ==","digest":"YQ=="}`, 400, "invalid_request"},
		{"short digest", "POST", "/keys/k1/sign", key, "application/json", `{"digest":"YQ=="}`, 400, "invalid_digest"},
		{"sign unsupported alg", "POST", "/keys/k1/sign", key, "application/json", `{"data":"YQ==","alg":"ES384"}`, 400, "unsupported_alg"},
		{"unknown kid", "POST", "/keys/nope/sign", key, "application/json", `{"data":"YQ==","alg":"ES256"}`, 404, "key_not_found"},
		{"other tenant's kid", "POST", "/keys/theirs/sign", key, "application/json", `{"data":"YQ=="}`, 404, "key_not_found"},
		{"bad percent-encoding", "POST", "/keys/%zz/sign", key, "application/json", `{"data":"YQ=="}`, 400, "invalid_kid"},
		{"jwk off curve", "POST", "/keys/i1/import", key, "application/json", js(map[string]any{"privateJwk": offCurve}), 422, "invalid_jwk"},
		{"jwk d mismatch", "POST", "/keys/i2/import", key, "application/json", js(map[string]any{"privateJwk": wrongD}), 422, "invalid_jwk"},
		{"jwk wrong kty", "POST", "/keys/i3/import", key, "application/json", js(map[string]any{"privateJwk": wrongKty}), 422, "invalid_jwk"},
		{"jwk wrong crv", "POST", "/keys/i4/import", key, "application/json", js(map[string]any{"privateJwk": wrongCrv}), 422, "invalid_jwk"},
		{"import missing jwk", "POST", "/keys/i5/import", key, "application/json", `{"alg":"ES256"}`, 400, "missing_field"},
		{"no credentials", "POST", "/keys", "", "application/json", `{"kid":"n6"}`, 401, "unauthorized"},
		{"wrong credentials", "POST", "/keys", "kmsgate_0000000000000000_" + strings.Repeat("A", 43), "application/json", `{"kid":"n7"}`, 401, "unauthorized"},
		{"garbage credentials", "POST", "/keys/k1/sign", "not-a-key", "application/json", `{"data":"YQ=="}`, 401, "unauthorized"},
		{"sign-only key cannot create", "POST", "/keys", res.Key, "application/json", `{"kid":"n8"}`, 403, "forbidden"},
		{"tenant key on admin api", "GET", "/admin/tenants", key, "", ``, 403, "forbidden"},
		{"unknown route", "GET", "/nope", key, "", ``, 404, "route_not_found"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			req, err := http.NewRequest(c.method, in.URL+"/", strings.NewReader(c.body))
			if err != nil {
				t.Fatal(err)
			}
			// Opaque sends the path byte for byte, so invalid percent-encoding reaches the server.
			req.URL.Opaque = c.path
			if c.ctype != "" {
				req.Header.Set("Content-Type", c.ctype)
			}
			if c.key != "" {
				req.Header.Set("Authorization", "Bearer "+c.key)
			}
			resp, err := in.Client.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			body := readAll(t, resp)
			var p problemBody
			if err := json.Unmarshal([]byte(body), &p); err != nil {
				t.Fatalf("error body is not JSON: %q", body)
			}
			if resp.StatusCode != c.status || p.Code != c.code || p.Error == "" {
				t.Fatalf("got %d %s, want %d code %s", resp.StatusCode, body, c.status, c.code)
			}
			if strings.Contains(body, "goroutine") || strings.Contains(body, ".go:") {
				t.Fatalf("error body leaks internals: %s", body)
			}
		})
	}
	// Nothing was written by the rejected requests: only k1 exists for acme.
	for _, kid := range []string{"n1", "n2", "n3", "n4", "n5", "n6", "n7", "n8", "x", "i1", "i2", "i3", "i4", "i5"} {
		if st, _ := in.Do("GET", "/keys/"+kid, key, nil); st != 404 {
			t.Errorf("rejected request left key %q behind (GET → %d)", kid, st)
		}
	}
}

func TestXAPIKeyAndHealth(t *testing.T) {
	in := apptest.Start(t, apptest.Options{})
	key := in.CreateTenant("acme")
	req, _ := http.NewRequest("POST", in.URL+"/keys", strings.NewReader(`{"kid":"viaheader","alg":"ES256"}`))
	req.Header.Set("x-api-key", key)
	req.Header.Set("Content-Type", "application/json")
	resp, err := in.Client.Do(req)
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("x-api-key auth: %v %v", err, resp.Status)
	}
	resp.Body.Close()
	st, body := in.Do("GET", "/health", key, nil)
	var h struct {
		OK        bool `json:"ok"`
		Providers []struct {
			ProviderID string `json:"providerId"`
			OK         bool   `json:"ok"`
		} `json:"providers"`
	}
	apptest.JSON(t, body, &h)
	if st != 200 || !h.OK || len(h.Providers) != 1 || h.Providers[0].ProviderID != "db" {
		t.Fatalf("health: %d %s", st, body)
	}
	if st, _ := in.Do("GET", "/health", "kmsgate_0000000000000000_"+strings.Repeat("A", 43), nil); st != 401 {
		t.Fatalf("health with a wrong key: %d", st)
	}
}

func TestConcurrentSigning(t *testing.T) {
	in := apptest.Start(t, apptest.Options{})
	key := in.CreateTenant("acme")
	pub := generate(t, in, key, "hot")
	var wg sync.WaitGroup
	errs := make(chan error, 16)
	for g := 0; g < 16; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 25; i++ {
				msg := []byte(fmt.Sprintf("msg-%d-%d", g, i))
				st, body := in.Do("POST", "/keys/hot/sign", key, map[string]string{"data": b64(msg)})
				var r struct{ Signature string }
				if st != 200 || json.Unmarshal(body, &r) != nil {
					errs <- fmt.Errorf("sign: %d %s", st, body)
					return
				}
				raw, _ := base64.RawURLEncoding.DecodeString(r.Signature)
				if !keyutil.VerifyRaw(pub, msg, raw) {
					errs <- fmt.Errorf("wrong signature for %q", msg)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

func TestMetricsUseRouteTemplates(t *testing.T) {
	in := apptest.Start(t, apptest.Options{})
	key := in.CreateTenant("acme")
	generate(t, in, key, "secret-kid-name")
	signRaw(t, in, key, "/keys/secret-kid-name/sign", []byte("m"))
	st, body := in.Do("GET", "/metrics", "", nil)
	s := string(body)
	if st != 200 || !strings.Contains(s, `kmsgate_sign_duration_seconds_bucket{alg="ES256",provider="db",result="ok",le="0.0001"}`) ||
		!strings.Contains(s, `route="/keys/:kid/sign"`) || !strings.Contains(s, "kmsgate_build_info{") {
		t.Fatalf("metrics missing expected series:\n%s", s)
	}
	if strings.Contains(s, "secret-kid-name") || strings.Contains(s, "kmsgate_0") {
		t.Fatal("metrics leak a kid or an API key")
	}
	// promtool lints the exposition format (naming, _total suffixes, help text).
	testenv.NeedsBackend(t, "promtool")
	f := filepath.Join(t.TempDir(), "metrics.txt")
	os.WriteFile(f, body, 0o600)
	out, err := exec.Command("sh", "-c", "promtool check metrics < "+f).CombinedOutput()
	if err != nil {
		t.Fatalf("promtool check metrics: %v\n%s", err, out)
	}
}
