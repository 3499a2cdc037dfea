package keychain

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/asn1"
	"encoding/base64"
	"encoding/json"
	"strings"
	"testing"
	"time"

	jose "github.com/go-jose/go-jose/v4"

	"github.com/kmsgate/kmsgate/appliance/store"
	"github.com/kmsgate/kmsgate/internal/errs"
	"github.com/kmsgate/kmsgate/internal/keyutil"
)

var ctx = context.Background()

// checkProfile compares a generated certificate with the profile of issue point 3.
func checkProfile(t *testing.T, c *x509.Certificate, e *env, wantCN string, ca bool, days int) {
	t.Helper()
	if got := dnString(c.Subject); got != "C=NL, CN="+wantCN {
		t.Errorf("subject %q", got)
	}
	if c.SignatureAlgorithm != x509.ECDSAWithSHA256 || c.PublicKeyAlgorithm != x509.ECDSA {
		t.Errorf("algorithms %v %v", c.SignatureAlgorithm, c.PublicKeyAlgorithm)
	}
	if pub := c.PublicKey.(*ecdsa.PublicKey); pub.Curve != elliptic.P256() {
		t.Errorf("curve %v", pub.Curve.Params().Name)
	}
	if !bytes.Equal(c.SubjectKeyId, skiOf(t, c)) {
		t.Errorf("SKI %x is not SHA-1 of the EC point %x", c.SubjectKeyId, skiOf(t, c))
	}
	if len(c.DNSNames) != 1 || c.DNSNames[0] != "issuer.example.test" {
		t.Errorf("SAN %v", c.DNSNames)
	}
	if !c.BasicConstraintsValid || c.IsCA != ca {
		t.Errorf("basicConstraints valid=%v ca=%v", c.BasicConstraintsValid, c.IsCA)
	}
	wantKU := x509.KeyUsageDigitalSignature
	if ca {
		wantKU |= x509.KeyUsageCertSign | x509.KeyUsageCRLSign
	}
	if c.KeyUsage != wantKU {
		t.Errorf("keyUsage %b, want %b (no keyEncipherment)", c.KeyUsage, wantKU)
	}
	for _, ext := range c.Extensions {
		switch ext.Id.String() {
		case "2.5.29.19", "2.5.29.15":
			if !ext.Critical {
				t.Errorf("extension %v must be critical", ext.Id)
			}
		}
	}
	now := e.clock.Now()
	if !c.NotBefore.Equal(now.Truncate(time.Hour)) || c.NotBefore.Minute() != 0 || c.NotBefore.Second() != 0 {
		t.Errorf("notBefore %v not %v", c.NotBefore, now.Truncate(time.Hour))
	}
	if got := c.NotAfter.Sub(c.NotBefore); got != time.Duration(days)*24*time.Hour {
		t.Errorf("validity %v, want %d days", got, days)
	}
	if c.SerialNumber.Sign() <= 0 || len(c.SerialNumber.Bytes()) != 16 {
		t.Errorf("serial %x not 16 positive bytes", c.SerialNumber.Bytes())
	}
}

func TestInternalChainProfileAndVerify(t *testing.T) {
	e := newEnv(t)
	id, err := e.svc.Create(ctx, e.p, CreateRequest{UsageType: UsageAttestation, Type: TypeInternalChain,
		RotationPolicy: &PolicyInput{Enabled: boolp(true), IntervalDays: intp(30), CertValidityDays: intp(60)}})
	if err != nil {
		t.Fatal(err)
	}
	c := e.chain(t, id)
	if c.Type() != TypeInternalChain || c.Active.KID != id+"-active" || c.Root.KID != id+"-root" {
		t.Fatalf("chain %+v", c)
	}
	chain := mustCerts(t, c.ActiveCertificate)
	if len(chain) != 2 {
		t.Fatalf("active chain has %d certs, want leaf+root", len(chain))
	}
	leaf, root := chain[0], chain[1]
	if !bytes.Equal(root.Raw, mustCerts(t, c.RootCertificate)[0].Raw) {
		t.Fatal("second cert of the active chain is not the root")
	}
	checkProfile(t, root, e, "Acme Issuer Root CA", true, RootValidityDays)
	checkProfile(t, leaf, e, "Acme Issuer", false, 60)
	if len(root.AuthorityKeyId) != 0 {
		t.Errorf("self-signed root has AKI %x", root.AuthorityKeyId)
	}
	if !bytes.Equal(leaf.AuthorityKeyId, root.SubjectKeyId) {
		t.Errorf("leaf AKI %x != root SKI %x", leaf.AuthorityKeyId, root.SubjectKeyId)
	}
	if got := dnString(leaf.Issuer); got != "C=NL, CN=Acme Issuer Root CA" {
		t.Errorf("leaf issuer %q", got)
	}
	if !keyutil.SameKey(leaf.PublicKey.(*ecdsa.PublicKey), mustPub(t, c.Active)) {
		t.Error("leaf does not certify the active key")
	}
	pool := x509.NewCertPool()
	pool.AddCert(root)
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: pool, CurrentTime: e.clock.Now()}); err != nil {
		t.Fatalf("x509.Verify: %v", err)
	}
	opensslVerify(t, e.clock.Now(), root, leaf, false)

	r, err := e.svc.Get(ctx, testTenant, id)
	if err != nil {
		t.Fatal(err)
	}
	if r.ActiveCertificate.Subject != "C=NL, CN=Acme Issuer" || r.ActiveCertificate.Issuer != "C=NL, CN=Acme Issuer Root CA" ||
		r.RootCertificate == nil || r.Type != TypeInternalChain || r.ActivePublicKey.Kid != id+"-active" ||
		r.ActivePublicKey.Crv != "P-256" || r.RotationPolicy.NextRotationAt == nil ||
		!r.RotationPolicy.NextRotationAt.Equal(c.CreatedAt.Add(30*24*time.Hour)) {
		t.Errorf("response %+v", r)
	}
	if r.ActiveCertificate.SerialNumber != leaf.SerialNumber.Text(16) && r.ActiveCertificate.SerialNumber != "0"+leaf.SerialNumber.Text(16) {
		t.Errorf("serial %s vs %x", r.ActiveCertificate.SerialNumber, leaf.SerialNumber)
	}
	b, _ := json.Marshal(r)
	if bytes.Contains(b, []byte(`"x"`)) || bytes.Contains(b, []byte(`"d"`)) {
		t.Errorf("response leaks key coordinates: %s", b)
	}
}

func mustPub(t *testing.T, k store.KeyRef) *ecdsa.PublicKey {
	t.Helper()
	p, err := publicOf(k)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func TestStandaloneAndMessageOnlyProvider(t *testing.T) {
	e := newEnv(t)
	// A backend that only signs whole messages gets the TBSCertificate bytes.
	e.prov.set(func(p *recProvider) { p.noDigest = true })
	id, err := e.svc.Create(ctx, e.p, CreateRequest{UsageType: UsageAccess, Type: TypeStandalone})
	if err != nil {
		t.Fatal(err)
	}
	if e.prov.signedWhole == 0 {
		t.Error("message-only provider was not asked to sign the TBS")
	}
	c := e.chain(t, id)
	certs := mustCerts(t, c.ActiveCertificate)
	if len(certs) != 1 || c.Root != nil {
		t.Fatalf("standalone chain: %d certs root=%v", len(certs), c.Root)
	}
	checkProfile(t, certs[0], e, "Acme Issuer", false, DefaultCertValidityDays)
	if err := certs[0].CheckSignature(certs[0].SignatureAlgorithm, certs[0].RawTBSCertificate, certs[0].Signature); err != nil {
		t.Fatalf("self-signature: %v", err)
	}
	opensslVerify(t, e.clock.Now(), certs[0], certs[0], true)
}

func TestCreateValidation(t *testing.T) {
	e := newEnv(t)
	cases := []CreateRequest{
		{UsageType: "bogus", Type: TypeStandalone},
		{UsageType: UsageAccess, Type: "chain"},
		{UsageType: UsageAccess, Type: TypeStandalone, RotationPolicy: &PolicyInput{Enabled: boolp(true), IntervalDays: intp(0)}},
		{UsageType: UsageAccess, Type: TypeStandalone, RotationPolicy: &PolicyInput{Enabled: boolp(true), CertValidityDays: intp(3651)}},
		{UsageType: UsageAccess, Type: TypeStandalone, RotationPolicy: &PolicyInput{IntervalDays: intp(3)}},
		{UsageType: UsageAccess, Type: TypeStandalone, Description: ptr(strings.Repeat("x", MaxDescriptionLen+1))},
	}
	for i, c := range cases {
		if _, err := e.svc.Create(ctx, e.p, c); errs.KindOf(err) != errs.BadInput {
			t.Errorf("case %d: want bad input, got %v", i, err)
		}
	}
	_, err := e.svc.Create(ctx, e.p, CreateRequest{UsageType: UsageAccess, Type: TypeStandalone, KMSProvider: "nope"})
	wantCode(t, err, errs.BadInput, "unknown_provider")
	if !strings.Contains(err.Error(), `["db"]`) {
		t.Errorf("unknown provider error does not name the configured ids: %v", err)
	}
}

func ptr(s string) *string { return &s }

func TestImportModes(t *testing.T) {
	e := newEnv(t)
	now := e.clock.Now()
	leafKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	ca := newTestCA(t, true, now.AddDate(5, 0, 0))
	leaf := ca.leaf(t, &leafKey.PublicKey, now.AddDate(1, 0, 0))

	// Mode 1: crt given (one PEM, one base64 DER) — kept as given, normalised to PEM.
	id, err := e.svc.Import(ctx, e.p, ImportRequest{ID: "m1", UsageType: UsageAttestation, Key: privJWK(t, leafKey),
		Crt: []string{pemOf(leaf), base64.StdEncoding.EncodeToString(ca.cert.Raw)}})
	if err != nil || id != "m1" {
		t.Fatalf("mode 1: %v %s", err, id)
	}
	c := e.chain(t, "m1")
	got := mustCerts(t, c.ActiveCertificate)
	if len(got) != 2 || !bytes.Equal(got[0].Raw, leaf.Raw) || !bytes.Equal(got[1].Raw, ca.cert.Raw) || c.Active.KID != "m1-active" {
		t.Fatalf("mode 1 chain: %d certs kid %s", len(got), c.Active.KID)
	}

	// Mode 2: no crt → self-signed leaf for the imported key, certValidityDays honoured.
	if _, err := e.svc.Import(ctx, e.p, ImportRequest{ID: "m2", UsageType: UsageAccess, Key: privJWK(t, leafKey),
		RotationPolicy: &PolicyInput{Enabled: boolp(false), CertValidityDays: intp(10)}}); err != nil {
		t.Fatal(err)
	}
	c = e.chain(t, "m2")
	got = mustCerts(t, c.ActiveCertificate)
	checkProfile(t, got[0], e, "Acme Issuer", false, 10)
	if !keyutil.SameKey(got[0].PublicKey.(*ecdsa.PublicKey), &leafKey.PublicKey) {
		t.Error("mode 2 leaf does not hold the imported key")
	}

	// Mode 3 without crt: imported key = root, generated root cert + fresh leaf.
	rootKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if _, err := e.svc.Import(ctx, e.p, ImportRequest{ID: "m3", UsageType: UsageAttestation, Key: privJWK(t, rootKey),
		RotationPolicy: &PolicyInput{Enabled: boolp(true)}}); err != nil {
		t.Fatal(err)
	}
	c = e.chain(t, "m3")
	if c.Root.KID != "m3-root" || !keyutil.SameKey(mustPub(t, *c.Root), &rootKey.PublicKey) || c.Rotation.IntervalDays != 90 ||
		c.Rotation.CertValidityDays != 365 || c.Type() != TypeInternalChain {
		t.Fatalf("mode 3 chain %+v", c)
	}
	got = mustCerts(t, c.ActiveCertificate)
	checkProfile(t, got[1], e, "Acme Issuer Root CA", true, RootValidityDays)
	opensslVerify(t, e.clock.Now(), got[1], got[0], false)

	// Mode 3 with crt: the LAST entry is the root (must be CA and hold the key).
	if _, err := e.svc.Import(ctx, e.p, ImportRequest{ID: "m3b", UsageType: UsageAttestation, Key: privJWK(t, ca.key),
		Crt: []string{pemOf(leaf), pemOf(ca.cert)}, RotationPolicy: &PolicyInput{Enabled: boolp(true)}}); err != nil {
		t.Fatal(err)
	}
	c = e.chain(t, "m3b")
	got = mustCerts(t, c.ActiveCertificate)
	if !bytes.Equal(got[1].Raw, ca.cert.Raw) || !bytes.Equal(got[0].AuthorityKeyId, ca.cert.SubjectKeyId) && len(ca.cert.SubjectKeyId) > 0 {
		t.Fatal("mode 3 leaf is not issued by the imported root")
	}
	if err := got[0].CheckSignatureFrom(ca.cert); err != nil {
		t.Fatalf("mode 3 leaf signature: %v", err)
	}
	opensslVerify(t, e.clock.Now(), ca.cert, got[0], false)

	// Upsert: same id again replaces the chain and answers the same id.
	if id, err := e.svc.Import(ctx, e.p, ImportRequest{ID: "m2", UsageType: UsageTrustList, Key: privJWK(t, rootKey)}); err != nil || id != "m2" {
		t.Fatalf("upsert: %v", err)
	}
	if c = e.chain(t, "m2"); c.UsageType != UsageTrustList || !keyutil.SameKey(mustPub(t, c.Active), &rootKey.PublicKey) {
		t.Fatal("upsert did not replace the chain")
	}
}

func TestImportValidationFailures(t *testing.T) {
	e := newEnv(t)
	now := e.clock.Now()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	other, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	ca := newTestCA(t, true, now.AddDate(5, 0, 0))
	ca2 := newTestCA(t, true, now.AddDate(5, 0, 0))
	nonCA := newTestCA(t, false, now.AddDate(5, 0, 0))
	expiredCA := newTestCA(t, true, now.AddDate(0, 0, -1))
	leaf := ca.leaf(t, &key.PublicKey, now.AddDate(1, 0, 0))
	expiredLeaf := ca.leaf(t, &key.PublicKey, now.AddDate(0, 0, -1))
	on := &PolicyInput{Enabled: boolp(true)}
	pubOnly := keyutil.JWK{Kty: "EC", Crv: "P-256", X: privJWK(t, key).X, Y: privJWK(t, key).Y}
	cases := []struct {
		name string
		req  ImportRequest
		want []string
	}{
		{"bad PEM", ImportRequest{Key: privJWK(t, key), Crt: []string{"-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----"}}, []string{"crt[0]", "X.509"}},
		{"garbage", ImportRequest{Key: privJWK(t, key), Crt: []string{"not a cert"}}, []string{"crt[0]", "neither PEM nor base64 DER"}},
		{"key mismatch", ImportRequest{Key: privJWK(t, other), Crt: []string{pemOf(leaf), pemOf(ca.cert)}}, []string{"crt[0] (leaf)", "does not match"}},
		{"expired leaf", ImportRequest{Key: privJWK(t, key), Crt: []string{pemOf(expiredLeaf), pemOf(ca.cert)}}, []string{"crt[0] (leaf)", "expired"}},
		{"expired root", ImportRequest{Key: privJWK(t, expiredCA.key), Crt: []string{pemOf(expiredCA.cert)}, RotationPolicy: on}, []string{"crt[0]", "expired"}},
		{"wrong order", ImportRequest{Key: privJWK(t, key), Crt: []string{pemOf(ca.cert), pemOf(leaf)}}, []string{"crt[0]", "leaf first"}},
		{"broken link", ImportRequest{Key: privJWK(t, key), Crt: []string{pemOf(leaf), pemOf(ca2.cert)}}, []string{"crt[0] (leaf)", "crt[1]"}},
		{"non-CA root", ImportRequest{Key: privJWK(t, nonCA.key), Crt: []string{pemOf(nonCA.cert)}, RotationPolicy: on}, []string{"crt[0]", "not a CA"}},
		{"root key mismatch", ImportRequest{Key: privJWK(t, other), Crt: []string{pemOf(leaf), pemOf(ca.cert)}, RotationPolicy: on}, []string{"crt[1] (last/root)", "does not match"}},
		{"public JWK", ImportRequest{Key: &pubOnly}, []string{"private JWK"}},
		{"bad id", ImportRequest{ID: "../x", Key: privJWK(t, key)}, []string{"id must"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			tc.req.UsageType = UsageAttestation
			_, err := e.svc.Import(ctx, e.p, tc.req)
			if errs.KindOf(err) != errs.BadInput {
				t.Fatalf("want 400, got %v", err)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not say %q", err, w)
				}
			}
		})
	}
	// Same-id broken link with a forged signature: ca2 issued a cert with ca's subject name.
	list, _ := e.svc.List(ctx, testTenant, "")
	if len(list) != 0 {
		t.Fatalf("failed imports left %d chains", len(list))
	}
	// Provider that cannot import → 405 (KindNotSupported).
	e.prov.set(func(p *recProvider) { p.noImport = true })
	_, err := e.svc.Import(ctx, e.p, ImportRequest{UsageType: UsageAccess, Key: privJWK(t, key)})
	wantCode(t, err, errs.NotSupported, "import_not_supported")
}

// verifyJWS checks a compact JWS with go-jose against a JWKS and, when present, its x5c chain.
func verifyJWS(t *testing.T, compact string, set *JWKS, root *x509.Certificate, now time.Time) map[string]any {
	t.Helper()
	obj, err := jose.ParseSignedCompact(compact, []jose.SignatureAlgorithm{jose.ES256})
	if err != nil {
		t.Fatalf("parse JWS: %v", err)
	}
	kid := obj.Signatures[0].Header.KeyID
	var key *keyutil.JWK
	for i := range set.Keys {
		if set.Keys[i].Kid == kid {
			key = &set.Keys[i]
		}
	}
	if key == nil {
		t.Fatalf("kid %s not in JWKS", kid)
	}
	var jk jose.JSONWebKey
	b, _ := json.Marshal(key)
	if err := jk.UnmarshalJSON(b); err != nil {
		t.Fatal(err)
	}
	payload, err := obj.Verify(jk)
	if err != nil {
		t.Fatalf("verify with JWKS key: %v", err)
	}
	if root != nil {
		pool := x509.NewCertPool()
		pool.AddCert(root)
		chains, err := obj.Signatures[0].Protected.Certificates(x509.VerifyOptions{Roots: pool, CurrentTime: now})
		if err != nil {
			t.Fatalf("x5c does not chain to the root: %v", err)
		}
		if _, err := obj.Verify(chains[0][0].PublicKey); err != nil {
			t.Fatalf("verify with x5c leaf: %v", err)
		}
	}
	var out map[string]any
	if err := json.Unmarshal(payload, &out); err != nil {
		t.Fatal(err)
	}
	return out
}

func TestJWSRotationGraceAndScheduler(t *testing.T) {
	e := newEnv(t)
	id, err := e.svc.Create(ctx, e.p, CreateRequest{UsageType: UsageAttestation, Type: TypeInternalChain,
		RotationPolicy: &PolicyInput{Enabled: boolp(true), IntervalDays: intp(10)}})
	if err != nil {
		t.Fatal(err)
	}
	root := mustCerts(t, e.chain(t, id).RootCertificate)[0]
	res, err := e.svc.JWS(ctx, testTenant, id, JWSRequest{Payload: []byte(`{"iss":"me","n":1}`), Header: map[string]any{"typ": "dc+sd-jwt"}})
	if err != nil {
		t.Fatal(err)
	}
	if res.KID != id+"-active" {
		t.Fatalf("kid %s", res.KID)
	}
	set, _ := e.svc.ChainJWKS(ctx, testTenant, id)
	if p := verifyJWS(t, res.JWS, set, root, e.clock.Now()); p["iss"] != "me" {
		t.Fatalf("payload %v", p)
	}
	hdr := jwsHeader(t, res.JWS)
	if hdr["typ"] != "dc+sd-jwt" || len(hdr["x5c"].([]any)) != 1 {
		t.Errorf("header %v: want typ and a leaf-only x5c", hdr)
	}
	full, err := e.svc.JWS(ctx, testTenant, id, JWSRequest{Payload: []byte(`{}`), X5C: X5CChain})
	if err != nil || len(jwsHeader(t, full.JWS)["x5c"].([]any)) != 2 {
		t.Fatalf("full chain x5c: %v", err)
	}
	if _, err := e.svc.JWS(ctx, testTenant, id, JWSRequest{Payload: []byte(`{}`), Header: map[string]any{"alg": "none"}}); errs.KindOf(err) != errs.BadInput {
		t.Errorf("alg override accepted: %v", err)
	}

	// Not due yet: the scheduler leaves it alone.
	e.clock.Add(9 * 24 * time.Hour)
	if n := e.svc.Tick(ctx); n != 0 {
		t.Fatalf("rotated %d chains before due", n)
	}
	// Due: the scheduler rotates.
	e.clock.Add(24 * time.Hour)
	if n := e.svc.Tick(ctx); n != 1 {
		t.Fatalf("scheduler rotated %d chains, want 1", n)
	}
	c := e.chain(t, id)
	if p := c.latestPrevious(); p == nil || p.Key.KID != id+"-active" || c.Active.KID == id+"-active" ||
		!p.Expiry.Equal(e.clock.Now().Add(7*24*time.Hour)) || c.Root.KID != id+"-root" {
		t.Fatalf("after rotation: %+v", c)
	}
	newLeaf := mustCerts(t, c.ActiveCertificate)
	opensslVerify(t, e.clock.Now(), root, newLeaf[0], false)

	// During grace the old token still verifies against the JWKS (which has both keys).
	set, _ = e.svc.ChainJWKS(ctx, testTenant, id)
	if len(set.Keys) != 2 {
		t.Fatalf("JWKS during grace has %d keys", len(set.Keys))
	}
	verifyJWS(t, res.JWS, set, nil, e.clock.Now())
	tset, _ := e.svc.TenantJWKS(ctx, testTenant)
	verifyJWS(t, res.JWS, tset, nil, e.clock.Now())
	// And new tokens use the new key.
	res2, _ := e.svc.JWS(ctx, testTenant, id, JWSRequest{Payload: []byte(`{"n":2}`)})
	if res2.KID != c.Active.KID {
		t.Fatalf("new JWS kid %s", res2.KID)
	}
	verifyJWS(t, res2.JWS, set, root, e.clock.Now())

	// After grace: the scheduler deletes the previous key in the backend and from the JWKS.
	e.clock.Add(7*24*time.Hour + time.Minute)
	e.svc.Tick(ctx)
	if !e.prov.wasDeleted(id + "-active") {
		t.Error("expired previous key was not deleted in its backend")
	}
	c = e.chain(t, id)
	if len(c.PreviousKeys) != 0 {
		t.Error("expired previous key still in the chain")
	}
	set, _ = e.svc.ChainJWKS(ctx, testTenant, id)
	if len(set.Keys) != 1 || set.Keys[0].Kid != c.Active.KID {
		t.Fatalf("JWKS after grace: %+v", set.Keys)
	}

	// Two rotations in a row: both rotated-out keys stay, each until its own grace ends.
	first := c.Active.KID
	if err := e.svc.Rotate(ctx, testTenant, id, "manual"); err != nil {
		t.Fatal(err)
	}
	if err := e.svc.Rotate(ctx, testTenant, id, "manual"); err != nil {
		t.Fatal(err)
	}
	if e.prov.wasDeleted(first) {
		t.Error("a previous key was deleted inside its grace period by the next rotation")
	}
	if c = e.chain(t, id); len(c.PreviousKeys) != 2 || c.PreviousKeys[0].Key.KID != first || c.Active.KID == c.PreviousKeys[1].Key.KID {
		t.Errorf("kids after double rotation: active %s previous %+v", c.Active.KID, c.PreviousKeys)
	}
}

func jwsHeader(t *testing.T, compact string) map[string]any {
	t.Helper()
	b, err := base64.RawURLEncoding.DecodeString(strings.Split(compact, ".")[0])
	if err != nil {
		t.Fatal(err)
	}
	var h map[string]any
	if err := json.Unmarshal(b, &h); err != nil {
		t.Fatal(err)
	}
	return h
}

func TestFailedRotationLeavesChain(t *testing.T) {
	e := newEnv(t)
	id, err := e.svc.Create(ctx, e.p, CreateRequest{UsageType: UsageAccess, Type: TypeInternalChain})
	if err != nil {
		t.Fatal(err)
	}
	before, _ := json.Marshal(e.chain(t, id))
	e.prov.set(func(p *recProvider) { p.failSign = true })
	e.clock.Add(time.Hour)
	err = e.svc.Rotate(ctx, testTenant, id, "manual")
	if errs.KindOf(err) != errs.Unavailable {
		t.Fatalf("want unavailable, got %v", err)
	}
	after, _ := json.Marshal(e.chain(t, id))
	if !bytes.Equal(before, after) {
		t.Fatal("failed rotation changed the chain")
	}
	gen := e.prov.generated[len(e.prov.generated)-1]
	if !e.prov.wasDeleted(gen) {
		t.Errorf("key %s generated by the failed rotation was not deleted", gen)
	}
	e.prov.set(func(p *recProvider) { p.failSign = false; p.failGen = true })
	if err := e.svc.Rotate(ctx, testTenant, id, "manual"); err == nil {
		t.Fatal("rotation with failing generate succeeded")
	}
	after, _ = json.Marshal(e.chain(t, id))
	if !bytes.Equal(before, after) {
		t.Fatal("failed rotation changed the chain")
	}
}

func TestSignUpdateDeleteExportTenancy(t *testing.T) {
	e := newEnv(t)
	id, err := e.svc.Create(ctx, e.p, CreateRequest{UsageType: UsageAttestation, Type: TypeInternalChain, Description: ptr("a")})
	if err != nil {
		t.Fatal(err)
	}
	// Sign message and digest.
	r, err := e.svc.Sign(ctx, testTenant, id, SignRequest{Data: []byte("hello")})
	if err != nil || !keyutil.VerifyRaw(mustPub(t, e.chain(t, id).Active), []byte("hello"), r.Signature) {
		t.Fatalf("sign: %v", err)
	}
	// Another tenant sees nothing.
	for _, f := range []func() error{
		func() error { _, err := e.svc.Get(ctx, "other", id); return err },
		func() error { _, err := e.svc.Sign(ctx, "other", id, SignRequest{Data: []byte("x")}); return err },
		func() error { return e.svc.Rotate(ctx, "other", id, "manual") },
		func() error { _, err := e.svc.Export(ctx, "other", id); return err },
		func() error { return e.svc.Delete(ctx, "other", id) },
	} {
		wantCode(t, f(), errs.NotFound, "key_chain_not_found")
	}
	// Update: description, policy patch, active certificate replacement validated.
	if err := e.svc.Update(ctx, testTenant, id, UpdateRequest{Description: ptr("b"),
		RotationPolicy: &PolicyInput{IntervalDays: intp(5)}}); err != nil {
		t.Fatal(err)
	}
	c := e.chain(t, id)
	if c.Description != "b" || c.Rotation.IntervalDays != 5 || c.Rotation.Enabled {
		t.Fatalf("update: %+v", c.Rotation)
	}
	if err := e.svc.Update(ctx, testTenant, id, UpdateRequest{ActiveCertificate: ptr(c.RootCertificate)}); errs.KindOf(err) != errs.BadInput {
		t.Fatalf("update with a cert for another key: %v", err)
	}
	if err := e.svc.Update(ctx, testTenant, id, UpdateRequest{ActiveCertificate: ptr(c.ActiveCertificate)}); err != nil {
		t.Fatalf("update with the same chain: %v", err)
	}

	// Export and re-import elsewhere: lossless (root, leaf, kids, certs).
	ex, err := e.svc.Export(ctx, testTenant, id)
	if err != nil {
		t.Fatal(err)
	}
	if !ex.PrivateKeyExportable || ex.Key.D == "" || ex.ActiveKey == nil || ex.ActiveKey.D == "" || len(ex.Crt) != 1 || len(ex.ActiveCrt) != 2 {
		t.Fatalf("export %+v", ex)
	}
	b, _ := json.Marshal(ex)
	var req ImportRequest
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&req); err != nil {
		t.Fatalf("export is not a valid import file: %v", err)
	}
	ep := *e.p
	ep.TenantID = "other"
	if _, err := e.svc.Import(ctx, &ep, req); err != nil {
		t.Fatalf("re-import export: %v", err)
	}
	o, _ := e.svc.load(ctx, "other", id)
	if o.ActiveCertificate != c.ActiveCertificate || o.RootCertificate != c.RootCertificate || o.Active.KID != c.Active.KID ||
		o.Type() != TypeInternalChain {
		t.Fatal("re-imported chain differs")
	}

	// Encrypt chains never sign.
	bootstrapped := newEnv(t)
	if rep, err := bootstrapped.svc.Bootstrap(ctx, testTenant); err != nil || len(rep.Failed()) != 0 {
		t.Fatal(err, rep)
	}
	all, err := bootstrapped.svc.list(ctx, tenantPrefix(testTenant))
	if err != nil {
		t.Fatal(err)
	}
	usages := map[string]string{}
	encryptID := ""
	for _, c := range all {
		usages[c.UsageType] = c.Type()
		if c.UsageType == UsageEncrypt {
			encryptID = c.ID
			if c.Usage != KeyUseEncrypt || c.ActiveCertificate != "" || c.Provider != "db" || c.Active.PublicJWK.Alg != "ECDH-ES" {
				t.Errorf("encrypt chain %+v", c)
			}
			_, err := bootstrapped.svc.Sign(ctx, testTenant, c.ID, SignRequest{Data: []byte("x")})
			wantCode(t, err, errs.BadInput, "wrong_usage")
		}
	}
	if len(all) != 3 || encryptID == "" || usages[UsageAccess] != TypeInternalChain || usages[UsageAttestation] != TypeInternalChain {
		t.Fatalf("bootstrap made %v", usages)
	}
	// The encrypt chain is not listed (EUDIPLO lists usage=sign rows only), with or without the
	// usageType filter, and is still read by id; signing by usage type encrypt finds no chain.
	list, _ := bootstrapped.svc.List(ctx, testTenant, "")
	enc, _ := bootstrapped.svc.List(ctx, testTenant, UsageEncrypt)
	if len(list) != 2 || len(enc) != 0 {
		t.Fatalf("listed %d chains (%d with usageType encrypt), want 2 (0)", len(list), len(enc))
	}
	if r, err := bootstrapped.svc.Get(ctx, testTenant, encryptID); err != nil || r.UsageType != UsageEncrypt || r.ActiveCertificate != nil {
		t.Fatalf("encrypt chain by id: %+v %v", r, err)
	}
	_, err = bootstrapped.svc.ResolveUsage(ctx, testTenant, UsageEncrypt)
	wantCode(t, err, errs.NotFound, "key_chain_not_found")
	// Bootstrap again is a no-op; statusList falls back to attestation.
	if rep, err := bootstrapped.svc.Bootstrap(ctx, testTenant); err != nil || len(rep.Chains) != 3 || rep.Chains[0].Status != BootSkipped {
		t.Fatal(err, rep)
	}
	if l, _ := bootstrapped.svc.List(ctx, testTenant, ""); len(l) != 2 {
		t.Fatalf("second bootstrap: %d chains", len(l))
	}
	sl, err := bootstrapped.svc.ResolveUsage(ctx, testTenant, UsageStatusList)
	att, _ := bootstrapped.svc.List(ctx, testTenant, UsageAttestation)
	if err != nil || sl != att[0].ID {
		t.Fatalf("statusList fallback: %v %s", err, sl)
	}

	// Delete removes every key in the backend.
	e.clock.Add(time.Hour)
	if err := e.svc.Rotate(ctx, testTenant, id, "manual"); err != nil {
		t.Fatal(err)
	}
	c = e.chain(t, id)
	if err := e.svc.Delete(ctx, testTenant, id); err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{c.Active.KID, c.latestPrevious().Key.KID, c.Root.KID} {
		if !e.prov.wasDeleted(k) {
			t.Errorf("delete left key %s in the backend", k)
		}
	}
	if _, err := e.svc.Get(ctx, testTenant, id); errs.KindOf(err) != errs.NotFound {
		t.Fatal("deleted chain still readable")
	}
}

// TestSubjectFormatOrder makes sure the DN string is encoded-order "C=.., CN=..".
func TestSubjectFormatOrder(t *testing.T) {
	e := newEnv(t)
	id, _ := e.svc.Create(ctx, e.p, CreateRequest{UsageType: UsageAccess, Type: TypeStandalone})
	cert := mustCerts(t, e.chain(t, id).ActiveCertificate)[0]
	var rdn asn1.RawValue
	if _, err := asn1.Unmarshal(cert.RawSubject, &rdn); err != nil {
		t.Fatal(err)
	}
	if got := dnString(cert.Subject); got != "C=NL, CN=Acme Issuer" {
		t.Fatalf("subject %q", got)
	}
}
