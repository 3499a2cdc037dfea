package keychain

import (
	"crypto/ecdsa"
	"crypto/sha256"
	"errors"
	"math/big"
	"reflect"
	"testing"

	"github.com/kmsgate/kmsgate/internal/errs"
	"github.com/kmsgate/kmsgate/internal/keyutil"
)

// TestUsageTypeEncryptMakesASigningChain: as EUDIPLO, create and import with usageType encrypt
// make an ES256 signing chain (usage=sign, a certificate, listed), beside the tenant's ECDH
// encrypt chain, which stays unlisted and never signs. Signing by usage type encrypt picks the
// signing chain, and the bootstrap still counts only the ECDH chain as the tenant's encrypt chain.
func TestUsageTypeEncryptMakesASigningChain(t *testing.T) {
	e := newEnv(t)
	if rep, err := e.svc.Bootstrap(ctx, testTenant); err != nil || len(rep.Failed()) != 0 {
		t.Fatal(err, rep)
	}
	ecdhID := ""
	all, _ := e.svc.list(ctx, tenantPrefix(testTenant))
	for _, c := range all {
		if c.Usage == KeyUseEncrypt {
			ecdhID = c.ID
		}
	}
	if ecdhID == "" {
		t.Fatal("bootstrap made no ECDH encrypt chain")
	}

	created, err := e.svc.Create(ctx, e.p, CreateRequest{UsageType: UsageEncrypt, Type: TypeStandalone})
	if err != nil {
		t.Fatal(err)
	}
	imported, err := e.svc.Import(ctx, e.p, ImportRequest{ID: "enc-imp", UsageType: UsageEncrypt, Key: privJWK(t, newKey(t))})
	if err != nil {
		t.Fatal(err)
	}
	for _, id := range []string{created, imported} {
		c := e.chain(t, id)
		if c.Usage != KeyUseSign || c.UsageType != UsageEncrypt || c.Active.PublicJWK.Alg != "ES256" {
			t.Fatalf("chain %s: usage %q usageType %q alg %q, want a sign chain of usageType encrypt (ES256)",
				id, c.Usage, c.UsageType, c.Active.PublicJWK.Alg)
		}
		leaf := mustCerts(t, c.ActiveCertificate)[0]
		pub, _ := publicOf(c.Active)
		if !keyutil.SameKey(leaf.PublicKey.(*ecdsa.PublicKey), pub) {
			t.Fatalf("chain %s: the certificate does not hold the active key", id)
		}
		res, err := e.svc.Sign(ctx, testTenant, id, SignRequest{Data: []byte("msg")})
		if err != nil {
			t.Fatalf("sign with %s: %v", id, err)
		}
		verifyRaw(t, pub, []byte("msg"), res.Signature)
	}
	listed := map[string]bool{}
	enc, _ := e.svc.List(ctx, testTenant, UsageEncrypt)
	for _, r := range enc {
		listed[r.ID] = true
		if r.ActiveCertificate == nil {
			t.Errorf("listed chain %s has no certificate", r.ID)
		}
	}
	if len(enc) != 2 || !listed[created] || !listed[imported] || listed[ecdhID] {
		t.Fatalf("usageType=encrypt lists %v, want %s and %s, never the ECDH chain %s", listed, created, imported, ecdhID)
	}
	if _, err := e.svc.Get(ctx, testTenant, ecdhID); err != nil {
		t.Fatalf("the ECDH chain is not readable by id: %v", err)
	}
	if id, err := e.svc.ResolveUsage(ctx, testTenant, UsageEncrypt); err != nil || id != created {
		t.Fatalf("sign by usage type encrypt resolved %q, %v; want the oldest signing chain %s", id, err, created)
	}
	// The tenant has its ECDH chain: a bootstrap makes no second one, whatever signing chains of
	// usage type encrypt it has.
	if rep, err := e.svc.Bootstrap(ctx, testTenant); err != nil || statusOf(rep)[UsageEncrypt].Status != BootSkipped {
		t.Fatalf("second bootstrap: %+v %v", rep, err)
	}
}

// TestEncryptChainExportReimports: the export of the ECDH encrypt chain (alg ECDH-ES) imports back
// as an encrypt chain, not as a signing chain: a restore keeps the tenant's decryption key.
func TestEncryptChainExportReimports(t *testing.T) {
	e := newEnv(t)
	if _, err := e.svc.Bootstrap(ctx, testTenant); err != nil {
		t.Fatal(err)
	}
	var src *Chain
	all, _ := e.svc.list(ctx, tenantPrefix(testTenant))
	for _, c := range all {
		if c.Usage == KeyUseEncrypt {
			src = c
		}
	}
	ex, err := e.svc.Export(ctx, testTenant, src.ID)
	if err != nil || ex.Key.Alg != "ECDH-ES" || ex.Key.D == "" {
		t.Fatalf("export: %+v %v", ex, err)
	}
	other := *e.p
	other.TenantID = "other"
	if _, err := e.svc.Import(ctx, &other, ImportRequest{ID: src.ID, UsageType: ex.UsageType, Key: &ex.Key}); err != nil {
		t.Fatal(err)
	}
	c, err := e.svc.load(ctx, "other", src.ID)
	if err != nil || c.Usage != KeyUseEncrypt || c.ActiveCertificate != "" || c.Active.PublicJWK.Alg != "ECDH-ES" ||
		c.Active.PublicJWK.X != src.Active.PublicJWK.X {
		t.Fatalf("re-imported encrypt chain: %+v %v", c, err)
	}
	// With a certificate it cannot be an encrypt chain: refused, and placed at key.alg.
	_, err = e.svc.Import(ctx, &other, ImportRequest{UsageType: UsageEncrypt, Key: &ex.Key, Crt: []string{"x"}})
	wantPath(t, err, "validation_failed", IssueCustom, "key", "alg")
}

// TestValidationFailuresArePlaced: request validation failures name the member they are about,
// as zod's path, and keep their kind and code.
func TestValidationFailuresArePlaced(t *testing.T) {
	e := newEnv(t)
	on := true
	for _, c := range []struct {
		name  string
		err   error
		code  string
		issue string
		path  []any
	}{
		{"interval too big", e.create(CreateRequest{UsageType: UsageAccess, Type: TypeStandalone,
			RotationPolicy: &PolicyInput{Enabled: &on, IntervalDays: intp(3651)}}), "validation_failed", IssueTooBig,
			[]any{"rotationPolicy", "intervalDays"}},
		{"validity too small", e.create(CreateRequest{UsageType: UsageAccess, Type: TypeStandalone,
			RotationPolicy: &PolicyInput{Enabled: &on, CertValidityDays: intp(0)}}), "validation_failed", IssueTooSmall,
			[]any{"rotationPolicy", "certValidityDays"}},
		{"enabled missing", e.create(CreateRequest{UsageType: UsageAccess, Type: TypeStandalone,
			RotationPolicy: &PolicyInput{}}), "validation_failed", IssueInvalidType, []any{"rotationPolicy", "enabled"}},
		{"usage type", e.create(CreateRequest{UsageType: "nope", Type: TypeStandalone}), "validation_failed",
			IssueInvalidValue, []any{"usageType"}},
		{"type", e.create(CreateRequest{UsageType: UsageAccess, Type: "nope"}), "validation_failed",
			IssueInvalidValue, []any{"type"}},
		{"provider", e.create(CreateRequest{UsageType: UsageAccess, Type: TypeStandalone, KMSProvider: "ghost"}),
			"unknown_provider", IssueInvalidValue, []any{"kmsProvider"}},
		{"import key missing", e.imp(ImportRequest{UsageType: UsageAccess}), "validation_failed", IssueInvalidType, []any{"key"}},
		{"import crt entry", e.imp(ImportRequest{UsageType: UsageAccess, Key: privJWK(t, newKey(t)), Crt: []string{"garbage"}}),
			"invalid_certificate", IssueCustom, []any{"crt", 0}},
		{"update certificate", e.svc.Update(ctx, testTenant, e.mustCreate(t), UpdateRequest{ActiveCertificate: ptr("x")}),
			"invalid_certificate", IssueCustom, []any{"activeCertificate"}},
	} {
		t.Run(c.name, func(t *testing.T) { wantPath(t, c.err, c.code, c.issue, c.path...) })
	}
}

func (e *env) create(req CreateRequest) error {
	_, err := e.svc.Create(ctx, e.p, req)
	return err
}

func (e *env) imp(req ImportRequest) error {
	_, err := e.svc.Import(ctx, e.p, req)
	return err
}

func (e *env) mustCreate(t *testing.T) string {
	t.Helper()
	id, err := e.svc.Create(ctx, e.p, CreateRequest{UsageType: UsageAccess, Type: TypeStandalone})
	if err != nil {
		t.Fatal(err)
	}
	return id
}

func wantPath(t *testing.T, err error, code, issue string, path ...any) {
	t.Helper()
	wantCode(t, err, errs.BadInput, code)
	var fe *fieldError
	if !errors.As(err, &fe) {
		t.Fatalf("%v: not placed at a member", err)
	}
	if fe.IssueCode() != issue || !reflect.DeepEqual(fe.FieldPath(), path) {
		t.Fatalf("%v: placed at %v (%s), want %v (%s)", err, fe.FieldPath(), fe.IssueCode(), path, issue)
	}
}

func verifyRaw(t *testing.T, pub *ecdsa.PublicKey, msg, sig []byte) {
	t.Helper()
	if len(sig) != 64 {
		t.Fatalf("signature of %d bytes, want raw r||s", len(sig))
	}
	h := sha256.Sum256(msg)
	r, sv := new(big.Int).SetBytes(sig[:32]), new(big.Int).SetBytes(sig[32:])
	if !ecdsa.Verify(pub, h[:], r, sv) {
		t.Fatal("signature does not verify")
	}
}
