package extauth_test

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kmsgate/kmsgate/appliance/extauth"
	"github.com/kmsgate/kmsgate/appliance/store"
	"github.com/kmsgate/kmsgate/appliance/tenants"
	"github.com/kmsgate/kmsgate/internal/testenv"
)

// newTenants is the real tenants service on a throwaway store, with tenant "acme".
func newTenants(t *testing.T) *tenants.Service {
	t.Helper()
	st, err := store.Open(t.TempDir(), store.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	svc, err := tenants.New(context.Background(), st)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := svc.CreateTenant(context.Background(), tenants.CreateTenantRequest{ID: "acme"}); err != nil {
		t.Fatal(err)
	}
	return svc
}

func issuerConfig(vi *testenv.VaultOIDC, audience string) extauth.Issuer {
	return extauth.Issuer{Issuer: vi.Issuer, JWKSURL: vi.JWKSURL, Audience: audience, Algorithms: []string{"ES256"},
		TenantClaim: "tenant", RolesClaim: "roles"}
}

func TestVaultIdentityTokens(t *testing.T) {
	vi := testenv.StartVaultOIDC(t)
	ten := newTenants(t)
	aud := vi.Role("eudiplo", `{"tenant": "acme", "roles": "issuance:manage"}`, "5m")
	otherAud := vi.Role("other-client", `{"tenant": "acme", "roles": "issuance:manage"}`, "5m")
	vi.Role("arr", `{"tenant": "acme", "roles": ["sign", "bogus", "admin"]}`, "5m")
	vi.Role("noroles", `{"tenant": "acme", "roles": "bogus admin"}`, "5m")
	vi.Role("ghost", `{"tenant": "ghost", "roles": "issuance:manage"}`, "5m")
	vi.Role("custom", `{"tenant": "acme", "roles": ["kms-exporter"]}`, "5m")
	if otherAud == aud {
		t.Fatal("vault gave two roles the same client id")
	}
	// The "arr", "noroles", "ghost" and "custom" roles get their own random client ids; the
	// verifier's audience is the eudiplo role's, so give them the same one.
	for _, r := range []string{"arr", "noroles", "ghost", "custom"} {
		vi.SetClientID(r, aud)
	}
	cfg := issuerConfig(vi, aud)
	cfg.RoleMap = map[string][]string{"kms-exporter": {"sign", "export"}}
	ver, err := extauth.New([]extauth.Issuer{cfg}, ten)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if got := ver.Issuers(); len(got) != 1 || got[0] != vi.Issuer {
		t.Fatalf("Issuers() = %v, want [%s]", got, vi.Issuer)
	}

	t.Run("valid", func(t *testing.T) {
		tok := vi.Token("eudiplo")
		p, err := ver.VerifyToken(ctx, tok)
		if err != nil {
			t.Fatalf("valid vault token refused: %v", err)
		}
		if p.TenantID != "acme" || strings.Join(p.Roles, ",") != "manage,sign" {
			t.Fatalf("principal = %+v, want tenant acme roles manage,sign", p)
		}
		if !strings.HasPrefix(p.CredentialID, extauth.CredentialPrefix) || len(p.CredentialID) != len("ext:")+32 {
			t.Fatalf("credential id %q is not ext:<hash>", p.CredentialID)
		}
		p2, err := ver.VerifyToken(ctx, vi.Token("eudiplo"))
		if err != nil || p2.CredentialID != p.CredentialID {
			t.Fatalf("second token of the same entity: %v, credential %q vs %q", err, p2.CredentialID, p.CredentialID)
		}
	})
	t.Run("roles array, unknown and admin ignored", func(t *testing.T) {
		p, err := ver.VerifyToken(ctx, vi.Token("arr"))
		if err != nil || strings.Join(p.Roles, ",") != "sign" {
			t.Fatalf("got %+v, %v; want roles sign", p, err)
		}
	})
	t.Run("roleMap", func(t *testing.T) {
		p, err := ver.VerifyToken(ctx, vi.Token("custom"))
		if err != nil || strings.Join(p.Roles, ",") != "sign,export" {
			t.Fatalf("got %+v, %v; want roles sign,export", p, err)
		}
	})

	valid := vi.Token("eudiplo")
	// These two tokens cannot come from Vault (it never signs with none or HS256): the test crafts
	// them from a genuine Vault token, keeping its claims and kid.
	algNone := reheader(t, valid, func(h map[string]any) { h["alg"] = "none" }, nil)
	hsPub := reheader(t, valid, func(h map[string]any) { h["alg"] = "HS256" }, fetchJWKS(t, vi.JWKSURL))

	wrongIss, err := extauth.New([]extauth.Issuer{{Issuer: vi.Issuer + "/other", JWKSURL: vi.JWKSURL, Audience: aud,
		Algorithms: []string{"ES256"}, TenantClaim: "tenant", RolesClaim: "roles"}}, ten)
	if err != nil {
		t.Fatal(err)
	}
	rsOnly := issuerConfig(vi, aud)
	rsOnly.Algorithms = []string{"RS256"}
	rsOnlyVer, err := extauth.New([]extauth.Issuer{rsOnly}, ten)
	if err != nil {
		t.Fatal(err)
	}
	afterExpiry := func(d time.Duration) *extauth.Verifier {
		v, err := extauth.New([]extauth.Issuer{cfg}, ten, extauth.WithClock(func() time.Time { return time.Now().Add(d) }))
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
	shortTok := func() string {
		vi.Role("short", `{"tenant": "acme", "roles": "issuance:manage"}`, "2s")
		vi.SetClientID("short", aud)
		return vi.Token("short")
	}()

	for _, tc := range []struct {
		name string
		ver  *extauth.Verifier
		tok  string
		want string // in the (logged) reason, so each row fails for its own reason
	}{
		{"wrong audience", ver, vi.Token("other-client"), "audience"},
		{"wrong issuer", wrongIss, valid, "is not trusted"},
		{"algorithm not allowed for the issuer", rsOnlyVer, valid, "algorithm not accepted"},
		// 2 s ttl, seen 2 s + leeway + 3 s later: the clock moves rather than the test sleeping 35 s.
		{"expired", afterExpiry(2*time.Second + extauth.Leeway + 3*time.Second), shortTok, "expired"},
		{"not yet valid (iat in the future)", afterExpiry(-(extauth.Leeway + 10*time.Second)), valid, "future"},
		{"alg none", ver, algNone, "algorithm not accepted"},
		{"HS256 signed with the public key", ver, hsPub, "algorithm not accepted"},
		{"tenant does not exist", ver, vi.Token("ghost"), `tenant "ghost" does not exist`},
		{"no kmsgate role", ver, vi.Token("noroles"), "no kmsgate role"},
		{"signature tampered", ver, tamper(valid), "signature does not verify"},
		{"garbage", ver, "not-a-jwt", "malformed"},
	} {
		t.Run("refused/"+tc.name, func(t *testing.T) {
			p, err := tc.ver.VerifyToken(ctx, tc.tok)
			if err == nil {
				t.Fatalf("accepted: %+v", p)
			}
			if !errors.Is(err, tenants.ErrUnauthenticated) {
				t.Fatalf("refusal %v does not wrap ErrUnauthenticated", err)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("refused for another reason: %v (want %q)", err, tc.want)
			}
		})
	}
	t.Run("expired token within the leeway is accepted", func(t *testing.T) {
		if _, err := afterExpiry(2*time.Second+extauth.Leeway-5*time.Second).VerifyToken(ctx, shortTok); err != nil {
			t.Fatalf("refused within the leeway: %v", err)
		}
	})
}

// TestVaultKeyRotation: after Vault rotates its key, a token with the new kid makes the verifier
// refetch the JWKS (once, rate-limited) and accept it; the old key stays accepted while Vault
// still publishes it.
func TestVaultKeyRotation(t *testing.T) {
	vi := testenv.StartVaultOIDC(t)
	ten := newTenants(t)
	aud := vi.Role("eudiplo", `{"tenant": "acme", "roles": "presentation:manage"}`, "5m")
	var fetches atomic.Int32
	proxy := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fetches.Add(1)
		resp, err := http.Get(vi.JWKSURL)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadGateway)
			return
		}
		defer resp.Body.Close()
		w.WriteHeader(resp.StatusCode)
		_, _ = io.Copy(w, resp.Body)
	}))
	t.Cleanup(proxy.Close)
	cfg := issuerConfig(vi, aud)
	cfg.JWKSURL = proxy.URL
	const interval = time.Second
	ver, err := extauth.New([]extauth.Issuer{cfg}, ten, extauth.WithRefreshInterval(interval))
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	old := vi.Token("eudiplo")
	if p, err := ver.VerifyToken(ctx, old); err != nil || strings.Join(p.Roles, ",") != "manage,sign" {
		t.Fatalf("first token: %+v, %v", p, err)
	}
	if n := fetches.Load(); n != 1 {
		t.Fatalf("fetches after the first token = %d, want 1", n)
	}
	start := time.Now()
	// Vault publishes its next key ahead of each rotation, so after one rotation the new kid was
	// already in the first fetch; after two the signing key is one the cache has never seen.
	vi.Rotate()
	vi.Rotate()
	fresh := vi.Token("eudiplo")
	if kid(t, fresh) == kid(t, old) {
		t.Fatal("vault rotation did not change the kid")
	}
	// A burst of tokens with kids the cache lacks, inside the rate-limit window: no fetch at all.
	var wg sync.WaitGroup
	for i := range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			forged := reheader(t, fresh, func(h map[string]any) { h["kid"] = fmt.Sprintf("made-up-%d", i) }, nil)
			if _, err := ver.VerifyToken(ctx, forged); err == nil {
				t.Error("token with a made-up kid accepted")
			}
		}()
	}
	wg.Wait()
	if time.Since(start) < interval {
		if n := fetches.Load(); n != 1 {
			t.Fatalf("fetches within the rate-limit window = %d, want still 1", n)
		}
	}
	time.Sleep(interval - time.Since(start) + 100*time.Millisecond)
	// Now a burst of the new token: one refetch (single flight), all accepted.
	for range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := ver.VerifyToken(ctx, fresh); err != nil {
				t.Errorf("token with the rotated kid refused: %v", err)
			}
		}()
	}
	wg.Wait()
	if n := fetches.Load(); n != 2 {
		t.Fatalf("fetches after the rotated token = %d, want 2 (one refresh for the burst)", n)
	}
	if _, err := ver.VerifyToken(ctx, old); err != nil {
		t.Fatalf("token of the previous key (still published) refused: %v", err)
	}
}

// TestJWKSFetchLimits: a JWKS URL that redirects to another host, answers an oversized body or is
// down never verifies a token, and the error does not escape as anything but a 401 refusal.
func TestJWKSFetchLimits(t *testing.T) {
	vi := testenv.StartVaultOIDC(t)
	ten := newTenants(t)
	aud := vi.Role("eudiplo", `{"tenant": "acme", "roles": "sign"}`, "5m")
	tok := vi.Token("eudiplo")
	redirect := httptest.NewServer(http.RedirectHandler(vi.JWKSURL, http.StatusFound)) // Vault: another port = another host
	t.Cleanup(redirect.Close)
	huge := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = w.Write([]byte(`{"keys":[],"pad":"`))
		_, _ = w.Write(bytes.Repeat([]byte("a"), 2<<20))
		_, _ = w.Write([]byte(`"}`))
	}))
	t.Cleanup(huge.Close)
	down := httptest.NewServer(http.NotFoundHandler())
	down.Close()
	for name, url := range map[string]string{"redirect to another host": redirect.URL, "oversized": huge.URL,
		"down": down.URL} {
		t.Run(name, func(t *testing.T) {
			cfg := issuerConfig(vi, aud)
			cfg.JWKSURL = url
			ver, err := extauth.New([]extauth.Issuer{cfg}, ten)
			if err != nil {
				t.Fatal(err)
			}
			_, err = ver.VerifyToken(context.Background(), tok)
			if err == nil || !errors.Is(err, tenants.ErrUnauthenticated) {
				t.Fatalf("got %v, want an ErrUnauthenticated refusal", err)
			}
		})
	}
	// The direct URL works, so the refusals above are the fetch policy's doing.
	ver, err := extauth.New([]extauth.Issuer{issuerConfig(vi, aud)}, ten)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ver.VerifyToken(context.Background(), tok); err != nil {
		t.Fatalf("direct JWKS URL: %v", err)
	}
}

// reheader rewrites a compact JWS's protected header. With hmacKey set it re-signs the result with
// HMAC-SHA256 under that key (the "HS256 with the public key" attack); otherwise it keeps the
// original signature, or drops it for alg none.
func reheader(t *testing.T, tok string, edit func(map[string]any), hmacKey []byte) string {
	t.Helper()
	parts := strings.Split(tok, ".")
	hb, err := base64.RawURLEncoding.DecodeString(parts[0])
	if err != nil {
		t.Fatal(err)
	}
	var h map[string]any
	if err := json.Unmarshal(hb, &h); err != nil {
		t.Fatal(err)
	}
	edit(h)
	nb, _ := json.Marshal(h)
	head := base64.RawURLEncoding.EncodeToString(nb)
	sig := parts[2]
	switch {
	case hmacKey != nil:
		m := hmac.New(sha256.New, hmacKey)
		m.Write([]byte(head + "." + parts[1]))
		sig = base64.RawURLEncoding.EncodeToString(m.Sum(nil))
	case h["alg"] == "none":
		sig = ""
	}
	return head + "." + parts[1] + "." + sig
}

func tamper(tok string) string {
	parts := strings.Split(tok, ".")
	b, _ := base64.RawURLEncoding.DecodeString(parts[2])
	b[len(b)/2] ^= 1
	return parts[0] + "." + parts[1] + "." + base64.RawURLEncoding.EncodeToString(b)
}

func kid(t *testing.T, tok string) string {
	t.Helper()
	hb, _ := base64.RawURLEncoding.DecodeString(strings.Split(tok, ".")[0])
	var h struct {
		Kid string `json:"kid"`
	}
	if err := json.Unmarshal(hb, &h); err != nil {
		t.Fatal(err)
	}
	return h.Kid
}

// fetchJWKS returns the raw JWKS document: the public bytes an attacker would use as an HMAC key.
func fetchJWKS(t *testing.T, url string) []byte {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return b
}
