package providers_test

import (
	"context"
	"crypto/ecdsa"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/kmsgate/kmsgate/internal/errs"
	"github.com/kmsgate/kmsgate/providers"
)

// fakeProvider returns whatever the test tells it to. It is a fake because the faults under test
// (a signature of the wrong length, an unclassified or throttled error on demand) cannot be
// produced by a real backend reliably.
type fakeProvider struct {
	providers.Base
	sig    []byte
	err    error
	signed int
}

func (f *fakeProvider) Capabilities() providers.Capabilities {
	return providers.Capabilities{CanCreate: true, CanDelete: true, CanSignDigest: true, CanSignMessage: true,
		SupportedAlgs: []string{providers.ES256}, DefaultAlg: providers.ES256}
}
func (f *fakeProvider) Generate(context.Context, providers.KeySpec) (providers.KeyRef, error) {
	return providers.KeyRef{}, f.err
}
func (f *fakeProvider) Import(context.Context, providers.KeySpec, *ecdsa.PrivateKey) (providers.KeyRef, error) {
	return providers.KeyRef{}, f.err
}
func (f *fakeProvider) Delete(context.Context, providers.KeyRef) error { return f.err }
func (f *fakeProvider) PublicKey(context.Context, providers.KeyRef) (*ecdsa.PublicKey, error) {
	return nil, f.err
}
func (f *fakeProvider) SignMessage(context.Context, providers.KeyRef, string, []byte) ([]byte, error) {
	f.signed++
	return f.sig, f.err
}
func (f *fakeProvider) SignDigest(context.Context, providers.KeyRef, string, []byte) ([]byte, error) {
	f.signed++
	return f.sig, f.err
}
func (f *fakeProvider) Health(context.Context) providers.Health { return providers.Health{OK: true} }
func (f *fakeProvider) Close() error                            { return nil }
func (f *fakeProvider) ExportPrivate(providers.KeyRef) (*ecdsa.PrivateKey, error) {
	return nil, nil
}

type sample struct{ alg, result string }

type recObserver struct {
	signs     []sample
	throttled int
	ops       []sample
}

func (r *recObserver) ObserveSign(alg, result string, _ time.Duration) {
	r.signs = append(r.signs, sample{alg, result})
}
func (r *recObserver) Throttled()              { r.throttled++ }
func (r *recObserver) KeyOp(op, result string) { r.ops = append(r.ops, sample{op, result}) }

func newFake(sig []byte, err error) (*fakeProvider, *recObserver, providers.Provider) {
	f := &fakeProvider{Base: providers.NewBase("fake", "p1", ""), sig: sig, err: err}
	obs := &recObserver{}
	return f, obs, providers.Instrument(f, obs)
}

func TestDecoratorRefusesOtherAlgorithms(t *testing.T) {
	f, obs, p := newFake(make([]byte, 64), nil)
	_, err := p.SignMessage(context.Background(), providers.KeyRef{}, "ES384", []byte("m"))
	if errs.KindOf(err) != errs.NotSupported || errs.CodeOf(err) != "unsupported_alg" {
		t.Fatalf("ES384: err %v (code %q), want not_supported/unsupported_alg", err, errs.CodeOf(err))
	}
	if _, err := p.Generate(context.Background(), providers.KeySpec{KID: "k", Alg: "RS256"}); errs.CodeOf(err) != "unsupported_alg" {
		t.Fatalf("Generate RS256: %v", err)
	}
	if f.signed != 0 {
		t.Fatal("the provider was called with a refused algorithm")
	}
	if len(obs.signs) != 1 || obs.signs[0] != (sample{"unsupported", providers.ResultBadInput}) {
		t.Fatalf("observed %+v, want one unsupported/bad_input sample (no caller-chosen label)", obs.signs)
	}
	if sig, err := p.SignMessage(context.Background(), providers.KeyRef{}, "", []byte("m")); err != nil || len(sig) != 64 {
		t.Fatalf("empty alg must mean ES256: %v", err)
	}
}

func TestDecoratorChecksDigestLength(t *testing.T) {
	f, _, p := newFake(make([]byte, 64), nil)
	_, err := p.SignDigest(context.Background(), providers.KeyRef{}, providers.ES256, make([]byte, 31))
	if errs.KindOf(err) != errs.BadInput || errs.CodeOf(err) != "invalid_digest" {
		t.Fatalf("31-byte digest: %v, want bad_input/invalid_digest", err)
	}
	if f.signed != 0 {
		t.Fatal("the provider was called with a bad digest")
	}
}

func TestDecoratorRefusesWrongSignatureLength(t *testing.T) {
	_, obs, p := newFake(make([]byte, 63), nil)
	sig, err := p.SignMessage(context.Background(), providers.KeyRef{}, providers.ES256, []byte("m"))
	if sig != nil || errs.KindOf(err) != errs.Internal {
		t.Fatalf("63-byte signature: sig %x err %v, want nil and Internal", sig, err)
	}
	var e *errs.Error
	if !errors.As(err, &e) || e.Provider != "p1" {
		t.Fatalf("error not stamped with the provider: %#v", err)
	}
	if len(obs.signs) != 1 || obs.signs[0].result != providers.ResultError {
		t.Fatalf("observed %+v, want one error sample", obs.signs)
	}
}

func TestDecoratorStampsErrors(t *testing.T) {
	backendText := "connection refused by 10.0.0.7 token=abc"
	_, obs, p := newFake(nil, errors.New(backendText))
	_, err := p.Generate(context.Background(), providers.KeySpec{KID: "k"})
	var e *errs.Error
	if !errors.As(err, &e) || e.Kind != errs.Internal || e.Provider != "p1" || e.Op != providers.OpGenerate {
		t.Fatalf("unclassified error: %#v, want Internal stamped p1/generate", err)
	}
	if strings.Contains(errs.PublicMessage(err), "10.0.0.7") {
		t.Fatalf("backend text in the public message: %q", errs.PublicMessage(err))
	}
	if len(obs.ops) != 1 || obs.ops[0] != (sample{providers.OpGenerate, providers.ResultError}) {
		t.Fatalf("key ops %+v", obs.ops)
	}

	classified := errs.Errorf(errs.NotFound, "key gone").WithCode("x")
	_, _, p = newFake(nil, classified)
	err = p.Delete(context.Background(), providers.KeyRef{})
	if !errors.As(err, &e) || e.Kind != errs.NotFound || e.Code != "x" || e.Provider != "p1" || e.Op != providers.OpDelete {
		t.Fatalf("classified error: %#v", err)
	}
	if classified.Provider != "" || classified.Op != "" {
		t.Fatal("the provider's own error value was mutated")
	}
}

func TestDecoratorCountsThrottling(t *testing.T) {
	_, obs, p := newFake(nil, &errs.Error{Kind: errs.Throttled, Msg: "slow down"})
	for range 3 {
		if _, err := p.SignMessage(context.Background(), providers.KeyRef{}, providers.ES256, []byte("m")); errs.KindOf(err) != errs.Throttled {
			t.Fatalf("err %v", err)
		}
	}
	if obs.throttled != 3 {
		t.Fatalf("throttled counted %d times, want 3", obs.throttled)
	}
	if obs.signs[0].result != providers.ResultThrottled {
		t.Fatalf("result %q", obs.signs[0].result)
	}
}

func TestAsSeesThroughTheDecorator(t *testing.T) {
	f, _, p := newFake(nil, nil)
	if _, ok := p.(providers.PrivateExporter); ok {
		t.Fatal("the decorator itself must not claim optional abilities")
	}
	ex, ok := providers.As[providers.PrivateExporter](p)
	if !ok || ex != providers.PrivateExporter(f) {
		t.Fatal("As did not find the wrapped provider's ability")
	}
	if _, ok := providers.As[providers.MetricsCollector](p); ok {
		t.Fatal("As found an ability the provider does not have")
	}
}

func TestUnknownTypeNamesTheFactories(t *testing.T) {
	_, err := providers.NewRegistry(context.Background(), []providers.Config{{ID: "x", Type: "nope"}}, "x",
		map[string]providers.Factory{"b": nil, "a": nil}, nil)
	if err == nil || !strings.Contains(err.Error(), "(known: a, b)") {
		t.Fatalf("err %v", err)
	}
}
