package keychain_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	jose "github.com/go-jose/go-jose/v4"

	"github.com/kmsgate/kmsgate/appliance"
	"github.com/kmsgate/kmsgate/appliance/keychain"
	"github.com/kmsgate/kmsgate/internal/apptest"
	"github.com/kmsgate/kmsgate/internal/errs"
	"github.com/kmsgate/kmsgate/internal/keyutil"
	"github.com/kmsgate/kmsgate/internal/testenv"
	"github.com/kmsgate/kmsgate/providers"
)

// TestChainSuiteDB runs the provider-agnostic suite on the db provider. Other providers (pkcs11
// on SoftHSM2, …) re-run it with their kms.json and provider id.
func TestChainSuiteDB(t *testing.T) { RunChainSuite(t, "", "db") }

// TestChainSuiteDBOnPostgres runs the same suite with every record in PostgreSQL.
func TestChainSuiteDBOnPostgres(t *testing.T) {
	testenv.NeedsBackend(t, "postgres")
	dsn := testenv.StartPostgres(t).NewDatabase(t)
	RunChainSuite(t, "", "db", func(o *appliance.Options) { o.Store = dsn })
}

// offsetClock is real time plus a movable offset, so the scheduler (real ticker) sees moved time.
type offsetClock struct{ off atomic.Int64 }

func (c *offsetClock) now() time.Time          { return time.Now().Add(time.Duration(c.off.Load())) }
func (c *offsetClock) advance(d time.Duration) { c.off.Add(int64(d)) }

func do(t *testing.T, in *apptest.Instance, method, path, key string, body any, want int) []byte {
	t.Helper()
	st, b := in.Do(method, path, key, body)
	if st != want {
		t.Fatalf("%s %s: status %d, want %d: %s", method, path, st, want, b)
	}
	return b
}

func certsOf(t *testing.T, pemStr string) []*x509.Certificate {
	t.Helper()
	var out []*x509.Certificate
	rest := []byte(pemStr)
	for {
		var blk *pem.Block
		blk, rest = pem.Decode(rest)
		if blk == nil {
			break
		}
		c, err := x509.ParseCertificate(blk.Bytes)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, c)
	}
	if len(out) == 0 {
		t.Fatalf("no certificates in %q", pemStr)
	}
	return out
}

func opensslVerifyChain(t *testing.T, at time.Time, root *x509.Certificate, leaf *x509.Certificate) {
	t.Helper()
	testenv.NeedsBackend(t, "openssl")
	dir := t.TempDir()
	w := func(n string, c *x509.Certificate) string {
		p := filepath.Join(dir, n)
		if err := os.WriteFile(p, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw}), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	out, err := exec.Command("openssl", "verify", "-x509_strict", "-attime", strconv.FormatInt(at.Unix(), 10), "-CAfile", w("root.pem", root), w("leaf.pem", leaf)).CombinedOutput()
	if err != nil || !strings.Contains(string(out), ": OK") {
		t.Fatalf("openssl verify: %v %s", err, out)
	}
}

// verifyCompact verifies a compact JWS with go-jose against a JWKS; with root set, also its x5c
// chain with the root as the only trust anchor.
func verifyCompact(t *testing.T, compact string, jwks []byte, root *x509.Certificate) {
	t.Helper()
	obj, err := jose.ParseSignedCompact(compact, []jose.SignatureAlgorithm{jose.ES256})
	if err != nil {
		t.Fatal(err)
	}
	var set jose.JSONWebKeySet
	if err := json.Unmarshal(jwks, &set); err != nil {
		t.Fatal(err)
	}
	keys := set.Key(obj.Signatures[0].Header.KeyID)
	if len(keys) != 1 {
		t.Fatalf("kid %q: %d keys in JWKS %s", obj.Signatures[0].Header.KeyID, len(keys), jwks)
	}
	if _, err := obj.Verify(keys[0]); err != nil {
		t.Fatalf("verify with JWKS: %v", err)
	}
	if root != nil {
		pool := x509.NewCertPool()
		pool.AddCert(root)
		chains, err := obj.Signatures[0].Protected.Certificates(x509.VerifyOptions{Roots: pool})
		if err != nil {
			t.Fatalf("x5c does not verify to the root: %v", err)
		}
		if _, err := obj.Verify(chains[0][0].PublicKey); err != nil {
			t.Fatalf("verify with x5c leaf: %v", err)
		}
	}
}

type chainResp struct {
	ID                string `json:"id"`
	UsageType         string `json:"usageType"`
	Type              string `json:"type"`
	KMSProvider       string `json:"kmsProvider"`
	Description       string `json:"description"`
	ActivePublicKey   map[string]any
	ActiveCertificate *struct {
		PEM       string `json:"pem"`
		Subject   string `json:"subject"`
		Issuer    string `json:"issuer"`
		NotBefore string `json:"notBefore"`
	} `json:"activeCertificate"`
	RootCertificate *struct {
		PEM string `json:"pem"`
	} `json:"rootCertificate"`
	PreviousPublicKey *map[string]any `json:"previousPublicKey"`
	RotationPolicy    map[string]any  `json:"rotationPolicy"`
}

// RunChainSuite drives the /key-chain API end to end against one provider.
func RunChainSuite(t *testing.T, kmsJSON, providerID string, tweaks ...func(*appliance.Options)) {
	clock := &offsetClock{}
	in := apptest.Start(t, apptest.Options{KMSJSON: kmsJSON, Tweak: func(o *appliance.Options) {
		o.RotationCheckInterval = 50 * time.Millisecond
		o.RotationGrace = time.Hour
		for _, tw := range tweaks {
			tw(o)
		}
	}})
	in.App.KeyChains().SetClock(clock.now)
	ctx := context.Background()
	key := in.CreateTenant("t1")
	other := in.CreateTenant("t2")
	signOnly := in.CreateTenant("t3", "sign")
	exp, err := in.App.Tenants().AddKey(ctx, "t1", []string{"export"}, "exporter")
	if err != nil {
		t.Fatal(err)
	}
	prov, err := in.App.Registry().Get(providerID)
	if err != nil {
		t.Fatal(err)
	}

	// Bootstrap: access + attestation (internal CA) + encrypt (db). The encrypt chain is not
	// listed (as EUDIPLO, which lists usage=sign rows only), filtered or not.
	var list []chainResp
	list = nil
	apptest.JSON(t, do(t, in, "GET", "/key-chain", key, nil, 200), &list)
	usages := map[string]string{}
	for _, c := range list {
		usages[c.UsageType] = c.Type
	}
	if len(list) != 2 || usages["access"] != "internalChain" || usages["attestation"] != "internalChain" {
		t.Fatalf("bootstrap chains: %v", usages)
	}
	if n, err := in.App.KeyChains().Count(ctx, "t1"); err != nil || n != 3 {
		t.Fatalf("bootstrap made %d chains (%v), want 3 with the unlisted encrypt chain", n, err)
	}
	list = nil
	apptest.JSON(t, do(t, in, "GET", "/key-chain?usageType=encrypt", key, nil, 200), &list)
	if len(list) != 0 {
		t.Fatalf("encrypt chain listed: %+v", list)
	}
	do(t, in, "GET", "/key-chain?usageType=nope", key, nil, 400)

	// Providers and health.
	var provs keychain.ProvidersResponse
	apptest.JSON(t, do(t, in, "GET", "/key-chain/providers", key, nil, 200), &provs)
	var caps *providers.Capabilities
	for _, p := range provs.Providers {
		if p.Name == providerID {
			caps = &p.Capabilities
		}
	}
	if caps == nil || provs.Default == "" {
		t.Fatalf("providers: %+v", provs)
	}
	var health []map[string]any
	apptest.JSON(t, do(t, in, "GET", "/key-chain/providers/health", key, nil, 200), &health)
	if len(health) != len(provs.Providers) || health[0]["providerId"] == nil || health[0]["ok"] == nil {
		t.Fatalf("health: %v", health)
	}

	// Create (strict DTO, validation, unknown provider, roles).
	do(t, in, "POST", "/key-chain", key, `{"usageType":"attestation","type":"internalChain","extra":1}`, 400)
	do(t, in, "POST", "/key-chain", key, `{"usageType":"x","type":"internalChain"}`, 400)
	do(t, in, "POST", "/key-chain", key, `{"usageType":"access","type":"standalone","rotationPolicy":{"enabled":true,"intervalDays":0}}`, 400)
	b := do(t, in, "POST", "/key-chain", key, `{"usageType":"access","type":"standalone","kmsProvider":"ghost"}`, 400)
	if !strings.Contains(string(b), "unknown_provider") || !strings.Contains(string(b), providerID) {
		t.Errorf("unknown provider answer: %s", b)
	}
	do(t, in, "POST", "/key-chain", signOnly, map[string]any{"usageType": "access", "type": "standalone"}, 403)
	var created struct{ ID string }
	apptest.JSON(t, do(t, in, "POST", "/key-chain", key, map[string]any{"usageType": "statusList", "type": "internalChain",
		"kmsProvider": providerID, "description": "sl", "rotationPolicy": map[string]any{"enabled": true, "intervalDays": 1}}, 201), &created)
	id := created.ID
	var cr chainResp
	apptest.JSON(t, do(t, in, "GET", "/key-chain/"+id, key, nil, 200), &cr)
	if cr.KMSProvider != providerID || cr.Type != "internalChain" || cr.ActivePublicKey["kid"] != id+"-active" ||
		cr.ActivePublicKey["x"] != nil || cr.ActiveCertificate.Subject != "C=DE, CN=t1 Tenant" ||
		cr.ActiveCertificate.Issuer != "C=DE, CN=t1 Tenant Root CA" || cr.RotationPolicy["nextRotationAt"] == nil {
		t.Fatalf("GET chain: %+v", cr)
	}
	chain := certsOf(t, cr.ActiveCertificate.PEM)
	root := certsOf(t, cr.RootCertificate.PEM)[0]
	if len(chain) != 2 {
		t.Fatalf("active chain has %d certs", len(chain))
	}
	pool := x509.NewCertPool()
	pool.AddCert(root)
	if _, err := chain[0].Verify(x509.VerifyOptions{Roots: pool}); err != nil {
		t.Fatalf("x509.Verify: %v", err)
	}
	opensslVerifyChain(t, clock.now(), root, chain[0])

	// JWS (leaf x5c by default, full chain on request) verified with go-jose and the x5c chain.
	var js keychain.JWSResult
	apptest.JSON(t, do(t, in, "POST", "/key-chain/"+id+"/jws", key, map[string]any{"payload": map[string]any{"sub": "x"},
		"header": map[string]any{"typ": "statuslist+jwt"}}, 200), &js)
	jwks := do(t, in, "GET", "/key-chain/"+id+"/jwks", key, nil, 200)
	verifyCompact(t, js.JWS, jwks, root)
	var full keychain.JWSResult
	apptest.JSON(t, do(t, in, "POST", "/key-chain/"+id+"/jws", key, map[string]any{"payload": 1, "x5c": "chain"}, 200), &full)
	verifyCompact(t, full.JWS, jwks, root)
	do(t, in, "POST", "/key-chain/"+id+"/jws", key, map[string]any{"payload": 1, "header": map[string]any{"kid": "x"}}, 400)
	// The statusList usage route picks this chain (the tenant has one).
	var byUsage keychain.JWSResult
	apptest.JSON(t, do(t, in, "POST", "/key-chain/usage/statusList/jws", key, map[string]any{"payload": map[string]any{}}, 200), &byUsage)
	if byUsage.KID != id+"-active" {
		t.Errorf("usage route signed with %s", byUsage.KID)
	}

	// Raw sign (message and digest).
	var sr struct{ Signature, Kid string }
	apptest.JSON(t, do(t, in, "POST", "/key-chain/"+id+"/sign", key, map[string]any{"data": base64.StdEncoding.EncodeToString([]byte("hi"))}, 200), &sr)
	sig, _ := base64.RawURLEncoding.DecodeString(sr.Signature)
	if !keyutil.VerifyRaw(chain[0].PublicKey.(*ecdsa.PublicKey), []byte("hi"), sig) || sr.Kid != id+"-active" {
		t.Fatal("raw signature does not verify")
	}
	do(t, in, "POST", "/key-chain/"+id+"/sign", key, map[string]any{}, 400)
	do(t, in, "POST", "/key-chain/"+id+"/sign", other, map[string]any{"data": "aGk="}, 404)

	// Tenant isolation and roles.
	for _, r := range []struct{ m, p string }{{"GET", ""}, {"PUT", ""}, {"DELETE", ""}, {"POST", "/rotate"}, {"GET", "/jwks"}} {
		var body any
		if r.m == "PUT" {
			body = map[string]any{"description": "x"}
		}
		do(t, in, r.m, "/key-chain/"+id+r.p, other, body, 404)
	}
	// Unknown and over-long ids answer 404 on every mutation (they are looked up before any lock).
	for _, bad := range []string{strings.Repeat("z", 128), strings.Repeat("q", 2000), "no-such-chain"} {
		do(t, in, "PUT", "/key-chain/"+bad, key, map[string]any{"description": "x"}, 404)
		do(t, in, "DELETE", "/key-chain/"+bad, key, nil, 404)
		do(t, in, "POST", "/key-chain/"+bad+"/rotate", key, nil, 404)
	}
	do(t, in, "GET", "/key-chain/"+id+"/export", key, nil, 403) // manage+sign may not export
	do(t, in, "POST", "/key-chain/"+id+"/jws", exp.Key, map[string]any{"payload": 1}, 403)
	otherExp, _ := in.App.Tenants().AddKey(ctx, "t2", []string{"export"}, "exporter")
	do(t, in, "GET", "/key-chain/"+id+"/export", otherExp.Key, nil, 404)

	// Update.
	do(t, in, "PUT", "/key-chain/"+id, key, map[string]any{"description": "status lists", "rotationPolicy": map[string]any{"certValidityDays": 30}}, 204)
	do(t, in, "PUT", "/key-chain/"+id, key, map[string]any{"activeCertificate": cr.RootCertificate.PEM}, 400)
	apptest.JSON(t, do(t, in, "GET", "/key-chain/"+id, key, nil, 200), &cr)
	if cr.Description != "status lists" || cr.RotationPolicy["certValidityDays"] != float64(30) || cr.RotationPolicy["intervalDays"] != float64(1) {
		t.Fatalf("after PUT: %+v", cr)
	}

	// Scheduler: move the clock past the interval; it rotates on its own.
	refsBefore, err := in.App.KeyChains().KeyRefs(ctx, "t1", id)
	if err != nil {
		t.Fatal(err)
	}
	clock.advance(25 * time.Hour)
	waitFor(t, func() bool {
		cr = chainResp{}
		apptest.JSON(t, do(t, in, "GET", "/key-chain/"+id, key, nil, 200), &cr)
		return cr.PreviousPublicKey != nil
	})
	if (*cr.PreviousPublicKey)["kid"] != id+"-active" || cr.ActivePublicKey["kid"] == id+"-active" {
		t.Fatalf("after scheduled rotation: %+v", cr)
	}
	// The token signed before the rotation still verifies against the tenant JWKS during grace.
	tenantJWKS := do(t, in, "GET", "/jwks", key, nil, 200)
	verifyCompact(t, js.JWS, tenantJWKS, nil)
	newChain := certsOf(t, cr.ActiveCertificate.PEM)
	opensslVerifyChain(t, clock.now(), root, newChain[0])
	// Manual rotate → 201; both rotated-out keys stay until their own grace ends.
	do(t, in, "POST", "/key-chain/"+id+"/rotate", key, nil, 204)
	// After the grace period the scheduler removes the previous keys from the JWKS and the backend.
	refsMid, _ := in.App.KeyChains().KeyRefs(ctx, "t1", id)
	prevRef := refsMid["previous"]
	clock.advance(2 * time.Hour)
	waitFor(t, func() bool {
		cr = chainResp{}
		apptest.JSON(t, do(t, in, "GET", "/key-chain/"+id, key, nil, 200), &cr)
		return cr.PreviousPublicKey == nil
	})
	var set jose.JSONWebKeySet
	apptest.JSON(t, do(t, in, "GET", "/key-chain/"+id+"/jwks", key, nil, 200), &set)
	if len(set.Keys) != 1 || set.Keys[0].KeyID != cr.ActivePublicKey["kid"] {
		t.Fatalf("JWKS after grace: %+v", set.Keys)
	}
	if len(set.Key(prevRef.KID)) != 0 {
		t.Fatal("expired key still published")
	}
	if prov.Type() != providers.TypeDB {
		// db keys live in the chain record (gone with it); external backends must say NotFound.
		for _, r := range []providers.KeyRef{refsBefore["active"], prevRef} {
			if _, err := prov.PublicKey(ctx, r); !isNotFound(err) {
				t.Errorf("rotated-out key %s still in the backend: %v", r.KID, err)
			}
		}
	}

	// Import: three modes plus validation, where the provider can import.
	if caps.CanImport {
		runImport(t, in, key, providerID)
	} else {
		k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		j, _ := keyutil.PrivateJWK(k, "", "ES256")
		do(t, in, "POST", "/key-chain/import", key, map[string]any{"usageType": "access", "key": j, "kmsProvider": providerID}, 405)
	}

	// Export (export role only): db gives private JWKs and re-imports losslessly.
	var ex keychain.Export
	apptest.JSON(t, do(t, in, "GET", "/key-chain/"+id+"/export", exp.Key, nil, 200), &ex)
	if ex.ID != id || ex.UsageType != "statusList" || len(ex.Crt) != 1 || ex.ActiveKey == nil || len(ex.ActiveCrt) != 2 {
		t.Fatalf("export: %+v", ex)
	}
	if prov.Type() == providers.TypeDB {
		if !ex.PrivateKeyExportable || ex.Key.D == "" || ex.ActiveKey.D == "" {
			t.Fatal("db export lacks private keys")
		}
		var imp struct{ ID string }
		apptest.JSON(t, do(t, in, "POST", "/key-chain/import", other, ex, 201), &imp)
		var ocr chainResp
		apptest.JSON(t, do(t, in, "GET", "/key-chain/"+imp.ID, other, nil, 200), &ocr)
		apptest.JSON(t, do(t, in, "GET", "/key-chain/"+id, key, nil, 200), &cr)
		if imp.ID != id || ocr.ActiveCertificate.PEM != cr.ActiveCertificate.PEM || ocr.ActivePublicKey["kid"] != cr.ActivePublicKey["kid"] {
			t.Fatal("export → import is lossy")
		}
	} else if ex.PrivateKeyExportable || ex.Key.D != "" {
		t.Fatal("external provider export holds private material")
	}

	// Delete → 204, then 404; its keys are gone from the backend.
	refs, _ := in.App.KeyChains().KeyRefs(ctx, "t1", id)
	do(t, in, "DELETE", "/key-chain/"+id, key, nil, 204)
	do(t, in, "GET", "/key-chain/"+id, key, nil, 404)
	if prov.Type() != providers.TypeDB && prov.Capabilities().CanDelete {
		for name, r := range refs {
			if _, err := prov.PublicKey(ctx, r); !isNotFound(err) {
				t.Errorf("%s key %s survived chain deletion: %v", name, r.KID, err)
			}
		}
	}
	// Without a statusList chain the usage route falls back to attestation.
	apptest.JSON(t, do(t, in, "POST", "/key-chain/usage/statusList/jws", key, map[string]any{"payload": map[string]any{}}, 200), &byUsage)
	list = nil
	apptest.JSON(t, do(t, in, "GET", "/key-chain?usageType=attestation", key, nil, 200), &list)
	if !strings.HasPrefix(byUsage.KID, list[0].ID+"-") {
		t.Errorf("statusList fallback signed with %s, attestation chain is %s", byUsage.KID, list[0].ID)
	}
}

func isNotFound(err error) bool {
	return err != nil && errs.KindOf(err) == errs.NotFound
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not reached within 10s")
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func runImport(t *testing.T, in *apptest.Instance, key, providerID string) {
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	j, _ := keyutil.PrivateJWK(k, "whatever", "ES256")
	// Mode 2, then upsert.
	var r struct{ ID string }
	apptest.JSON(t, do(t, in, "POST", "/key-chain/import", key, map[string]any{"id": "imp-1", "usageType": "trustList",
		"key": j, "kmsProvider": providerID}, 201), &r)
	if r.ID != "imp-1" {
		t.Fatalf("import id %s", r.ID)
	}
	do(t, in, "POST", "/key-chain/import", key, map[string]any{"id": "imp-1", "usageType": "trustList", "key": j,
		"kmsProvider": providerID, "description": "again"}, 201)
	var cr chainResp
	apptest.JSON(t, do(t, in, "GET", "/key-chain/imp-1", key, nil, 200), &cr)
	if cr.Description != "again" || cr.ActivePublicKey["kid"] != "imp-1-active" || cr.Type != "standalone" {
		t.Fatalf("upserted import: %+v", cr)
	}
	leaf := certsOf(t, cr.ActiveCertificate.PEM)[0]
	// Mode 1 with that self-signed cert as crt (base64 DER form).
	do(t, in, "POST", "/key-chain/import", key, map[string]any{"id": "imp-2", "usageType": "access", "key": j,
		"kmsProvider": providerID, "crt": []string{base64.StdEncoding.EncodeToString(leaf.Raw)}}, 201)
	// Mode 3: root from the imported key, fresh leaf.
	do(t, in, "POST", "/key-chain/import", key, map[string]any{"id": "imp-3", "usageType": "attestation", "key": j,
		"kmsProvider": providerID, "rotationPolicy": map[string]any{"enabled": true}}, 201)
	apptest.JSON(t, do(t, in, "GET", "/key-chain/imp-3", key, nil, 200), &cr)
	if cr.Type != "internalChain" || cr.RotationPolicy["intervalDays"] != float64(90) {
		t.Fatalf("mode 3: %+v", cr)
	}
	// Validation failures name the certificate and the reason.
	o, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	oj, _ := keyutil.PrivateJWK(o, "", "ES256")
	for _, c := range []struct {
		body map[string]any
		want string
	}{
		{map[string]any{"usageType": "access", "key": oj, "crt": []string{pem2(leaf)}}, "does not match"},
		{map[string]any{"usageType": "access", "key": j, "crt": []string{"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----"}}, "crt[0]"},
		{map[string]any{"usageType": "access", "key": j, "crt": []string{pem2(leaf)}, "rotationPolicy": map[string]any{"enabled": true}}, "not a CA"},
		{map[string]any{"usageType": "access", "key": map[string]any{"kty": "EC", "crv": "P-256", "x": j.X, "y": j.Y}}, "private JWK"},
		{map[string]any{"usageType": "access"}, "key is required"},
	} {
		c.body["kmsProvider"] = providerID
		b := do(t, in, "POST", "/key-chain/import", key, c.body, 400)
		if !strings.Contains(string(b), c.want) {
			t.Errorf("import error %s does not say %q", b, c.want)
		}
	}
}

func pem2(c *x509.Certificate) string {
	return string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw}))
}

// TestConfigFolderImport covers placeholders, a broken file beside good ones, skip vs force, and
// ids that stay stable across restarts of the same data dir.
func TestConfigFolderImport(t *testing.T) {
	data, cfg := t.TempDir(), t.TempDir()
	kc := filepath.Join(cfg, "acme", "key-chains")
	if err := os.MkdirAll(kc, 0o700); err != nil {
		t.Fatal(err)
	}
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	j, _ := keyutil.PrivateJWK(k, "", "ES256")
	write := func(name, content string) {
		if err := os.WriteFile(filepath.Join(kc, name), []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	write("attestation.json", fmt.Sprintf(`{"id":"att","usageType":"attestation","description":"${DESC:from default}",
		"key":{"kty":"EC","crv":"P-256","x":"%s","y":"%s","d":"${ATT_D}"},"rotationPolicy":{"enabled":true}}`, j.X, j.Y))
	write("access.json", fmt.Sprintf(`{"usageType":"access","key":{"kty":"EC","crv":"P-256","x":"%s","y":"%s","d":"%s"}}`, j.X, j.Y, j.D))
	write("broken.json", `{"usageType":`)
	write("badcert.json", fmt.Sprintf(`{"id":"bad","usageType":"access","crt":["nope"],"key":{"kty":"EC","crv":"P-256","x":"%s","y":"%s","d":"%s"}}`, j.X, j.Y, j.D))
	write("unset.json", `{"id":"unset","usageType":"access","key":{"kty":"EC","crv":"P-256","x":"${NOPE_UNSET_X}","y":"a","d":"b"}}`)
	if err := os.WriteFile(filepath.Join(cfg, "kms.json"), []byte(`{"defaultProvider":"db","providers":[{"id":"db","type":"db"}]}`), 0o600); err != nil {
		t.Fatal(err)
	}
	env := map[string]string{"ATT_D": j.D}
	start := func(force bool) (*apptest.Instance, string) {
		in := apptest.Start(t, apptest.Options{DataDir: data, ConfigDir: cfg, Env: env, Tweak: func(o *appliance.Options) {
			o.ConfigImportForce = force
		}})
		res, err := in.App.Tenants().AddKey(context.Background(), "acme", nil, "test")
		if err != nil {
			t.Fatal(err)
		}
		return in, res.Key
	}
	in, key := start(false)
	var list []chainResp
	list = nil
	apptest.JSON(t, do(t, in, "GET", "/key-chain", key, nil, 200), &list)
	ids := map[string]chainResp{}
	for _, c := range list {
		ids[c.ID] = c
	}
	stable := keychain.StableID("acme", "access.json")
	if ids["att"].Description != "from default" || ids["att"].Type != "internalChain" || ids[stable].UsageType != "access" {
		t.Fatalf("imported chains: %+v", ids)
	}
	if _, ok := ids["bad"]; ok {
		t.Fatal("file with a bad certificate was imported")
	}
	if _, ok := ids["unset"]; ok {
		t.Fatal("file with an unset placeholder was imported")
	}
	// The tenant was created by the folder and bootstrapped with what the folder lacked (encrypt,
	// which is not listed).
	if n, err := in.App.KeyChains().Count(context.Background(), "acme"); len(list) != 2 || err != nil || n != 3 {
		t.Fatalf("want att and access listed and a bootstrapped encrypt chain, got %d listed of %d (%v)", len(list), n, err)
	}
	attKid := ids["att"].ActivePublicKey["kid"]
	in.Stop()

	// Restart: same ids, existing chains skipped (the env change is ignored without force).
	env["DESC"] = "changed"
	in, key = start(false)
	list = nil
	apptest.JSON(t, do(t, in, "GET", "/key-chain", key, nil, 200), &list)
	if n, _ := in.App.KeyChains().Count(context.Background(), "acme"); len(list) != 2 || n != 3 {
		t.Fatalf("restart created chains: %d listed of %d", len(list), n)
	}
	var att chainResp
	apptest.JSON(t, do(t, in, "GET", "/key-chain/att", key, nil, 200), &att)
	do(t, in, "GET", "/key-chain/"+stable, key, nil, 200)
	if att.Description != "from default" || att.ActivePublicKey["kid"] != attKid {
		t.Fatalf("restart without force changed the chain: %+v", att)
	}
	in.Stop()

	// Force: re-imported in place.
	in, key = start(true)
	apptest.JSON(t, do(t, in, "GET", "/key-chain/att", key, nil, 200), &att)
	list = nil
	apptest.JSON(t, do(t, in, "GET", "/key-chain", key, nil, 200), &list)
	if att.Description != "changed" || len(list) != 2 {
		t.Fatalf("force did not re-import: %+v (%d chains)", att, len(list))
	}
	st, _ := in.Do(http.MethodGet, "/key-chain/"+stable, key, nil)
	if st != 200 {
		t.Fatalf("stable id lost after force: %d", st)
	}
}
