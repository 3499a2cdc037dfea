package keychain

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha1"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"errors"
	"math/big"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/kmsgate/kmsgate/appliance/seal"
	"github.com/kmsgate/kmsgate/appliance/store"
	"github.com/kmsgate/kmsgate/appliance/tenants"
	"github.com/kmsgate/kmsgate/internal/errs"
	"github.com/kmsgate/kmsgate/internal/keyutil"
	"github.com/kmsgate/kmsgate/internal/testenv"
	"github.com/kmsgate/kmsgate/metrics"
	"github.com/kmsgate/kmsgate/providers"
	"github.com/kmsgate/kmsgate/providers/db"
)

// fakeClock is a movable clock.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *fakeClock) Now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *fakeClock) Add(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

// recProvider wraps the real db provider, records deletes (db keys live in the chain record, so
// "gone from the backend" is observed as a Delete call) and can be made to fail.
type recProvider struct {
	providers.Provider
	mu          sync.Mutex
	deleted     map[string]bool
	failGen     bool
	failSign    bool
	noImport    bool
	noDigest    bool
	generated   []string
	signedWhole int
}

func (p *recProvider) Generate(ctx context.Context, s providers.KeySpec) (providers.KeyRef, error) {
	p.mu.Lock()
	fail := p.failGen
	p.generated = append(p.generated, s.KID)
	p.mu.Unlock()
	if fail {
		return providers.KeyRef{}, errs.Errorf(errs.Unavailable, "backend down")
	}
	return p.Provider.Generate(ctx, s)
}

func (p *recProvider) Delete(ctx context.Context, r providers.KeyRef) error {
	p.mu.Lock()
	p.deleted[r.KID] = true
	p.mu.Unlock()
	return p.Provider.Delete(ctx, r)
}

func (p *recProvider) Capabilities() providers.Capabilities {
	c := p.Provider.Capabilities()
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.noImport {
		c.CanImport = false
	}
	if p.noDigest {
		c.CanSignDigest = false
	}
	return c
}

func (p *recProvider) SignDigest(ctx context.Context, r providers.KeyRef, alg string, d []byte) ([]byte, error) {
	p.mu.Lock()
	fail := p.failSign
	p.mu.Unlock()
	if fail {
		return nil, errs.Errorf(errs.Unavailable, "backend down")
	}
	return p.Provider.SignDigest(ctx, r, alg, d)
}

func (p *recProvider) SignMessage(ctx context.Context, r providers.KeyRef, alg string, m []byte) ([]byte, error) {
	p.mu.Lock()
	fail := p.failSign
	p.signedWhole++
	p.mu.Unlock()
	if fail {
		return nil, errs.Errorf(errs.Unavailable, "backend down")
	}
	return p.Provider.SignMessage(ctx, r, alg, m)
}

func (p *recProvider) wasDeleted(kid string) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.deleted[kid]
}

func (p *recProvider) set(f func(p *recProvider)) {
	p.mu.Lock()
	f(p)
	p.mu.Unlock()
}

// ExportPrivate forwards to the db provider so export sees the wrapper as exportable.
func (p *recProvider) ExportPrivate(ref providers.KeyRef) (*ecdsa.PrivateKey, error) {
	return p.Provider.(*db.Provider).ExportPrivate(ref)
}

type env struct {
	svc   *Service
	prov  *recProvider
	clock *fakeClock
	st    *store.Store
	ten   *tenants.Service
	p     *tenants.Principal
	m     *metrics.Metrics
}

const testTenant = "acme"

func newEnv(t *testing.T) *env {
	t.Helper()
	ctx := context.Background()
	st, err := store.Open(t.TempDir(), store.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	sealer, err := seal.New(bytes.Repeat([]byte{9}, 32))
	if err != nil {
		t.Fatal(err)
	}
	rp := &recProvider{deleted: map[string]bool{}}
	factories := map[string]providers.Factory{providers.TypeDB: func(ctx context.Context, cfg providers.Config) (providers.Provider, error) {
		p, err := db.New(cfg, sealer, func(tenant, kid string) []byte { return seal.AAD("db-key", tenant, kid) },
			store.SealedKeys{St: st})
		if err != nil {
			return nil, err
		}
		rp.Provider = p
		return rp, nil
	}}
	m := metrics.New("test", "test")
	reg, err := providers.NewRegistry(ctx, []providers.Config{{ID: "db", Type: "db", Raw: json.RawMessage(`{"id":"db","type":"db"}`)}},
		"db", factories, func(id string) providers.Observer { return m.ProviderRecorder(id) })
	if err != nil {
		t.Fatal(err)
	}
	ten, err := tenants.New(ctx, st)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ten.CreateTenant(ctx, tenants.CreateTenantRequest{ID: testTenant, Name: "Acme Issuer"}); err != nil {
		t.Fatal(err)
	}
	if _, err := ten.CreateTenant(ctx, tenants.CreateTenantRequest{ID: "other", Name: "Other"}); err != nil {
		t.Fatal(err)
	}
	clk := &fakeClock{t: time.Date(2026, 3, 1, 10, 37, 12, 0, time.UTC)}
	svc := New(Config{Store: st, Registry: reg, Tenants: ten, PublicURL: "https://issuer.example.test:8443/x",
		Country: "NL", Grace: 7 * 24 * time.Hour, Now: clk.Now, Metrics: m})
	return &env{svc: svc, prov: rp, clock: clk, st: st, ten: ten, p: &tenants.Principal{TenantID: testTenant}, m: m}
}

func (e *env) chain(t *testing.T, id string) *Chain {
	t.Helper()
	c, err := e.svc.load(context.Background(), testTenant, id)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func mustCerts(t *testing.T, s string) []*x509.Certificate {
	t.Helper()
	certs, err := parsePEMChain(s)
	if err != nil || len(certs) == 0 {
		t.Fatalf("parse chain: %v (%d certs)", err, len(certs))
	}
	return certs
}

func skiOf(t *testing.T, c *x509.Certificate) []byte {
	t.Helper()
	pt, err := c.PublicKey.(*ecdsa.PublicKey).Bytes()
	if err != nil {
		t.Fatal(err)
	}
	h := sha1.Sum(pt)
	return h[:]
}

// opensslVerify runs `openssl verify` on leaf (+ untrusted intermediates) against the trust
// anchor; partial lets a non-self-signed or leaf anchor be trusted.
func opensslVerify(t *testing.T, at time.Time, anchor *x509.Certificate, leaf *x509.Certificate, partial bool) {
	t.Helper()
	testenv.NeedsBackend(t, "openssl")
	dir := t.TempDir()
	write := func(name string, c *x509.Certificate) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw}), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	args := []string{"verify", "-x509_strict", "-attime", strconv.FormatInt(at.Unix(), 10), "-CAfile", write("ca.pem", anchor)}
	if partial {
		args = append(args, "-partial_chain")
	}
	args = append(args, write("leaf.pem", leaf))
	out, err := exec.Command("openssl", args...).CombinedOutput()
	if err != nil || !bytes.Contains(out, []byte(": OK")) {
		t.Fatalf("openssl %v: %v\n%s", args, err, out)
	}
}

// testCA makes an external CA + leaf for import tests, signed in memory.
type testCA struct {
	key  *ecdsa.PrivateKey
	cert *x509.Certificate
}

func newTestCA(t *testing.T, isCA bool, notAfter time.Time) *testCA {
	t.Helper()
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(7), Subject: pkix.Name{CommonName: "Ext CA"},
		NotBefore: time.Date(2020, 1, 1, 0, 0, 0, 0, time.UTC), NotAfter: notAfter,
		BasicConstraintsValid: true, IsCA: isCA, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &k.PublicKey, k)
	if err != nil {
		t.Fatal(err)
	}
	c, _ := x509.ParseCertificate(der)
	return &testCA{key: k, cert: c}
}

func (ca *testCA) leaf(t *testing.T, pub *ecdsa.PublicKey, notAfter time.Time) *x509.Certificate {
	t.Helper()
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(8), Subject: pkix.Name{CommonName: "Ext Leaf"},
		NotBefore: time.Date(2020, 1, 1, 0, 0, 0, 0, time.UTC), NotAfter: notAfter,
		BasicConstraintsValid: true, KeyUsage: x509.KeyUsageDigitalSignature}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, pub, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	c, _ := x509.ParseCertificate(der)
	return c
}

func privJWK(t *testing.T, k *ecdsa.PrivateKey) *keyutil.JWK {
	t.Helper()
	j, err := keyutil.PrivateJWK(k, "ignored-kid", "ES256")
	if err != nil {
		t.Fatal(err)
	}
	return &j
}

func wantCode(t *testing.T, err error, kind errs.Kind, code string) {
	t.Helper()
	if err == nil {
		t.Fatalf("want %s/%s error, got nil", kind, code)
	}
	var pe *errs.Error
	if !errors.As(err, &pe) || pe.Kind != kind || (code != "" && pe.Code != code) {
		t.Fatalf("want %s/%s, got %v (kind %s, code %q)", kind, code, err, errs.KindOf(err), errs.CodeOf(err))
	}
}

func boolp(b bool) *bool { return &b }
func intp(i int) *int    { return &i }
