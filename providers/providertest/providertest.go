// Package providertest is the contract every kmsgate provider must honour, written once and run
// against each real backend (db, pkcs11, vault, aws-kms, http). It is a regular package, not a
// _test file, so each provider's tests can import it.
package providertest

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kmsgate/kmsgate/internal/errs"
	"github.com/kmsgate/kmsgate/internal/keyutil"
	"github.com/kmsgate/kmsgate/providers"
)

// Harness describes one provider under test.
type Harness struct {
	// New returns a fresh provider connected to a running backend. The suite closes it.
	New func(t *testing.T) providers.Provider
	// Tenant is the tenant keys are created under (default "contract-tenant").
	Tenant string
	// MissingRef builds a reference to a key that never existed, in the provider's own id format
	// (an AWS KeyId must look like a UUID). Default: spec fields with an empty ExternalID.
	MissingRef func(spec providers.KeySpec) providers.KeyRef
	// TenantScoped says the provider keeps the same kid of two tenants apart (every provider
	// today: vault, aws-kms, pkcs11, db, and http through tenant-scoped remote names).
	TenantScoped bool
	// StopBackend stops the backend for the health-down check; StartBackend (optional) restarts
	// it, after which health must recover. Both nil: the down check is skipped.
	StopBackend  func(t *testing.T)
	StartBackend func(t *testing.T)
	// HealthTimeout bounds each health probe (default 5s).
	HealthTimeout time.Duration
	// MinSignatures is the least number of signatures the leading-zero phase makes (default 600).
	MinSignatures int
}

// Result is what the suite measured, for reports.
type Result struct {
	P50Sequential time.Duration // median latency of one sign call with nothing else running
	P50Concurrent time.Duration // median latency with 16 concurrent signers
	Signatures    int
	LeadingZeros  int
}

const (
	concurrency   = 16
	maxSignatures = 5000
	seqSamples    = 100
)

// Run runs the whole contract against h and returns the measurements (also logged).
func Run(t *testing.T, h Harness) Result {
	t.Helper()
	if h.Tenant == "" {
		h.Tenant = "contract-tenant"
	}
	if h.HealthTimeout == 0 {
		h.HealthTimeout = 5 * time.Second
	}
	if h.MinSignatures == 0 {
		h.MinSignatures = 600
	}
	// The contract holds for a provider as the registry hands it out: behind the decorator that
	// checks algorithms, digest lengths and signature shapes for every provider.
	p := providers.Instrument(h.New(t), nil)
	t.Cleanup(func() {
		if err := p.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	caps := p.Capabilities()
	var res Result
	ctx := context.Background()

	if !caps.Supports(providers.ES256) || caps.DefaultAlg != providers.ES256 {
		t.Fatalf("capabilities must support and default to ES256: %+v", caps)
	}
	if !caps.CanSignMessage {
		t.Fatalf("every provider must sign messages: %+v", caps)
	}

	t.Run("health ok", func(t *testing.T) {
		hl := providers.HealthProbe(ctx, p, h.HealthTimeout)
		if !hl.OK {
			t.Fatalf("health not ok: %+v", hl)
		}
	})

	spec := newSpec(h.Tenant, "main")
	ref, err := p.Generate(ctx, spec)
	if err != nil {
		t.Fatalf("Generate: %v", err)
	}
	t.Run("generate returns a usable ref", func(t *testing.T) {
		if ref.Public == nil || ref.Public.Curve != elliptic.P256() {
			t.Fatalf("ref.Public must be a P-256 key, got %+v", ref.Public)
		}
		if ref.ExternalID == "" {
			t.Fatal("ref has no ExternalID: the provider could not find the key again")
		}
		if ref.Tenant != spec.Tenant || ref.KID != spec.KID {
			t.Fatalf("ref (tenant %q kid %q) does not echo the spec (%q %q)", ref.Tenant, ref.KID, spec.Tenant, spec.KID)
		}
		pub, err := p.PublicKey(ctx, ref)
		if err != nil {
			t.Fatalf("PublicKey: %v", err)
		}
		if !keyutil.SameKey(pub, ref.Public) {
			t.Fatal("PublicKey differs from the public key Generate returned")
		}
	})

	t.Run("sign message verifies", func(t *testing.T) {
		msg := []byte("kmsgate contract " + spec.KID)
		sig, err := p.SignMessage(ctx, ref, providers.ES256, msg)
		if err != nil {
			t.Fatalf("SignMessage: %v", err)
		}
		mustVerify(t, ref.Public, sha256Sum(msg), sig)
	})

	t.Run("sign digest honours capability", func(t *testing.T) {
		d := sha256Sum([]byte("digest input"))
		sig, err := p.SignDigest(ctx, ref, providers.ES256, d)
		if !caps.CanSignDigest {
			if errs.KindOf(err) != errs.NotSupported || sig != nil {
				t.Fatalf("SignDigest without CanSignDigest: got sig=%x err=%v, want KindNotSupported", sig, err)
			}
			return
		}
		if err != nil {
			t.Fatalf("SignDigest: %v", err)
		}
		mustVerify(t, ref.Public, d, sig)
		if sig, err := p.SignDigest(ctx, ref, providers.ES256, d[:31]); err == nil {
			t.Fatalf("SignDigest accepted a 31-byte digest and returned %x", sig)
		}
	})

	t.Run("unsupported alg is refused", func(t *testing.T) {
		sig, err := p.SignMessage(ctx, ref, "ES384", []byte("x"))
		if k := errs.KindOf(err); err == nil || (k != errs.NotSupported && k != errs.BadInput) || sig != nil {
			t.Fatalf("SignMessage ES384: sig=%x err=%v (kind %v), want KindNotSupported/KindBadInput", sig, err, errs.KindOf(err))
		}
		if caps.CanSignDigest {
			sig, err = p.SignDigest(ctx, ref, "ES384", make([]byte, 48))
			if k := errs.KindOf(err); err == nil || (k != errs.NotSupported && k != errs.BadInput) || sig != nil {
				t.Fatalf("SignDigest ES384: sig=%x err=%v, want KindNotSupported/KindBadInput", sig, err)
			}
		}
		bad := newSpec(h.Tenant, "es384")
		bad.Alg = "ES384"
		if r, err := p.Generate(ctx, bad); err == nil {
			_ = p.Delete(ctx, r)
			t.Fatal("Generate accepted ES384")
		}
	})

	t.Run("sequential latency", func(t *testing.T) {
		lat := make([]time.Duration, 0, seqSamples)
		for i := 0; i < seqSamples; i++ {
			msg := fmt.Appendf(nil, "seq %d", i)
			start := time.Now()
			sig, err := p.SignMessage(ctx, ref, providers.ES256, msg)
			lat = append(lat, time.Since(start))
			if err != nil {
				t.Fatalf("SignMessage %d: %v", i, err)
			}
			mustVerify(t, ref.Public, sha256Sum(msg), sig)
		}
		res.P50Sequential = median(lat)
	})

	t.Run("concurrent signing with leading zeros", func(t *testing.T) {
		res.Signatures, res.LeadingZeros, res.P50Concurrent = signConcurrently(t, p, ref, caps, h.MinSignatures)
	})

	t.Run("tenants are isolated", func(t *testing.T) {
		if !h.TenantScoped {
			t.Skip("provider namespace is per credential, not per tenant (http contract)")
		}
		a := newSpec(h.Tenant+"-a", "same")
		b := providers.KeySpec{Tenant: h.Tenant + "/b", KID: a.KID, Alg: providers.ES256}
		ra, err := p.Generate(ctx, a)
		if err != nil {
			t.Fatalf("Generate tenant a: %v", err)
		}
		defer p.Delete(ctx, ra)
		rb, err := p.Generate(ctx, b)
		if err != nil {
			t.Fatalf("Generate tenant b with the same kid: %v", err)
		}
		defer p.Delete(ctx, rb)
		if keyutil.SameKey(ra.Public, rb.Public) {
			t.Fatal("two tenants with the same kid got the same key")
		}
		if ra.ExternalID != "" && ra.ExternalID == rb.ExternalID {
			t.Fatalf("two tenants share ExternalID %q", ra.ExternalID)
		}
	})

	t.Run("import honours capability", func(t *testing.T) {
		priv, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		is := newSpec(h.Tenant, "import")
		r, err := p.Import(ctx, is, priv)
		if !caps.CanImport {
			if errs.KindOf(err) != errs.NotSupported {
				t.Fatalf("Import without CanImport: err=%v (kind %v), want KindNotSupported", err, errs.KindOf(err))
			}
			// Nothing may have been created: the same kid must still be free.
			g, err := p.Generate(ctx, is)
			if err != nil {
				t.Fatalf("Generate after refused Import: %v (did Import half-work?)", err)
			}
			if keyutil.SameKey(g.Public, &priv.PublicKey) {
				t.Fatal("refused Import left the imported key behind")
			}
			_ = p.Delete(ctx, g)
			return
		}
		if err != nil {
			t.Fatalf("Import: %v", err)
		}
		defer p.Delete(ctx, r)
		if !keyutil.SameKey(r.Public, &priv.PublicKey) {
			t.Fatal("imported ref's public key differs from the imported key")
		}
		msg := []byte("imported")
		sig, err := p.SignMessage(ctx, r, providers.ES256, msg)
		if err != nil {
			t.Fatalf("SignMessage with imported key: %v", err)
		}
		mustVerify(t, &priv.PublicKey, sha256Sum(msg), sig)
	})

	t.Run("identity hint names the key", func(t *testing.T) {
		hs := newSpec(h.Tenant, "hinted")
		var hint [16]byte
		rand.Read(hint[:])
		hs.ExternalID = hex.EncodeToString(hint[:])
		n, ok := providers.As[providers.Namer](p)
		if !ok {
			t.Fatal("the decorator must forward providers.Namer")
		}
		want, err := n.ExternalIDFor(hs)
		if err != nil {
			t.Fatalf("ExternalIDFor: %v", err)
		}
		if want == "" && p.Type() != providers.TypeAWSKMS {
			t.Fatal("a provider that names its keys must predict a hinted key's identity")
		}
		r, err := p.Generate(ctx, hs)
		if err != nil {
			t.Fatalf("hinted Generate: %v", err)
		}
		if want == "" {
			_ = p.Delete(ctx, r)
			return
		}
		if r.ExternalID != want {
			t.Fatalf("hinted key has ExternalID %q, predicted %q", r.ExternalID, want)
		}
		// The sweep knows nothing but the intent: tenant, kid and the predicted identity.
		if err := p.Delete(ctx, providers.KeyRef{ProviderID: p.ID(), Tenant: hs.Tenant, KID: hs.KID, ExternalID: want}); err != nil {
			t.Fatalf("Delete by the predicted identity: %v", err)
		}
		if _, err := p.SignMessage(ctx, r, providers.ES256, []byte("x")); errs.KindOf(err) != errs.NotFound {
			t.Fatalf("hinted key still signs after a delete by its predicted identity: %v", err)
		}
		bad := newSpec(h.Tenant, "bad-hint")
		bad.ExternalID = "../not-hex"
		if _, err := p.Generate(ctx, bad); errs.KindOf(err) != errs.BadInput {
			t.Fatalf("Generate with a malformed hint: %v, want bad input", err)
		}
	})

	t.Run("delete is idempotent and final", func(t *testing.T) {
		ds := newSpec(h.Tenant, "delete")
		r, err := p.Generate(ctx, ds)
		if err != nil {
			t.Fatalf("Generate: %v", err)
		}
		if _, err := p.SignMessage(ctx, r, providers.ES256, []byte("before")); err != nil {
			t.Fatalf("SignMessage before delete: %v", err)
		}
		if err := p.Delete(ctx, r); err != nil {
			t.Fatalf("Delete: %v", err)
		}
		if err := p.Delete(ctx, r); err != nil {
			t.Fatalf("second Delete: %v", err)
		}
		missing := newSpec(h.Tenant, "never-created")
		mref := providers.KeyRef{Tenant: missing.Tenant, KID: missing.KID, Alg: missing.Alg}
		if h.MissingRef != nil {
			mref = h.MissingRef(missing)
		}
		if err := p.Delete(ctx, mref); err != nil {
			t.Fatalf("Delete of a never-created key: %v", err)
		}
		sig, err := p.SignMessage(ctx, r, providers.ES256, []byte("after"))
		if errs.KindOf(err) != errs.NotFound || sig != nil {
			t.Fatalf("SignMessage after delete: sig=%x err=%v (kind %v), want KindNotFound", sig, err, errs.KindOf(err))
		}
		if _, err := p.SignMessage(ctx, mref, providers.ES256, []byte("x")); errs.KindOf(err) != errs.NotFound {
			t.Fatalf("SignMessage with a never-created key: err=%v (kind %v), want KindNotFound", err, errs.KindOf(err))
		}
	})

	t.Run("health down when backend stops", func(t *testing.T) {
		if h.StopBackend == nil {
			t.Skip("harness cannot stop the backend")
		}
		h.StopBackend(t)
		start := time.Now()
		hl := providers.HealthProbe(ctx, p, h.HealthTimeout)
		el := time.Since(start)
		if hl.OK || hl.Error == "" {
			t.Fatalf("health with the backend stopped: %+v, want ok:false with an error", hl)
		}
		if el > h.HealthTimeout+time.Second {
			t.Fatalf("health took %v, longer than its %v deadline", el, h.HealthTimeout)
		}
		t.Logf("health while down (%v): %s", el.Round(time.Millisecond), hl.Error)
		if _, err := p.SignMessage(ctx, ref, providers.ES256, []byte("down")); err == nil {
			t.Fatal("SignMessage succeeded with the backend stopped")
		}
		if h.StartBackend == nil {
			return
		}
		h.StartBackend(t)
		deadline := time.Now().Add(20 * time.Second)
		for {
			hl = providers.HealthProbe(ctx, p, h.HealthTimeout)
			if hl.OK {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("health did not recover after restart: %+v", hl)
			}
			time.Sleep(200 * time.Millisecond)
		}
	})

	_ = p.Delete(ctx, ref)
	t.Logf("%s provider %q: p50 sign latency %v sequential, %v at concurrency %d (%d signatures, %d with a leading zero in r or s)",
		p.Type(), p.ID(), res.P50Sequential, res.P50Concurrent, concurrency, res.Signatures, res.LeadingZeros)
	return res
}

// signConcurrently signs from 16 goroutines until at least minSigs signatures were made and one
// of them had a leading zero byte in r or s (about 1 in 128), so the fixed-width encoding is
// exercised on every backend instead of being left to chance.
func signConcurrently(t *testing.T, p providers.Provider, ref providers.KeyRef, caps providers.Capabilities,
	minSigs int) (total, zeros int, p50 time.Duration) {
	t.Helper()
	ctx := context.Background()
	var (
		n, nZero atomic.Int64
		mu       sync.Mutex
		lat      []time.Duration
		firstErr error
		wg       sync.WaitGroup
	)
	for g := 0; g < concurrency; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			local := make([]time.Duration, 0, 256)
			defer func() { mu.Lock(); lat = append(lat, local...); mu.Unlock() }()
			for {
				i := n.Add(1)
				if i > maxSignatures || (i > int64(minSigs) && nZero.Load() > 0) {
					return
				}
				msg := fmt.Appendf(nil, "concurrent %d", i)
				digest := sha256Sum(msg)
				start := time.Now()
				var sig []byte
				var err error
				if caps.CanSignDigest && i%2 == 0 {
					sig, err = p.SignDigest(ctx, ref, providers.ES256, digest)
				} else {
					sig, err = p.SignMessage(ctx, ref, providers.ES256, msg)
				}
				local = append(local, time.Since(start))
				if err == nil && (len(sig) != 64 || !keyutil.VerifyRawDigest(ref.Public, digest, sig)) {
					err = fmt.Errorf("signature %d (%d bytes) %x does not verify", i, len(sig), sig)
				}
				if err != nil {
					mu.Lock()
					if firstErr == nil {
						firstErr = err
					}
					mu.Unlock()
					return
				}
				if sig[0] == 0 || sig[32] == 0 {
					nZero.Add(1)
				}
			}
		}()
	}
	wg.Wait()
	if firstErr != nil {
		t.Fatalf("concurrent signing: %v", firstErr)
	}
	total = len(lat)
	if nZero.Load() == 0 {
		t.Fatalf("no signature out of %d had a leading zero byte in r or s (expected ~1/128)", total)
	}
	return total, int(nZero.Load()), median(lat)
}

func mustVerify(t *testing.T, pub *ecdsa.PublicKey, digest, sig []byte) {
	t.Helper()
	if len(sig) != 64 {
		t.Fatalf("signature is %d bytes, want 64 (raw r||s): %x", len(sig), sig)
	}
	der, err := keyutil.RawToDER(sig)
	if err != nil {
		t.Fatalf("RawToDER: %v", err)
	}
	if !ecdsa.VerifyASN1(pub, digest, der) {
		t.Fatalf("signature %x does not verify", sig)
	}
}

func newSpec(tenant, label string) providers.KeySpec {
	var b [6]byte
	_, _ = rand.Read(b[:])
	return providers.KeySpec{Tenant: tenant, KID: "ct-" + label + "-" + hex.EncodeToString(b[:]), Alg: providers.ES256}
}

func sha256Sum(b []byte) []byte { d := sha256.Sum256(b); return d[:] }

func median(d []time.Duration) time.Duration {
	if len(d) == 0 {
		return 0
	}
	s := slices.Clone(d)
	slices.Sort(s)
	return s[len(s)/2]
}
