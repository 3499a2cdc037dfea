package keychain

import (
	"context"
	"strings"
	"testing"

	dto "github.com/prometheus/client_model/go"

	"github.com/kmsgate/kmsgate/appliance/store"
)

// signCount is the number of signatures kmsgate_sign_duration_seconds has recorded for the db
// provider (ES256, ok).
func signCount(t *testing.T, e *env) uint64 {
	t.Helper()
	mfs, err := e.m.Registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var n uint64
	for _, mf := range mfs {
		if mf.GetName() != "kmsgate_sign_duration_seconds" {
			continue
		}
		for _, m := range mf.GetMetric() {
			n += m.GetHistogram().GetSampleCount()
		}
	}
	return n
}

// Key-chain signatures, JWS and certificate issuance go through the provider decorator and so
// reach the sign histogram like contract-face signatures.
func TestKeyChainSignaturesAreMeasured(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	before := signCount(t, e)
	id, err := e.svc.Create(ctx, e.p, CreateRequest{UsageType: UsageAccess, Type: TypeInternalChain})
	if err != nil {
		t.Fatal(err)
	}
	// Root self-signature and the leaf issued by the root.
	afterCreate := signCount(t, e)
	if afterCreate-before != 2 {
		t.Fatalf("create recorded %d signatures, want 2 (root and leaf certificates)", afterCreate-before)
	}
	if _, err := e.svc.Sign(ctx, testTenant, id, SignRequest{Data: []byte("m")}); err != nil {
		t.Fatal(err)
	}
	afterSign := signCount(t, e)
	if afterSign != afterCreate+1 {
		t.Fatalf("sign recorded %d signatures, want 1", afterSign-afterCreate)
	}
	if _, err := e.svc.JWS(ctx, testTenant, id, JWSRequest{Payload: []byte(`{"a":1}`)}); err != nil {
		t.Fatal(err)
	}
	afterJWS := signCount(t, e)
	if afterJWS != afterSign+1 {
		t.Fatalf("JWS recorded %d signatures, want 1", afterJWS-afterSign)
	}
	if err := e.svc.Rotate(ctx, testTenant, id, "manual"); err != nil {
		t.Fatal(err)
	}
	if got := signCount(t, e); got != afterJWS+1 {
		t.Fatalf("rotation recorded %d signatures, want 1 (the new leaf)", got-afterJWS)
	}
	var pm dto.Metric
	if err := e.m.KeyOps.WithLabelValues("db", "generate", "ok").Write(&pm); err != nil {
		t.Fatal(err)
	}
	if ops := pm.GetCounter().GetValue(); ops != 3 {
		t.Fatalf("key generations counted %v, want 3 (root, active, rotated)", ops)
	}
}

// A stored internal chain whose root certificate is missing fails rotation with an error that
// says so, instead of formatting a nil error.
func TestRotateWithoutRootCertificateSaysWhy(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	id, err := e.svc.Create(ctx, e.p, CreateRequest{UsageType: UsageAccess, Type: TypeInternalChain})
	if err != nil {
		t.Fatal(err)
	}
	c := e.chain(t, id)
	// Not a PEM certificate, but non-empty so the chain still counts as internal.
	c.RootCertificate = "-----BEGIN NOTHING-----\n-----END NOTHING-----\n"
	if err := e.st.Put(ctx, chainKey(testTenant, id), c); err != nil {
		t.Fatal(err)
	}
	err = e.svc.Rotate(ctx, testTenant, id, "manual")
	if err == nil {
		t.Fatal("rotation succeeded without a root certificate")
	}
	if strings.Contains(err.Error(), "<nil>") || strings.Contains(err.Error(), "%!") {
		t.Fatalf("error formats a nil error: %q", err)
	}
	var _ store.KeyRef = c.Active
}
