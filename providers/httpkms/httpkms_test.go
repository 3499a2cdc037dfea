package httpkms

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
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kmsgate/kmsgate/internal/errs"
	"github.com/kmsgate/kmsgate/internal/keyutil"
	"github.com/kmsgate/kmsgate/providers"
	"github.com/kmsgate/kmsgate/providers/providertest"
)

func newProvider(t *testing.T, cfg map[string]any) (*Provider, error) {
	t.Helper()
	if _, ok := cfg["id"]; !ok {
		cfg["id"] = "remote"
	}
	cfg["type"] = "http"
	raw, err := json.Marshal(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return New(context.Background(), providers.Config{ID: cfg["id"].(string), Type: "http", Raw: raw}, nil)
}

func mustProvider(t *testing.T, cfg map[string]any) *Provider {
	t.Helper()
	p, err := newProvider(t, cfg)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	return p
}

// harness restarts the server under the outer test, so it outlives the suite's subtests.
func harness(outer *testing.T, cs *contractServer, cfg func() map[string]any) providertest.Harness {
	return providertest.Harness{
		New:          func(t *testing.T) providers.Provider { return mustProvider(t, cfg()) },
		TenantScoped: true,
		StopBackend:  func(*testing.T) { cs.stop() },
		StartBackend: func(*testing.T) { cs.start(outer) },
	}
}

func bearerAuth(token string) func(*http.Request) bool {
	return func(r *http.Request) bool { return r.Header.Get("Authorization") == "Bearer "+token }
}

// The contract exactly as §6 writes it: static apiKey as Bearer, import allowed, no digest.
func TestContractPlainAPIKey(t *testing.T) {
	cs := &contractServer{canImport: true, auth: bearerAuth("k3y")}
	cs.start(t)
	h := harness(t, cs, func() map[string]any {
		return map[string]any{"baseUrl": cs.url() + "/", "apiKey": "k3y", "canImport": true, "timeout": "2s"}
	})
	h.HealthTimeout = 3 * time.Second
	providertest.Run(t, h)
}

// kmsgate's digest extension advertised in /health, auth object of type bearer.
func TestContractDigestExtension(t *testing.T) {
	cs := &contractServer{digest: true, auth: bearerAuth("tok")}
	cs.start(t)
	p := mustProvider(t, map[string]any{"baseUrl": cs.url(), "auth": map[string]any{"type": "bearer", "token": "tok"}})
	if !p.Capabilities().CanSignDigest {
		t.Fatal("digest extension advertised in /health was not detected at New")
	}
	p.Close()
	providertest.Run(t, harness(t, cs, func() map[string]any {
		return map[string]any{"baseUrl": cs.url(), "auth": map[string]any{"type": "bearer", "token": "tok"}}
	}))
}

func TestContractXAPIKey(t *testing.T) {
	cs := &contractServer{auth: func(r *http.Request) bool {
		return r.Header.Get("x-api-key") == "xk" && r.Header.Get("Authorization") == ""
	}}
	cs.start(t)
	providertest.Run(t, harness(t, cs, func() map[string]any {
		return map[string]any{"baseUrl": cs.url(), "apiKey": "xk", "apiKeyHeader": "x-api-key"}
	}))
}

func TestContractOAuth2ClientCredentials(t *testing.T) {
	var fetches atomic.Int32
	var issued atomic.Value
	tokenSrv := &http.Server{ReadHeaderTimeout: 5 * time.Second, Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodPost || r.FormValue("grant_type") != "client_credentials" ||
			r.FormValue("client_id") != "cid" || r.FormValue("client_secret") != "s3cret-value" || r.FormValue("scope") != "kms" {
			writeJSON(w, http.StatusUnauthorized, map[string]string{"error": "invalid_client"})
			return
		}
		n := fetches.Add(1)
		tok := "at-" + string(rune('a'+n))
		issued.Store(tok)
		writeJSON(w, http.StatusOK, map[string]any{"access_token": tok, "token_type": "Bearer", "expires_in": 3600})
	})}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go tokenSrv.Serve(ln)
	t.Cleanup(func() { tokenSrv.Close() })
	cs := &contractServer{auth: func(r *http.Request) bool {
		tok, _ := issued.Load().(string)
		return tok != "" && r.Header.Get("Authorization") == "Bearer "+tok
	}}
	cs.start(t)
	cfg := func() map[string]any {
		return map[string]any{"baseUrl": cs.url(), "auth": map[string]any{"type": "oauth2-client-credentials",
			"tokenUrl": "http://" + ln.Addr().String() + "/token", "clientId": "cid", "clientSecret": "s3cret-value", "scope": "kms"}}
	}
	providertest.Run(t, harness(t, cs, cfg))
	if n := fetches.Load(); n != 1 {
		t.Fatalf("token endpoint called %d times for one provider, want 1 (token must be cached)", n)
	}

	// A token the server no longer accepts (revoked early) is refreshed once, transparently.
	p := mustProvider(t, cfg())
	defer p.Close()
	issued.Store("revoked-on-server")
	if h := p.Health(context.Background()); !h.OK {
		t.Fatalf("health after server-side revocation: %+v (want a transparent token refresh)", h)
	}

	// Wrong secret: the error says what failed and never echoes the secret.
	bad := cfg()
	bad["auth"].(map[string]any)["clientSecret"] = "wrong-secret-value"
	pb := mustProvider(t, bad)
	defer pb.Close()
	h := pb.Health(context.Background())
	if h.OK || !strings.Contains(h.Error, "OAuth2") || strings.Contains(h.Error, "wrong-secret-value") {
		t.Fatalf("health with a bad client secret: %+v", h)
	}
	_, err = pb.SignMessage(context.Background(), providers.KeyRef{KID: "x"}, "ES256", []byte("m"))
	if err == nil || strings.Contains(err.Error(), "wrong-secret-value") {
		t.Fatalf("sign with a bad client secret: %v", err)
	}
}

func TestContractMTLS(t *testing.T) {
	dir := t.TempDir()
	ca, caKey := newCA(t)
	writePEM(t, filepath.Join(dir, "ca.pem"), "CERTIFICATE", ca.Raw)
	srvCert := issue(t, ca, caKey, "127.0.0.1", x509.ExtKeyUsageServerAuth)
	cliCert := issue(t, ca, caKey, "kmsgate-client", x509.ExtKeyUsageClientAuth)
	writePEM(t, filepath.Join(dir, "client.pem"), "CERTIFICATE", cliCert.Certificate[0])
	kb, _ := x509.MarshalPKCS8PrivateKey(cliCert.PrivateKey)
	writePEM(t, filepath.Join(dir, "client.key"), "PRIVATE KEY", kb)
	pool := x509.NewCertPool()
	pool.AddCert(ca)
	cs := &contractServer{tls: &tls.Config{Certificates: []tls.Certificate{srvCert}, ClientCAs: pool,
		ClientAuth: tls.RequireAndVerifyClientCert, MinVersion: tls.VersionTLS12}}
	cs.start(t)
	cfg := func() map[string]any {
		return map[string]any{"baseUrl": cs.url(), "auth": map[string]any{"type": "mtls",
			"certFile": filepath.Join(dir, "client.pem"), "keyFile": filepath.Join(dir, "client.key"), "caFile": filepath.Join(dir, "ca.pem")}}
	}
	providertest.Run(t, harness(t, cs, cfg))

	// Without the client certificate the server refuses the handshake: health must say so.
	p := mustProvider(t, map[string]any{"baseUrl": cs.url(), "auth": map[string]any{"type": "none"}})
	defer p.Close()
	if h := p.Health(context.Background()); h.OK {
		t.Fatalf("health without client certificate and unknown CA: %+v, want failure", h)
	}
}

func TestConfigErrors(t *testing.T) {
	cases := map[string]map[string]any{
		"missing baseUrl":     {},
		"relative baseUrl":    {"baseUrl": "/x"},
		"apiKey and auth":     {"baseUrl": "http://127.0.0.1:1", "apiKey": "a", "auth": map[string]any{"type": "none"}},
		"unknown field":       {"baseUrl": "http://127.0.0.1:1", "apiToken": "a"},
		"unknown auth type":   {"baseUrl": "http://127.0.0.1:1", "auth": map[string]any{"type": "basic"}},
		"bearer no token":     {"baseUrl": "http://127.0.0.1:1", "auth": map[string]any{"type": "bearer"}},
		"oauth2 no secret":    {"baseUrl": "http://127.0.0.1:1", "auth": map[string]any{"type": "oauth2-client-credentials", "tokenUrl": "http://x/t", "clientId": "c"}},
		"mtls over http":      {"baseUrl": "http://127.0.0.1:1", "auth": map[string]any{"type": "mtls", "certFile": "a", "keyFile": "b"}},
		"mtls missing files":  {"baseUrl": "https://127.0.0.1:1", "auth": map[string]any{"type": "mtls", "certFile": "/nonexistent", "keyFile": "/nonexistent"}},
		"field of other type": {"baseUrl": "http://127.0.0.1:1", "auth": map[string]any{"type": "bearer", "token": "t", "certFile": "x"}},
		"bad timeout":         {"baseUrl": "http://127.0.0.1:1", "timeout": "soon"},
		"bad apiKeyHeader":    {"baseUrl": "http://127.0.0.1:1", "apiKey": "k", "apiKeyHeader": "cookie"},
	}
	for name, cfg := range cases {
		t.Run(name, func(t *testing.T) {
			if _, err := newProvider(t, cfg); err == nil {
				t.Fatal("config accepted, want error")
			} else if strings.Contains(err.Error(), "\"a\"") && name == "apiKey and auth" {
				t.Fatalf("error leaks the api key: %v", err)
			}
		})
	}
	// An unreachable backend is not a config error.
	p, err := newProvider(t, map[string]any{"baseUrl": "http://127.0.0.1:1", "timeout": "500ms"})
	if err != nil {
		t.Fatalf("unreachable backend must still build: %v", err)
	}
	if h := p.Health(context.Background()); h.OK || h.Error == "" {
		t.Fatalf("health of unreachable backend: %+v", h)
	}
}

// Generate is never retried blindly; sign is retried on 503 a bounded number of times.
func TestRetryPolicy(t *testing.T) {
	cs := &contractServer{}
	cs.start(t)
	p := mustProvider(t, map[string]any{"baseUrl": cs.url()})
	defer p.Close()
	ctx := context.Background()

	cs.failGen.Store(1)
	before := cs.calls.generate.Load()
	_, err := p.Generate(ctx, providers.KeySpec{KID: "g1", Alg: "ES256"})
	if errs.KindOf(err) != errs.Unavailable {
		t.Fatalf("generate on 503: %v, want KindUnavailable", err)
	}
	if n := cs.calls.generate.Load() - before; n != 1 {
		t.Fatalf("generate was attempted %d times, want exactly 1", n)
	}

	ref, err := p.Generate(ctx, providers.KeySpec{KID: "g2", Alg: "ES256"})
	if err != nil {
		t.Fatal(err)
	}
	cs.failSign.Store(2)
	before = cs.calls.sign.Load()
	if _, err := p.SignMessage(ctx, ref, "ES256", []byte("m")); err != nil {
		t.Fatalf("sign after two 503s should succeed on the third attempt: %v", err)
	}
	if n := cs.calls.sign.Load() - before; n != 3 {
		t.Fatalf("sign attempts = %d, want 3", n)
	}
	cs.failSign.Store(10)
	before = cs.calls.sign.Load()
	_, err = p.SignMessage(ctx, ref, "ES256", []byte("m"))
	if errs.KindOf(err) != errs.Unavailable {
		t.Fatalf("sign on persistent 503: %v", err)
	}
	if n := cs.calls.sign.Load() - before; n != 3 {
		t.Fatalf("sign attempts on persistent 503 = %d, want 3 (bounded)", n)
	}
	cs.failSign.Store(0)

	// Duplicate kid: the remote's 409 becomes KindConflict.
	if _, err := p.Generate(ctx, providers.KeySpec{KID: "g2", Alg: "ES256"}); errs.KindOf(err) != errs.Conflict {
		t.Fatalf("duplicate generate: %v, want KindConflict", err)
	}
}

// Keys created before remote names were tenant-scoped are stored with ExternalID == kid (or, from
// older records, no ExternalID): they must keep working under that name, reserved characters
// included (one percent-encoded path segment).
func TestLegacyRefUsesStoredRemoteName(t *testing.T) {
	cs := &contractServer{}
	cs.start(t)
	p := mustProvider(t, map[string]any{"baseUrl": cs.url()})
	defer p.Close()
	ctx := context.Background()
	kid := "chain/1 ?#%-active"
	legacy, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	cs.mu.Lock()
	cs.keys[kid] = legacy // what the remote holds for a key created by an older kmsgate
	cs.mu.Unlock()
	for _, ext := range []string{kid, ""} {
		ref := providers.KeyRef{Tenant: "t1", KID: kid, ExternalID: ext, Public: &legacy.PublicKey}
		if _, err := p.SignMessage(ctx, ref, "ES256", []byte("m")); err != nil {
			t.Fatalf("sign with legacy ref (ExternalID %q): %v", ext, err)
		}
	}
	if err := p.Delete(ctx, providers.KeyRef{Tenant: "t1", KID: kid, ExternalID: kid}); err != nil {
		t.Fatal(err)
	}
	cs.mu.Lock()
	_, still := cs.keys[kid]
	cs.mu.Unlock()
	if still {
		t.Fatal("delete of a legacy ref did not delete the remote key it names")
	}
}

// Two tenants on one remote: the same kid must give two distinct remote keys, and nothing one
// tenant does to its kid may touch the other's key.
func TestTenantsAreSeparateOnOneRemote(t *testing.T) {
	cs := &contractServer{canImport: true}
	cs.start(t)
	p := mustProvider(t, map[string]any{"baseUrl": cs.url(), "canImport": true})
	defer p.Close()
	ctx := context.Background()
	const kid = "access-key-chain-active" // public: it is the kid in every JWS header

	ra, err := p.Generate(ctx, providers.KeySpec{Tenant: "tenant-a", KID: kid, Alg: "ES256"})
	if err != nil {
		t.Fatal(err)
	}
	rb, err := p.Generate(ctx, providers.KeySpec{Tenant: "tenant-b", KID: kid, Alg: "ES256"})
	if err != nil {
		t.Fatalf("tenant b generating a kid tenant a already uses: %v", err)
	}
	if ra.ExternalID == rb.ExternalID || ra.ExternalID == kid || rb.ExternalID == kid || keyutil.SameKey(ra.Public, rb.Public) {
		t.Fatalf("tenants share a remote key: a=%q b=%q", ra.ExternalID, rb.ExternalID)
	}
	cs.mu.Lock()
	names := make([]string, 0, len(cs.keys))
	for n := range cs.keys {
		names = append(names, n)
	}
	cs.mu.Unlock()
	if len(names) != 2 || !slices.Contains(names, ra.ExternalID) || !slices.Contains(names, rb.ExternalID) {
		t.Fatalf("remote holds %q, want exactly the two tenant-scoped names %q and %q", names, ra.ExternalID, rb.ExternalID)
	}

	signA := func(when string) {
		t.Helper()
		msg := []byte("tenant a " + when)
		sig, err := p.SignMessage(ctx, ra, "ES256", msg)
		if err != nil {
			t.Fatalf("tenant a sign %s: %v", when, err)
		}
		d := sha256.Sum256(msg)
		if !keyutil.VerifyRawDigest(ra.Public, d[:], sig) {
			t.Fatalf("tenant a signature %s does not verify with a's key", when)
		}
		if pub, err := p.PublicKey(ctx, ra); err != nil || !keyutil.SameKey(pub, ra.Public) {
			t.Fatalf("tenant a public key %s: %v", when, err)
		}
	}
	signA("after b generated")

	// b overwrites its kid by import: a's key is untouched.
	priv, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	rbi, err := p.Import(ctx, providers.KeySpec{Tenant: "tenant-b", KID: kid, Alg: "ES256"}, priv)
	if err != nil {
		t.Fatal(err)
	}
	if rbi.ExternalID != rb.ExternalID {
		t.Fatalf("re-import of the same tenant and kid moved the key: %q then %q (must upsert in place)", rb.ExternalID, rbi.ExternalID)
	}
	if pub, _ := p.PublicKey(ctx, rb); !keyutil.SameKey(pub, &priv.PublicKey) {
		t.Fatal("public-key cache still holds b's replaced key")
	}
	signA("after b imported")

	// b deletes its kid: a's key still exists and signs.
	if err := p.Delete(ctx, rbi); err != nil {
		t.Fatal(err)
	}
	cs.mu.Lock()
	_, aExists := cs.keys[ra.ExternalID]
	_, bExists := cs.keys[rb.ExternalID]
	cs.mu.Unlock()
	if !aExists || bExists {
		t.Fatalf("after b's delete: a on remote %v (want true), b on remote %v (want false)", aExists, bExists)
	}
	signA("after b deleted")

	// The names are stable (so records find their key again) and injective in (tenant, kid).
	if RemoteName("tenant-a", kid) != ra.ExternalID {
		t.Fatal("RemoteName is not what Generate used")
	}
	if RemoteName("ab", "c") == RemoteName("a", "bc") || RemoteName("a\x00", "b") == RemoteName("a", "\x00b") {
		t.Fatal("RemoteName collides when the tenant/kid boundary moves")
	}
}

// A remote's error text (which may name keys or expose internals) never reaches the caller: it
// gets a stable code and a fixed message, and the text goes to the log.
func TestRemoteErrorTextNeverReachesCaller(t *testing.T) {
	const secret = "SECRET-internal-db-10.9.8.7-key-tenant-a-exists"
	var status atomic.Int32
	var plain atomic.Bool
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if plain.Load() {
			w.WriteHeader(int(status.Load()))
			_, _ = w.Write([]byte("<html>" + secret + "</html>"))
			return
		}
		writeErr(w, int(status.Load()), secret)
	}))
	defer srv.Close()
	var logs syncBuffer
	raw, _ := json.Marshal(map[string]any{"baseUrl": srv.URL, "canImport": true, "timeout": "2s"})
	p, err := New(context.Background(), providers.Config{ID: "remote", Type: "http", Raw: raw},
		slog.New(slog.NewTextHandler(&logs, nil)))
	if err != nil {
		t.Fatal(err)
	}
	p.retryBackoff = nil // 5xx answers are not retried here: one attempt each
	defer p.Close()
	ctx := context.Background()
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	ref := providers.KeyRef{Tenant: "t", KID: "k", ExternalID: RemoteName("t", "k"), Public: &k.PublicKey}
	ops := map[string]func() error{
		"generate": func() error {
			_, err := p.Generate(ctx, providers.KeySpec{Tenant: "t", KID: "k", Alg: "ES256"})
			return err
		},
		"import": func() error {
			_, err := p.Import(ctx, providers.KeySpec{Tenant: "t", KID: "k", Alg: "ES256"}, k)
			return err
		},
		"sign":   func() error { _, err := p.SignMessage(ctx, ref, "ES256", []byte("m")); return err },
		"delete": func() error { return p.Delete(ctx, ref) },
		"health": func() error {
			if h := p.Health(ctx); h.OK || strings.Contains(h.Error, secret) || h.Error == "" {
				return fmt.Errorf("health %+v", h)
			}
			return errors.New("health failed as expected")
		},
	}
	for _, st := range []int{400, 401, 403, 404, 409, 422, 429, 500, 503} {
		for _, isPlain := range []bool{false, true} {
			status.Store(int32(st))
			plain.Store(isPlain)
			for name, op := range ops {
				err := op()
				if err == nil && name == "delete" && st == 404 {
					continue // a gone key counts as deleted
				}
				if err == nil {
					t.Fatalf("%s on %d: no error", name, st)
				}
				for what, s := range map[string]string{"public message": errs.PublicMessage(err), "code": errs.CodeOf(err),
					"error": err.Error()} {
					if strings.Contains(s, "SECRET") {
						t.Fatalf("%s on %d (plain %v): %s carries the remote's text: %q", name, st, isPlain, what, s)
					}
				}
				if name != "health" && !strings.HasPrefix(errs.CodeOf(err), "remote_") {
					t.Fatalf("%s on %d: code %q, want a stable remote_* code", name, st, errs.CodeOf(err))
				}
			}
		}
	}
	status.Store(409)
	plain.Store(false)
	_, err = p.Generate(ctx, providers.KeySpec{Tenant: "t", KID: "k", Alg: "ES256"})
	if errs.KindOf(err) != errs.Conflict || errs.CodeOf(err) != "remote_conflict" {
		t.Fatalf("409: kind %v code %q", errs.KindOf(err), errs.CodeOf(err))
	}
	if l := logs.String(); !strings.Contains(l, secret) || !strings.Contains(l, "remote_status=409") || !strings.Contains(l, "provider=remote") {
		t.Fatalf("the remote's text must be logged with provider and status; log:\n%.2000s", l)
	}
}

// Network errors name the remote's URL and address: the caller-safe message and the health
// result must not.
func TestNetworkErrorsHideRemoteAddress(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close() // nothing listens there now: connection refused
	p := mustProvider(t, map[string]any{"baseUrl": "http://" + addr + "/kms", "timeout": "1s"})
	defer p.Close()
	p.retryBackoff = nil
	h := p.Health(context.Background())
	if h.OK || h.Error == "" || strings.Contains(h.Error, "127.0.0.1") || strings.Contains(h.Error, "/kms") ||
		strings.Contains(h.Error, "refused") {
		t.Fatalf("health of an unreachable remote: %q (want a short reason without address or network error)", h.Error)
	}
	_, err = p.SignMessage(context.Background(), providers.KeyRef{KID: "k"}, "ES256", []byte("m"))
	if errs.KindOf(err) != errs.Unavailable || errs.CodeOf(err) != "remote_unreachable" ||
		strings.Contains(errs.PublicMessage(err), "127.0.0.1") {
		t.Fatalf("sign against an unreachable remote: kind %v code %q message %q", errs.KindOf(err), errs.CodeOf(err), errs.PublicMessage(err))
	}
	var ue *url.Error
	if !errors.As(err, &ue) {
		t.Fatalf("the network error must stay available to logs as the wrapped cause: %v", err)
	}
}

// A redirect would carry the credential and the request body (a private JWK on import) to a host
// nobody configured. Neither may leave: the first answer is final and a 3xx is an error.
func TestRedirectsRefused(t *testing.T) {
	var leaked atomic.Int32
	var leakedWhat atomic.Value
	elsewhere := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		leaked.Add(1)
		b, _ := io.ReadAll(r.Body)
		leakedWhat.Store(r.Method + " " + r.URL.Path + " x-api-key=" + r.Header.Get("x-api-key") + " body=" + string(b))
		writeJSON(w, 200, map[string]any{"ok": true, "access_token": "stolen", "expires_in": 60})
	}))
	defer elsewhere.Close()
	var code atomic.Int32
	redirector := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Redirect(w, r, elsewhere.URL+r.URL.Path, int(code.Load()))
	}))
	defer redirector.Close()
	check := func(t *testing.T, what string, err error) {
		t.Helper()
		if n := leaked.Load(); n != 0 {
			t.Fatalf("%s: the redirect target received %d request(s): %v", what, n, leakedWhat.Load())
		}
		if err == nil {
			t.Fatalf("%s: a redirect was accepted as an answer", what)
		}
	}
	ctx := context.Background()
	for _, c := range []int{http.StatusTemporaryRedirect, http.StatusPermanentRedirect, http.StatusFound} {
		code.Store(int32(c))
		t.Run(strconv.Itoa(c), func(t *testing.T) {
			p := mustProvider(t, map[string]any{"baseUrl": redirector.URL, "apiKey": "xk-secret", "apiKeyHeader": "x-api-key",
				"canImport": true, "timeout": "2s"})
			defer p.Close()
			priv, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
			_, err := p.Import(ctx, providers.KeySpec{Tenant: "t", KID: "k", Alg: "ES256"}, priv)
			check(t, "import", err)
			if errs.KindOf(err) != errs.Unavailable || errs.CodeOf(err) != "remote_redirect" {
				t.Fatalf("import answered by a redirect: kind %v code %q, want Unavailable remote_redirect", errs.KindOf(err), errs.CodeOf(err))
			}
			_, err = p.Generate(ctx, providers.KeySpec{Tenant: "t", KID: "k", Alg: "ES256"})
			check(t, "generate", err)
			_, err = p.SignMessage(ctx, providers.KeyRef{KID: "k", Public: &priv.PublicKey}, "ES256", []byte("m"))
			check(t, "sign", err)
			if errs.CodeOf(err) != "remote_redirect" {
				t.Fatalf("sign answered by a redirect: code %q", errs.CodeOf(err))
			}
			h := p.Health(ctx)
			check(t, "health", errors.New(h.Error))
			if h.OK || strings.Contains(h.Error, elsewhere.URL) {
				t.Fatalf("health answered by a redirect: %+v", h)
			}

			// The OAuth2 token request carries the client secret: it must not follow either.
			po := mustProvider(t, map[string]any{"baseUrl": elsewhere.URL, "timeout": "2s", "auth": map[string]any{
				"type": "oauth2-client-credentials", "tokenUrl": redirector.URL + "/token", "clientId": "c", "clientSecret": "cs-secret"}})
			defer po.Close()
			ho := po.Health(ctx)
			check(t, "oauth2 token fetch", errors.New(ho.Error))
			if ho.OK {
				t.Fatalf("health with a redirecting token endpoint: %+v", ho)
			}
		})
	}
}

// syncBuffer is a log sink safe for the provider's concurrent writes.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// A misbehaving remote: the provider must reject what the contract forbids.
func TestResponseValidation(t *testing.T) {
	var mode atomic.Value
	mode.Store("")
	srv := &http.Server{ReadHeaderTimeout: 5 * time.Second, Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch m := mode.Load().(string); m {
		case "offcurve":
			writeJSON(w, 200, map[string]any{"publicJwk": map[string]string{"kty": "EC", "crv": "P-256",
				"x": "AQAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", "y": "AQAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"}})
		case "der":
			writeJSON(w, 200, map[string]string{"signature": strings.Repeat("MEUCIQ", 12)})
		case "garbage":
			writeJSON(w, 200, map[string]string{"signature": strings.Repeat("A", 86)}) // 64 zero bytes: does not verify
		case "429":
			w.Header().Set("Retry-After", "7")
			writeErr(w, 429, "slow down")
		case "500big":
			writeErr(w, 500, strings.Repeat("x", 10000))
		case "404":
			writeErr(w, 404, "unknown key")
		}
	})}
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	go srv.Serve(ln)
	defer srv.Close()
	p := mustProvider(t, map[string]any{"baseUrl": "http://" + ln.Addr().String(), "canImport": true})
	defer p.Close()
	ctx := context.Background()
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	ref := providers.KeyRef{KID: "k", ExternalID: "k", Public: &k.PublicKey}

	mode.Store("offcurve")
	if _, err := p.Generate(ctx, providers.KeySpec{KID: "k", Alg: "ES256"}); err == nil || !strings.Contains(err.Error(), "P-256") {
		t.Fatalf("off-curve publicJwk accepted: %v", err)
	}
	mode.Store("der")
	if _, err := p.SignMessage(ctx, ref, "ES256", []byte("m")); err == nil || !strings.Contains(err.Error(), "64 bytes") {
		t.Fatalf("non-64-byte signature accepted: %v", err)
	}
	mode.Store("garbage")
	if _, err := p.SignMessage(ctx, ref, "ES256", []byte("m")); err == nil {
		t.Fatal("non-verifying signature accepted")
	}
	mode.Store("429")
	_, err := p.SignMessage(ctx, ref, "ES256", []byte("m"))
	if errs.KindOf(err) != errs.Throttled || errs.RetryAfterOf(err) != 7*time.Second {
		t.Fatalf("429: %v (kind %v, retry %v), want KindThrottled with Retry-After 7s", err, errs.KindOf(err), errs.RetryAfterOf(err))
	}
	mode.Store("500big")
	_, err = p.SignMessage(ctx, ref, "ES256", []byte("m"))
	if errs.KindOf(err) != errs.Internal || !strings.Contains(err.Error(), "500") || len(err.Error()) > 600 {
		t.Fatalf("500 with a large body: kind %v, %d-char error %.100q", errs.KindOf(err), len(err.Error()), err)
	}
	mode.Store("404")
	if _, err := p.SignMessage(ctx, ref, "ES256", []byte("m")); errs.KindOf(err) != errs.NotFound {
		t.Fatalf("404 on sign: %v, want KindNotFound", err)
	}
	if _, err := p.Import(ctx, providers.KeySpec{KID: "k", Alg: "ES256"}, k); errs.KindOf(err) != errs.NotSupported {
		t.Fatalf("404 on import: %v, want KindNotSupported", err)
	}
	if err := p.Delete(ctx, ref); err != nil {
		t.Fatalf("404 on delete must count as already gone: %v", err)
	}
}

func newCA(t *testing.T) (*x509.Certificate, *ecdsa.PrivateKey) {
	t.Helper()
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), IsCA: true,
		BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	der, err := x509.CreateCertificate(rand.Reader, tpl, tpl, &k.PublicKey, k)
	if err != nil {
		t.Fatal(err)
	}
	c, _ := x509.ParseCertificate(der)
	return c, k
}

func issue(t *testing.T, ca *x509.Certificate, caKey *ecdsa.PrivateKey, name string, usage x509.ExtKeyUsage) tls.Certificate {
	t.Helper()
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tpl := &x509.Certificate{SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{usage}}
	if ip := net.ParseIP(name); ip != nil {
		tpl.IPAddresses = []net.IP{ip}
	}
	der, err := x509.CreateCertificate(rand.Reader, tpl, ca, &k.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: k}
}

func writePEM(t *testing.T, path, typ string, der []byte) {
	t.Helper()
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
}
