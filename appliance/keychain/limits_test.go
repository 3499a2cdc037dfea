package keychain

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/json"
	"fmt"
	"math/big"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kmsgate/kmsgate/internal/errs"
)

// certWith makes a certificate for pub named subject, issued by issuerName with issuerKey;
// padding adds a non-critical extension of that many bytes.
func certWith(t *testing.T, subject, issuerName string, pub *ecdsa.PublicKey, issuerKey *ecdsa.PrivateKey, padding int) *x509.Certificate {
	t.Helper()
	serial, _ := rand.Int(rand.Reader, big.NewInt(1<<62))
	tmpl := &x509.Certificate{SerialNumber: serial, Subject: pkix.Name{CommonName: subject},
		NotBefore: time.Date(2020, 1, 1, 0, 0, 0, 0, time.UTC), NotAfter: time.Date(2040, 1, 1, 0, 0, 0, 0, time.UTC),
		BasicConstraintsValid: true, IsCA: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature}
	if padding > 0 {
		tmpl.ExtraExtensions = []pkix.Extension{{Id: asn1.ObjectIdentifier{1, 3, 6, 1, 4, 1, 99999, 1}, Value: make([]byte, padding)}}
	}
	parent := &x509.Certificate{Subject: pkix.Name{CommonName: issuerName}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, pub, issuerKey)
	if err != nil {
		t.Fatal(err)
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func newKey(t *testing.T) *ecdsa.PrivateKey {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// TestImportChainLimits: a chain longer than 10 certificates or 64 KiB of DER, a certificate
// given twice and issuer links that loop are refused with their own codes; nothing is stored.
func TestImportChainLimits(t *testing.T) {
	e := newEnv(t)
	ca := newTestCA(t, true, time.Date(2040, 1, 1, 0, 0, 0, 0, time.UTC))
	a, b := newKey(t), newKey(t)
	// x (subject A) is issued by y (subject B) and y by x: each signature verifies, the links loop.
	x := certWith(t, "A", "B", &a.PublicKey, b, 0)
	y := certWith(t, "B", "A", &b.PublicKey, a, 0)
	big := make([]string, 9)
	for i := range big {
		big[i] = pemOf(certWith(t, fmt.Sprintf("Big %d", i), fmt.Sprintf("Big %d", i), &a.PublicKey, a, 8<<10))
	}
	eleven := make([]string, 11)
	for i := range eleven {
		eleven[i] = pemOf(ca.cert)
	}
	// The attack from the review: one CA certificate repeated (2,455 times there).
	repeated := make([]string, 3)
	for i := range repeated {
		repeated[i] = pemOf(ca.cert)
	}
	for _, c := range []struct {
		name string
		key  *ecdsa.PrivateKey
		crt  []string
		code string
	}{
		{"eleven certificates", ca.key, eleven, "chain_too_long"},
		{"72 KiB of DER", a, big, "chain_too_long"},
		{"repeated certificate", ca.key, repeated, "duplicate_certificate"},
		{"issuer loop", a, []string{pemOf(x), pemOf(y)}, "chain_loop"},
	} {
		t.Run(c.name, func(t *testing.T) {
			_, err := e.svc.Import(ctx, e.p, ImportRequest{UsageType: UsageAccess, Key: privJWK(t, c.key), Crt: c.crt})
			wantCode(t, err, errs.BadInput, c.code)
		})
	}
	// The same limits hold for a replacement chain given to update.
	id, err := e.svc.Create(ctx, e.p, CreateRequest{UsageType: UsageAccess, Type: TypeStandalone})
	if err != nil {
		t.Fatal(err)
	}
	err = e.svc.Update(ctx, testTenant, id, UpdateRequest{ActiveCertificate: ptr(pemOf(x) + pemOf(y))})
	wantCode(t, err, errs.BadInput, "chain_loop")
	if n, _ := e.svc.Count(ctx, testTenant); n != 1 {
		t.Fatalf("refused imports left %d chains", n)
	}
	// A real chain of ten certificates is still accepted.
	keys := make([]*ecdsa.PrivateKey, 10)
	for i := range keys {
		keys[i] = newKey(t)
	}
	ten := make([]string, 10)
	for i := range ten {
		issuer := i + 1
		if issuer == 10 {
			issuer = 9 // self-signed root
		}
		ten[i] = pemOf(certWith(t, fmt.Sprintf("L%d", i), fmt.Sprintf("L%d", issuer), &keys[i].PublicKey, keys[issuer], 0))
	}
	if _, err := e.svc.Import(ctx, e.p, ImportRequest{UsageType: UsageTrustList, Key: privJWK(t, keys[0]), Crt: ten}); err != nil {
		t.Fatalf("ten-certificate chain refused: %v", err)
	}
}

// countingStore counts the reads a service makes.
type countingStore struct {
	Store
	gets, lists atomic.Int64
}

func (s *countingStore) Get(ctx context.Context, key string, v any) error {
	s.gets.Add(1)
	return s.Store.Get(ctx, key, v)
}

func (s *countingStore) List(ctx context.Context, prefix string, fn func(string, []byte) error) error {
	s.lists.Add(1)
	return s.Store.List(ctx, prefix, fn)
}

// TestUsagePathUsesIndex: with 200 chains, resolving a usage type reads nothing from the store,
// and a JWS by usage type reads exactly the one chain it signs with. The index is rebuilt from the
// store at start-up (Warm) and kept current by create, import, delete.
func TestUsagePathUsesIndex(t *testing.T) {
	e := newEnv(t)
	var first string
	for i := 0; i < 200; i++ {
		usage := []string{UsageAccess, UsageTrustList}[i%2]
		id, err := e.svc.Create(ctx, e.p, CreateRequest{UsageType: usage, Type: TypeStandalone})
		if err != nil {
			t.Fatal(err)
		}
		if i == 1 {
			first = id
		}
		e.clock.Add(time.Second)
	}
	// A restart: a new service over the same store, index rebuilt by Warm.
	cs := &countingStore{Store: e.st}
	svc := New(Config{Store: cs, Registry: e.svc.reg, Tenants: e.svc.ten, Now: e.clock.Now, Grace: time.Hour})
	if err := svc.Warm(ctx); err != nil {
		t.Fatal(err)
	}
	cs.gets.Store(0)
	cs.lists.Store(0)
	for i := 0; i < 50; i++ {
		id, err := svc.ResolveUsage(ctx, testTenant, UsageTrustList)
		if err != nil || id != first {
			t.Fatalf("resolve trustList: %q %v, want the oldest %s", id, err, first)
		}
	}
	if g, l := cs.gets.Load(), cs.lists.Load(); g != 0 || l != 0 {
		t.Fatalf("usage resolution read the store: %d gets, %d lists", g, l)
	}
	if _, err := svc.JWS(ctx, testTenant, first, JWSRequest{Payload: []byte(`{}`)}); err != nil {
		t.Fatal(err)
	}
	if g, l := cs.gets.Load(), cs.lists.Load(); g != 1 || l != 0 {
		t.Fatalf("JWS by usage read %d records and listed %d times, want 1 and 0", g, l)
	}
	// Kept current: delete the oldest, the next one answers; a new attestation chain is found.
	if err := svc.Delete(ctx, testTenant, first); err != nil {
		t.Fatal(err)
	}
	if id, err := svc.ResolveUsage(ctx, testTenant, UsageTrustList); err != nil || id == first {
		t.Fatalf("after delete: %q %v", id, err)
	}
	wantCode(t, func() error { _, err := svc.ResolveUsage(ctx, testTenant, UsageStatusList); return err }(),
		errs.NotFound, "key_chain_not_found")
	att, err := svc.Import(ctx, e.p, ImportRequest{ID: "att-1", UsageType: UsageAttestation, Key: privJWK(t, newKey(t))})
	if err != nil {
		t.Fatal(err)
	}
	if id, err := svc.ResolveUsage(ctx, testTenant, UsageStatusList); err != nil || id != att {
		t.Fatalf("statusList fallback after import: %q %v", id, err)
	}
	if l := cs.lists.Load(); l != 0 {
		t.Fatalf("index upkeep listed the store %d times", l)
	}
}

// TestChainQuota: the per-tenant chain quota answers 403 quota_exceeded, holds under concurrent
// creators, counts per tenant, lets a replacing import through and frees a slot on delete.
func TestChainQuota(t *testing.T) {
	e := newEnv(t)
	svc := New(Config{Store: e.st, Registry: e.svc.reg, Tenants: e.svc.ten, Now: e.clock.Now, MaxChainsPerTenant: 5})
	var wg sync.WaitGroup
	var ok, refused atomic.Int64
	for i := 0; i < 20; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, err := svc.Create(ctx, e.p, CreateRequest{UsageType: UsageAccess, Type: TypeStandalone})
			switch {
			case err == nil:
				ok.Add(1)
			case errs.KindOf(err) == errs.Forbidden && errs.CodeOf(err) == "quota_exceeded":
				refused.Add(1)
			default:
				t.Errorf("create: %v", err)
			}
		}()
	}
	wg.Wait()
	if ok.Load() != 5 || refused.Load() != 15 {
		t.Fatalf("20 concurrent creates with a quota of 5: %d created, %d refused", ok.Load(), refused.Load())
	}
	n := 0
	if err := e.st.List(ctx, tenantPrefix(testTenant), func(string, []byte) error { n++; return nil }); err != nil || n != 5 {
		t.Fatalf("%d chains stored (%v)", n, err)
	}
	_, err := svc.Import(ctx, e.p, ImportRequest{UsageType: UsageAccess, Key: privJWK(t, newKey(t))})
	wantCode(t, err, errs.Forbidden, "quota_exceeded")
	// Another tenant has its own quota.
	op := *e.p
	op.TenantID = "other"
	if _, err := svc.Create(ctx, &op, CreateRequest{UsageType: UsageAccess, Type: TypeStandalone}); err != nil {
		t.Fatalf("other tenant hit acme's quota: %v", err)
	}
	// Replacing an existing chain does not need a free slot; deleting one frees it.
	res, _ := svc.List(ctx, testTenant, "")
	if _, err := svc.Import(ctx, e.p, ImportRequest{ID: res[0].ID, UsageType: UsageAccess, Key: privJWK(t, newKey(t))}); err != nil {
		t.Fatalf("replacing import at quota: %v", err)
	}
	if err := svc.Delete(ctx, testTenant, res[1].ID); err != nil {
		t.Fatal(err)
	}
	if _, err := svc.Create(ctx, e.p, CreateRequest{UsageType: UsageAccess, Type: TypeStandalone}); err != nil {
		t.Fatalf("create after delete: %v", err)
	}
}

// TestQuickRotationsKeepEveryPreviousKey replays the review's finding: five quick rotations, and a
// JWS signed before each one still verifies against the chain's and the tenant's JWKS. At 16
// previous keys in grace a rotation is refused (409) instead of deleting one early; each key
// leaves when its own grace ends.
func TestQuickRotationsKeepEveryPreviousKey(t *testing.T) {
	e := newEnv(t) // grace 7 days
	id, err := e.svc.Create(ctx, e.p, CreateRequest{UsageType: UsageAttestation, Type: TypeInternalChain})
	if err != nil {
		t.Fatal(err)
	}
	var tokens []string
	for i := 0; i < 5; i++ {
		res, err := e.svc.JWS(ctx, testTenant, id, JWSRequest{Payload: []byte(fmt.Sprintf(`{"n":%d}`, i))})
		if err != nil {
			t.Fatal(err)
		}
		tokens = append(tokens, res.JWS)
		e.clock.Add(time.Second)
		if err := e.svc.Rotate(ctx, testTenant, id, "manual"); err != nil {
			t.Fatalf("rotation %d: %v", i+1, err)
		}
	}
	chainSet, err := e.svc.ChainJWKS(ctx, testTenant, id)
	if err != nil {
		t.Fatal(err)
	}
	tenantSet, err := e.svc.TenantJWKS(ctx, testTenant)
	if err != nil {
		t.Fatal(err)
	}
	if len(chainSet.Keys) != 6 {
		t.Fatalf("chain JWKS has %d keys after 5 rotations, want 6", len(chainSet.Keys))
	}
	for i, tok := range tokens {
		verifyJWS(t, tok, chainSet, nil, e.clock.Now())
		verifyJWS(t, tok, tenantSet, nil, e.clock.Now())
		if e.prov.wasDeleted(jwsHeader(t, tok)["kid"].(string)) {
			t.Errorf("key of token %d deleted inside its grace", i)
		}
	}
	c := e.chain(t, id)
	r, _ := e.svc.Get(ctx, testTenant, id)
	if r.PreviousPublicKey == nil || r.PreviousPublicKey.Kid != c.PreviousKeys[4].Key.KID || !r.PreviousKeyExpiry.Equal(c.PreviousKeys[4].Expiry) {
		t.Fatalf("DTO previous* is not the most recent previous key: %+v", r.PreviousPublicKey)
	}
	// Up to 16 previous keys; the 17th rotation is refused and deletes nothing.
	for i := 5; i < MaxPreviousKeys; i++ {
		e.clock.Add(time.Second)
		if err := e.svc.Rotate(ctx, testTenant, id, "manual"); err != nil {
			t.Fatalf("rotation %d: %v", i+1, err)
		}
	}
	before, _ := json.Marshal(e.chain(t, id))
	e.clock.Add(time.Second)
	wantCode(t, e.svc.Rotate(ctx, testTenant, id, "manual"), errs.Conflict, "too_many_previous_keys")
	after, _ := json.Marshal(e.chain(t, id))
	if string(before) != string(after) {
		t.Fatal("refused rotation changed the chain")
	}
	for _, tok := range tokens {
		if e.prov.wasDeleted(jwsHeader(t, tok)["kid"].(string)) {
			t.Fatal("a previous key was deleted inside its grace")
		}
	}
	// Once the first keys' grace is over, the scheduler deletes exactly those and rotation works again.
	c = e.chain(t, id)
	e.clock.Set(c.PreviousKeys[2].Expiry)
	e.svc.Tick(ctx)
	c = e.chain(t, id)
	if len(c.PreviousKeys) != MaxPreviousKeys-3 {
		t.Fatalf("%d previous keys after the first three expired", len(c.PreviousKeys))
	}
	for i, tok := range tokens {
		if got, want := e.prov.wasDeleted(jwsHeader(t, tok)["kid"].(string)), i < 3; got != want {
			t.Errorf("token %d's key deleted=%v, want %v", i, got, want)
		}
	}
	if err := e.svc.Rotate(ctx, testTenant, id, "manual"); err != nil {
		t.Fatalf("rotation after expiry: %v", err)
	}
}

// TestLegacyPreviousMigrated: a chain stored with the single "previous" slot of earlier releases
// reads as one previous key, stays published, and survives the next rotation.
func TestLegacyPreviousMigrated(t *testing.T) {
	e := newEnv(t)
	id, err := e.svc.Create(ctx, e.p, CreateRequest{UsageType: UsageAccess, Type: TypeStandalone})
	if err != nil {
		t.Fatal(err)
	}
	old, err := e.svc.JWS(ctx, testTenant, id, JWSRequest{Payload: []byte(`{}`)})
	if err != nil {
		t.Fatal(err)
	}
	e.clock.Add(time.Second)
	if err := e.svc.Rotate(ctx, testTenant, id, "manual"); err != nil {
		t.Fatal(err)
	}
	// Rewrite the record as an earlier release stored it.
	var raw map[string]any
	if err := e.st.Get(ctx, chainKey(testTenant, id), &raw); err != nil {
		t.Fatal(err)
	}
	pk := raw["previousKeys"].([]any)[0].(map[string]any)
	raw["previous"], raw["previousCertificate"], raw["previousKeyExpiry"] = pk["key"], pk["certificate"], pk["expiry"]
	delete(raw, "previousKeys")
	if err := e.st.Put(ctx, chainKey(testTenant, id), raw); err != nil {
		t.Fatal(err)
	}
	r, err := e.svc.Get(ctx, testTenant, id)
	if err != nil || r.PreviousPublicKey == nil || r.PreviousPublicKey.Kid != id+"-active" {
		t.Fatalf("legacy previous key not read: %+v %v", r, err)
	}
	set, _ := e.svc.ChainJWKS(ctx, testTenant, id)
	verifyJWS(t, old.JWS, set, nil, e.clock.Now())
	e.clock.Add(time.Second)
	if err := e.svc.Rotate(ctx, testTenant, id, "manual"); err != nil {
		t.Fatal(err)
	}
	set, _ = e.svc.ChainJWKS(ctx, testTenant, id)
	verifyJWS(t, old.JWS, set, nil, e.clock.Now())
	var stored map[string]any
	if err := e.st.Get(ctx, chainKey(testTenant, id), &stored); err != nil {
		t.Fatal(err)
	}
	if _, ok := stored["previous"]; ok || len(stored["previousKeys"].([]any)) != 2 {
		t.Fatalf("record after migration: previous=%v previousKeys=%v", stored["previous"], stored["previousKeys"])
	}
	if e.prov.wasDeleted(id + "-active") {
		t.Fatal("migrated previous key deleted inside its grace")
	}
}

func (c *fakeClock) Set(t time.Time) {
	c.mu.Lock()
	c.t = t
	c.mu.Unlock()
}
