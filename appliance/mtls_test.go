package appliance_test

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"math/big"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kmsgate/kmsgate/appliance"
	"github.com/kmsgate/kmsgate/appliance/tenants"
	"github.com/kmsgate/kmsgate/internal/apptest"
	"github.com/kmsgate/kmsgate/internal/keyutil"
	"github.com/kmsgate/kmsgate/internal/testenv"
)

// selfSigned writes a self-signed client certificate and its key, as an operator would make one
// with openssl for EUDIPLO's mtls mode, and returns the files and the parsed certificate.
func selfSigned(t *testing.T, name string) (certFile, keyFile string, cert *x509.Certificate) {
	t.Helper()
	dir := t.TempDir()
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}, KeyUsage: x509.KeyUsageDigitalSignature}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &k.PublicKey, k)
	if err != nil {
		t.Fatal(err)
	}
	kd, _ := x509.MarshalPKCS8PrivateKey(k)
	certFile, keyFile = filepath.Join(dir, name+".pem"), filepath.Join(dir, name+"-key.pem")
	writePEM(t, certFile, "CERTIFICATE", der)
	writePEM(t, keyFile, "PRIVATE KEY", kd)
	cert, _ = x509.ParseCertificate(der)
	return certFile, keyFile, cert
}

// eudiploClient is an independent client that sends exactly what EUDIPLO's http KMS adapter sends
// in a given auth mode: JSON bodies, kids percent-encoded like encodeURIComponent, base64 data, and
// in mtls mode a client certificate with no Authorization header at all.
type eudiploClient struct {
	base   string
	bearer string // "" in mtls and none modes
	hc     *http.Client
}

// newEudiploClient builds the client. certFile/keyFile empty: no client certificate; caFile is the
// trust store for the server's certificate (EUDIPLO's caFile).
func newEudiploClient(t *testing.T, base, caFile, certFile, keyFile, bearer string) *eudiploClient {
	t.Helper()
	pemCA, err := os.ReadFile(caFile)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(pemCA)
	cfg := &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}
	if certFile != "" {
		c, err := tls.LoadX509KeyPair(certFile, keyFile)
		if err != nil {
			t.Fatal(err)
		}
		cfg.Certificates = []tls.Certificate{c}
	}
	tr := &http.Transport{TLSClientConfig: cfg}
	t.Cleanup(tr.CloseIdleConnections)
	return &eudiploClient{base: strings.Replace(base, "http://", "https://", 1), bearer: bearer,
		hc: &http.Client{Timeout: 30 * time.Second, Transport: tr}}
}

// encodeURIComponent as JavaScript does it for the kids used here.
func encodeURIComponent(s string) string { return strings.ReplaceAll(url.PathEscape(s), ":", "%3A") }

func (e *eudiploClient) do(t *testing.T, method, path string, body any) (int, []byte) {
	t.Helper()
	var rd io.Reader
	if body != nil {
		b, _ := json.Marshal(body)
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequest(method, e.base+path, rd)
	if err != nil {
		t.Fatal(err)
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	if e.bearer != "" {
		req.Header.Set("Authorization", "Bearer "+e.bearer)
	}
	resp, err := e.hc.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	out, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, out
}

// lifecycle runs EUDIPLO's create, sign (verified with crypto/ecdsa), import (signs and verifies
// too), delete and health against the gateway.
func (e *eudiploClient) lifecycle(t *testing.T, kid string) {
	t.Helper()
	st, body := e.do(t, "POST", "/keys", map[string]string{"kid": kid, "alg": "ES256"})
	if st != 200 {
		t.Fatalf("generate %s: %d %s", kid, st, body)
	}
	var gen struct {
		PublicJWK keyutil.JWK `json:"publicJwk"`
	}
	apptest.JSON(t, body, &gen)
	pub, err := keyutil.ParsePublicJWK(gen.PublicJWK)
	if err != nil {
		t.Fatalf("publicJwk: %v", err)
	}
	e.signVerify(t, kid, pub)

	priv, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	d, _ := priv.Bytes()
	pt, _ := priv.PublicKey.Bytes() // 0x04 || X || Y
	b := func(v []byte) string { return base64.RawURLEncoding.EncodeToString(v) }
	ikid := kid + "-imported"
	st, body = e.do(t, "POST", "/keys/"+encodeURIComponent(ikid)+"/import", map[string]any{"alg": "ES256",
		"privateJwk": map[string]string{"kty": "EC", "crv": "P-256", "x": b(pt[1:33]), "y": b(pt[33:]), "d": b(d),
			"kid": ikid, "alg": "ES256"}})
	if st != 200 {
		t.Fatalf("import %s: %d %s", ikid, st, body)
	}
	e.signVerify(t, ikid, &priv.PublicKey)

	for _, k := range []string{kid, ikid} {
		if st, body := e.do(t, "DELETE", "/keys/"+encodeURIComponent(k), nil); st/100 != 2 {
			t.Fatalf("delete %s: %d %s", k, st, body)
		}
		if st, _ := e.do(t, "POST", "/keys/"+encodeURIComponent(k)+"/sign", map[string]string{"data": "bQ==", "alg": "ES256"}); st != 404 {
			t.Fatalf("sign with deleted %s: %d", k, st)
		}
	}
	if st, body := e.do(t, "GET", "/health", nil); st != 200 {
		t.Fatalf("health: %d %s", st, body)
	}
}

func (e *eudiploClient) signVerify(t *testing.T, kid string, pub *ecdsa.PublicKey) {
	t.Helper()
	msg := []byte("eyJhbGciOiJFUzI1NiJ9.eyJpc3MiOiJodHRwczovL2lzc3Vlci5leGFtcGxlIn0")
	st, body := e.do(t, "POST", "/keys/"+encodeURIComponent(kid)+"/sign",
		map[string]string{"data": base64.StdEncoding.EncodeToString(msg), "alg": "ES256"})
	if st != 200 {
		t.Fatalf("sign %s: %d %s", kid, st, body)
	}
	var sig struct{ Signature string }
	apptest.JSON(t, body, &sig)
	raw, err := base64.RawURLEncoding.DecodeString(sig.Signature)
	if err != nil || len(raw) != 64 {
		t.Fatalf("signature %q: %v", sig.Signature, err)
	}
	h := sha256.Sum256(msg)
	if !ecdsa.Verify(pub, h[:], new(big.Int).SetBytes(raw[:32]), new(big.Int).SetBytes(raw[32:])) {
		t.Fatalf("signature of %s does not verify", kid)
	}
}

// startTLS starts an instance serving HTTPS with --tls-client-ca; its Do sends no client
// certificate.
func startTLS(t *testing.T, pki *testPKI, tweak func(*appliance.Options)) *apptest.Instance {
	in := apptest.Start(t, apptest.Options{Tweak: func(o *appliance.Options) {
		o.TLSCert, o.TLSKey, o.TLSClientCA = pki.serverCert, pki.serverKey, pki.caFile
		if tweak != nil {
			tweak(o)
		}
	}})
	pool := x509.NewCertPool()
	pool.AddCert(pki.ca)
	in.URL = strings.Replace(in.URL, "http://", "https://", 1)
	in.Client = &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{
		TLSClientConfig: &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}}}
	return in
}

func bindCert(t *testing.T, in *apptest.Instance, tenant, certFile string, roles ...string) *tenants.CertBinding {
	t.Helper()
	data, err := os.ReadFile(certFile)
	if err != nil {
		t.Fatal(err)
	}
	b, err := in.App.Tenants().AddCert(context.Background(), tenant, data, roles, "")
	if err != nil {
		t.Fatalf("bind %s to %s: %v", certFile, tenant, err)
	}
	return b
}

// TestMTLSEudiploClient: EUDIPLO's adapter in mtls mode (a client certificate, no Authorization
// header) runs its whole key lifecycle against a certificate bound with add-cert, although the
// certificate is self-signed and --tls-client-ca names another CA; a bearer-only client works on
// the same listener.
func TestMTLSEudiploClient(t *testing.T) {
	pki := newTestPKI(t)
	in := startTLS(t, pki, nil)
	key := in.CreateTenant("acme")
	certFile, keyFile, cert := selfSigned(t, "eudiplo")
	b := bindCert(t, in, "acme", certFile)
	pin := sha256.Sum256(cert.RawSubjectPublicKeyInfo)
	if b.Tenant != "acme" || b.SPKI != base64.StdEncoding.EncodeToString(pin[:]) || len(b.Roles) != 2 {
		t.Fatalf("binding: %+v", b)
	}

	newEudiploClient(t, in.URL, pki.caFile, certFile, keyFile, "").lifecycle(t, "chain:1-active")
	newEudiploClient(t, in.URL, pki.caFile, "", "", key).lifecycle(t, "chain:2-active")
}

// TestMTLSRefusals: each way of presenting a certificate that must not authenticate answers 401 and
// writes nothing; so does every route in EUDIPLO's none mode, except anonymous /health.
func TestMTLSRefusals(t *testing.T) {
	pki := newTestPKI(t)
	in := startTLS(t, pki, nil)
	acmeKey := in.CreateTenant("acme")
	acmeSignOnly, err := in.App.Tenants().AddKey(context.Background(), "acme", []string{tenants.RoleSign}, "sign-only")
	if err != nil {
		t.Fatal(err)
	}
	otherKey := in.CreateTenant("other")
	boundFile, boundKey, _ := selfSigned(t, "bound")
	bindCert(t, in, "acme", boundFile)
	revokedFile, revokedKey, _ := selfSigned(t, "revoked")
	rb := bindCert(t, in, "acme", revokedFile)
	otherCA := newTestPKI(t) // a certificate from another CA, never bound

	// The revoked binding authenticates first, on a connection that then stays open: the
	// revocation must hold on it too, not only on new handshakes.
	revokedClient := newEudiploClient(t, in.URL, pki.caFile, revokedFile, revokedKey, "")
	if st, body := revokedClient.do(t, "POST", "/keys", map[string]string{"kid": "before-revoke"}); st != 200 {
		t.Fatalf("bound certificate before revocation: %d %s", st, body)
	}
	if _, err := in.App.Tenants().Revoke(context.Background(), rb.ID, tenants.RevokeCredential); err != nil {
		t.Fatal(err)
	}

	cases := []struct {
		name string
		c    *eudiploClient
	}{
		{"unbound cert from another CA", newEudiploClient(t, in.URL, pki.caFile, otherCA.clientCert, otherCA.clientKey, "")},
		{"unbound cert from the client CA", newEudiploClient(t, in.URL, pki.caFile, pki.clientCert, pki.clientKey, "")},
		{"revoked binding", revokedClient},
		{"bound cert with another tenant's API key", newEudiploClient(t, in.URL, pki.caFile, boundFile, boundKey, otherKey)},
		{"bearer token with no verifier", newEudiploClient(t, in.URL, pki.caFile, "", "", "eyJhbGciOiJFUzI1NiJ9.e30.sig")},
		{"none mode", newEudiploClient(t, in.URL, pki.caFile, "", "", "")},
	}
	for i, c := range cases {
		kid := fmt.Sprintf("neg-%d", i)
		for _, r := range []struct{ method, path string }{{"POST", "/keys"}, {"POST", "/keys/k/sign"},
			{"POST", "/keys/" + kid + "/import"}, {"DELETE", "/keys/k"}, {"GET", "/key-chain"}, {"POST", "/key-chain"},
			{"GET", "/admin/tenants"}} {
			st, body := c.c.do(t, r.method, r.path, map[string]any{"kid": kid})
			if st != 401 || !strings.Contains(string(body), `"code":"unauthorized"`) {
				t.Errorf("%s: %s %s: %d %s, want 401", c.name, r.method, r.path, st, body)
			}
		}
		for _, tenantKey := range []string{acmeKey, otherKey} {
			if st, _ := in.Do("GET", "/keys/"+kid, tenantKey, nil); st != 404 {
				t.Errorf("%s: a refused request wrote key %s: %d", c.name, kid, st)
			}
		}
	}
	none := cases[len(cases)-1].c
	if st, body := none.do(t, "GET", "/health", nil); st != 200 || strings.Contains(string(body), "providers") {
		t.Fatalf("anonymous /health in none mode: %d %s", st, body)
	}

	// Certificate and API key of the same tenant: accepted, with the API key's roles.
	both := newEudiploClient(t, in.URL, pki.caFile, boundFile, boundKey, acmeSignOnly.Key)
	if st, body := both.do(t, "POST", "/keys", map[string]string{"kid": "by-sign-only"}); st != 403 {
		t.Fatalf("cert + sign-only key of the same tenant creating a key: %d %s, want 403 (the key's roles)", st, body)
	}
	if st, body := both.do(t, "POST", "/keys/before-revoke/sign", map[string]string{"data": "bQ=="}); st != 200 {
		t.Fatalf("cert + sign-only key of the same tenant signing: %d %s", st, body)
	}
	// An unbound certificate does not spoil a valid API key.
	if st, body := newEudiploClient(t, in.URL, pki.caFile, otherCA.clientCert, otherCA.clientKey, acmeKey).
		do(t, "POST", "/keys/before-revoke/sign", map[string]string{"data": "bQ=="}); st != 200 {
		t.Fatalf("unbound cert + valid API key: %d %s", st, body)
	}
	// The binding shows in tenant list until revoked; the revoked one is gone from it.
	ts, err := in.App.Tenants().List(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	var pins []string
	for _, ti := range ts {
		for _, c := range ti.Credentials {
			if c.SPKI != "" {
				pins = append(pins, ti.ID+"/"+c.ID)
			}
		}
	}
	if len(pins) != 1 || strings.Contains(pins[0], rb.ID) {
		t.Fatalf("bindings listed: %v", pins)
	}
}

// TestMTLSRequireClientCert: --tls-require-client-cert refuses the handshake of a client without a
// certificate and of one with an unbound certificate from another CA; a pinned self-signed one and
// one issued by --tls-client-ca get through (the latter still needs an API key).
func TestMTLSRequireClientCert(t *testing.T) {
	pki := newTestPKI(t)
	in := startTLS(t, pki, func(o *appliance.Options) { o.TLSRequireClientCert = true })
	key := in.CreateTenant("acme")
	boundFile, boundKey, _ := selfSigned(t, "bound")
	bindCert(t, in, "acme", boundFile)
	otherCA := newTestPKI(t)
	handshake := func(c *eudiploClient) error {
		req, _ := http.NewRequest("GET", c.base+"/healthz", nil)
		resp, err := c.hc.Do(req)
		if err == nil {
			resp.Body.Close()
		}
		return err
	}
	if err := handshake(newEudiploClient(t, in.URL, pki.caFile, "", "", key)); err == nil {
		t.Fatal("require-mode accepted a client without a certificate")
	}
	if err := handshake(newEudiploClient(t, in.URL, pki.caFile, otherCA.clientCert, otherCA.clientKey, key)); err == nil {
		t.Fatal("require-mode accepted an unbound certificate from another CA")
	}
	if st, body := newEudiploClient(t, in.URL, pki.caFile, boundFile, boundKey, "").
		do(t, "POST", "/keys", map[string]string{"kid": "k1"}); st != 200 {
		t.Fatalf("pinned self-signed certificate in require-mode: %d %s", st, body)
	}
	caClient := newEudiploClient(t, in.URL, pki.caFile, pki.clientCert, pki.clientKey, "")
	if st, _ := caClient.do(t, "POST", "/keys/k1/sign", map[string]string{"data": "bQ=="}); st != 401 {
		t.Fatalf("CA-issued unbound certificate without a key: %d, want 401", st)
	}
	caClient.bearer = key
	if st, body := caClient.do(t, "POST", "/keys/k1/sign", map[string]string{"data": "bQ=="}); st != 200 {
		t.Fatalf("CA-issued certificate with an API key: %d %s", st, body)
	}
}

// TestHealthPerCredentialDefault: with one provider down, /health answers 200 to a tenant whose
// default provider is up (listing the down one), and 503 to a tenant whose default is the down one.
func TestHealthPerCredentialDefault(t *testing.T) {
	in := apptest.Start(t, apptest.Options{KMSJSON: `{"defaultProvider":"db","providers":[` +
		`{"id":"db","type":"db"},{"id":"down","type":"http","baseUrl":"http://127.0.0.1:1"}]}`})
	upKey := in.CreateTenant("up")
	res, err := in.App.CreateTenant(context.Background(), tenants.CreateTenantRequest{ID: "downer", DefaultProvider: "down"})
	if err != nil {
		t.Fatal(err)
	}
	st, body := in.Do("GET", "/health", upKey, nil)
	if st != 200 || !strings.Contains(string(body), `"providerId":"down","type":"http","ok":false`) {
		t.Fatalf("health of a tenant whose default provider is up: %d %s", st, body)
	}
	if st, body := in.Do("GET", "/health", res.APIKey, nil); st != 503 || !strings.Contains(string(body), `"ok":false`) {
		t.Fatalf("health of a tenant whose default provider is down: %d %s", st, body)
	}
	// Anonymous callers keep the gateway-wide answer.
	if st, _ := in.Do("GET", "/health", "", nil); st != 503 {
		t.Fatalf("anonymous health with a provider down: %d", st)
	}
}

// TestReplicasCertRevocation: a certificate binding made and revoked through replica 1 is accepted
// and then refused by replica 2 within a second, through the store's change notices alone.
func TestReplicasCertRevocation(t *testing.T) {
	testenv.NeedsBackend(t, "postgres")
	pg := testenv.StartPostgres(t)
	dsn := pg.NewDatabase(t)
	pki := newTestPKI(t)
	r := make([]*apptest.Instance, 2)
	for i := range r {
		r[i] = startTLS(t, pki, func(o *appliance.Options) { o.Store, o.CacheRefreshInterval = dsn, -1 })
	}
	waitListeners(t, dsn, len(r))
	key := r[0].CreateTenant("acme")
	if st, body := r[0].Do("POST", "/keys", key, map[string]any{"kid": "k1"}); st != 200 {
		t.Fatalf("create key: %d %s", st, body)
	}
	certFile, keyFile, _ := selfSigned(t, "replica-client")
	on2 := newEudiploClient(t, r[1].URL, pki.caFile, certFile, keyFile, "")
	sign := func() int {
		st, _ := on2.do(t, "POST", "/keys/k1/sign", map[string]string{"data": "bQ=="})
		return st
	}
	if st := sign(); st != 401 {
		t.Fatalf("unbound certificate on replica 2: %d", st)
	}
	b := bindCert(t, r[0], "acme", certFile)
	d := until(t, "binding accepted on replica 2", func() bool { return sign() == 200 })
	if _, err := r[0].App.Tenants().Revoke(context.Background(), b.ID, tenants.RevokeCredential); err != nil {
		t.Fatal(err)
	}
	d2 := until(t, "revoked binding refused on replica 2", func() bool { return sign() == 401 })
	t.Logf("binding reached replica 2 in %v, its revocation in %v", d, d2)
}
