package providers

import (
	"context"
	"crypto/ecdsa"
	"errors"
	"fmt"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/kmsgate/kmsgate/internal/errs"
)

// Operation results reported to an Observer (a closed set, so metric labels stay bounded).
const (
	ResultOK          = "ok"
	ResultError       = "error"
	ResultUnavailable = "unavailable"
	ResultThrottled   = "throttled"
	ResultBadInput    = "bad_input"
	ResultNotFound    = "not_found"
)

// Key operations reported to Observer.KeyOp.
const (
	OpGenerate = "generate"
	OpImport   = "import"
	OpDelete   = "delete"
)

// DigestSize is the digest length SignDigest accepts for ES256 (SHA-256).
const DigestSize = 32

// sigSize is the raw r‖s length of a P-256 signature.
const sigSize = 64

// Observer receives the measurements of one provider. The registry asks for it once per provider
// at construction, so an implementation can resolve its metric label children up front and the
// sign path does no label lookup.
type Observer interface {
	// ObserveSign records one signature attempt (message or digest) and how long it took.
	ObserveSign(alg, result string, d time.Duration)
	// Throttled counts a call the backend rejected as throttled or over quota.
	Throttled()
	// KeyOp counts one key lifecycle operation (OpGenerate, OpImport, OpDelete).
	KeyOp(op, result string)
}

// ObserverFor returns the Observer of the provider with the given id.
type ObserverFor func(providerID string) Observer

// ResultOf folds an error into the result set.
func ResultOf(err error) string {
	if err == nil {
		return ResultOK
	}
	switch errs.KindOf(err) {
	case errs.Unavailable:
		return ResultUnavailable
	case errs.Throttled:
		return ResultThrottled
	case errs.BadInput, errs.NotSupported:
		return ResultBadInput
	case errs.NotFound:
		return ResultNotFound
	}
	return ResultError
}

// Optional provider abilities. Callers find them with As, which sees through the registry's
// decorator.
type (
	// PrivateExporter hands out a key's private half (only providers whose keys kmsgate holds).
	PrivateExporter interface {
		ExportPrivate(ref KeyRef) (*ecdsa.PrivateKey, error)
	}
	// MetricsCollector is implemented by providers that export collectors of their own (aws-kms
	// throttling counters); the appliance registers them.
	MetricsCollector interface {
		prometheus.Collector
	}
	// Unwrapper is implemented by decorators: Unwrap returns the provider they wrap.
	Unwrapper interface {
		Unwrap() Provider
	}
)

// As finds an optional ability T on p or on any provider it decorates.
func As[T any](p Provider) (T, bool) {
	for p != nil {
		if t, ok := p.(T); ok {
			return t, true
		}
		u, ok := p.(Unwrapper)
		if !ok {
			break
		}
		p = u.Unwrap()
	}
	var zero T
	return zero, false
}

type nopObserver struct{}

func (nopObserver) ObserveSign(string, string, time.Duration) {}
func (nopObserver) Throttled()                                {}
func (nopObserver) KeyOp(string, string)                      {}

// instrumented is the decorator the registry puts around every provider: it does the checks
// every call needs (algorithm, digest length, signature shape), stamps errors with the provider
// and operation, and reports metrics, so that no caller and no provider repeats them.
type instrumented struct {
	p   Provider
	id  string
	obs Observer
}

// Instrument wraps p in the decorator; obs may be nil.
func Instrument(p Provider, obs Observer) Provider {
	if obs == nil {
		obs = nopObserver{}
	}
	return &instrumented{p: p, id: p.ID(), obs: obs}
}

func (d *instrumented) Unwrap() Provider                  { return d.p }
func (d *instrumented) ID() string                        { return d.id }
func (d *instrumented) Type() string                      { return d.p.Type() }
func (d *instrumented) Description() string               { return d.p.Description() }
func (d *instrumented) Capabilities() Capabilities        { return d.p.Capabilities() }
func (d *instrumented) Health(ctx context.Context) Health { return d.p.Health(ctx) }
func (d *instrumented) Close() error                      { return d.p.Close() }

// ExternalIDFor forwards to the decorated provider; one that cannot predict ids answers "".
func (d *instrumented) ExternalIDFor(spec KeySpec) (string, error) {
	if n, ok := d.p.(Namer); ok {
		return n.ExternalIDFor(spec)
	}
	return "", nil
}

func (d *instrumented) Generate(ctx context.Context, spec KeySpec) (KeyRef, error) {
	spec.Alg = resolveAlg(spec.Alg)
	var ref KeyRef
	err := d.checkAlg(OpGenerate, spec.Alg)
	if err == nil {
		ref, err = d.p.Generate(ctx, spec)
		err = d.stamp(OpGenerate, err)
	}
	d.keyOp(OpGenerate, err)
	return ref, err
}

func (d *instrumented) Import(ctx context.Context, spec KeySpec, priv *ecdsa.PrivateKey) (KeyRef, error) {
	spec.Alg = resolveAlg(spec.Alg)
	var ref KeyRef
	err := d.checkAlg(OpImport, spec.Alg)
	if err == nil {
		ref, err = d.p.Import(ctx, spec, priv)
		err = d.stamp(OpImport, err)
	}
	d.keyOp(OpImport, err)
	return ref, err
}

func (d *instrumented) Delete(ctx context.Context, ref KeyRef) error {
	err := d.stamp(OpDelete, d.p.Delete(ctx, ref))
	d.keyOp(OpDelete, err)
	return err
}

func (d *instrumented) PublicKey(ctx context.Context, ref KeyRef) (*ecdsa.PublicKey, error) {
	pub, err := d.p.PublicKey(ctx, ref)
	return pub, d.stamp("public_key", err)
}

func (d *instrumented) SignMessage(ctx context.Context, ref KeyRef, alg string, msg []byte) ([]byte, error) {
	start := time.Now()
	alg = resolveAlg(alg)
	if err := d.checkAlg("sign", alg); err != nil {
		return d.signed(alg, start, nil, err, false)
	}
	sig, err := d.p.SignMessage(ctx, ref, alg, msg)
	return d.signed(alg, start, sig, err, true)
}

func (d *instrumented) SignDigest(ctx context.Context, ref KeyRef, alg string, digest []byte) ([]byte, error) {
	start := time.Now()
	alg = resolveAlg(alg)
	if err := d.checkAlg("sign", alg); err != nil {
		return d.signed(alg, start, nil, err, false)
	}
	if len(digest) != DigestSize {
		err := errs.Errorf(errs.BadInput, "digest must be %d bytes for %s, got %d", DigestSize, alg, len(digest)).
			WithCode("invalid_digest")
		err.Provider = d.id
		return d.signed(alg, start, nil, err, false)
	}
	sig, err := d.p.SignDigest(ctx, ref, alg, digest)
	return d.signed(alg, start, sig, err, true)
}

// signed finishes a signature: it checks the shape, stamps the provider's error and records the
// metrics. The decorator's own refusals (fromProvider false) are already complete.
func (d *instrumented) signed(alg string, start time.Time, sig []byte, err error, fromProvider bool) ([]byte, error) {
	if err == nil && len(sig) != sigSize {
		// Never hand a caller a signature of the wrong shape: a wrong length corrupts a JWS.
		sig, err = nil, &errs.Error{Kind: errs.Internal, Provider: d.id, Op: "sign",
			Msg: fmt.Sprintf("provider returned a %d-byte signature instead of %d", len(sig), sigSize)}
	}
	if fromProvider {
		err = d.stamp("sign", err)
	}
	if err != nil && errs.KindOf(err) == errs.Throttled {
		d.obs.Throttled()
	}
	if alg != ES256 {
		// A refused algorithm comes from the caller: never let it grow the label set.
		alg = "unsupported"
	}
	d.obs.ObserveSign(alg, ResultOf(err), time.Since(start))
	return sig, err
}

func (d *instrumented) keyOp(op string, err error) {
	if err != nil && errs.KindOf(err) == errs.Throttled {
		d.obs.Throttled()
	}
	d.obs.KeyOp(op, ResultOf(err))
}

func resolveAlg(alg string) string {
	if alg == "" {
		return ES256
	}
	return alg
}

// checkAlg refuses every algorithm but ES256, so a provider never signs with a curve or hash the
// caller did not ask for.
func (d *instrumented) checkAlg(op, alg string) error {
	if alg == ES256 {
		return nil
	}
	return &errs.Error{Kind: errs.NotSupported, Provider: d.id, Op: op, Code: "unsupported_alg",
		Msg: fmt.Sprintf("algorithm %q is not supported (supported: ES256)", alg)}
}

// stamp names the provider and operation on err. A classified error keeps its kind, code and
// message; an unclassified one becomes Internal with a safe message (its text may be the
// backend's own and stays in the cause, for logs only).
func (d *instrumented) stamp(op string, err error) error {
	if err == nil {
		return nil
	}
	var e *errs.Error
	if !errors.As(err, &e) {
		return &errs.Error{Kind: errs.Internal, Provider: d.id, Op: op, Msg: "the key backend failed", Err: err}
	}
	if e.Provider != "" && e.Op != "" {
		return err
	}
	// A copy: the provider may return a shared error value.
	c := *e
	if c.Provider == "" {
		c.Provider = d.id
	}
	if c.Op == "" {
		c.Op = op
	}
	if e != err {
		// e is wrapped: keep the whole chain as the cause, with the classification on top.
		c.Err = err
	}
	return &c
}
