// Package pkcs11 is the kmsgate provider for PKCS#11 tokens and HSMs. It maps the provider
// contract onto an hsm.Slot (pooled logged-in sessions, handle cache, self-healing) and owns
// only what the contract adds: configuration, error kinds, and the key reference format.
//
// A kms.json entry:
//
//	{
//	  "id": "hsm", "type": "pkcs11", "description": "Primary HSM",
//	  "library": "/usr/lib/softhsm/libsofthsm2.so",
//	  "slot": "kmsgate",            // token label, or an index: 0 / "0"
//	  "pin": "${HSM_PIN}",
//	  "readOnly": false,            // optional: read-only sessions, no create/delete
//	  "poolSize": 8,                // optional: default 2×GOMAXPROCS (min 4), capped by the token
//	  "acquireTimeout": "2s",       // optional: wait bound for a free session (then 503)
//	  "canaryInterval": "30s"       // optional: periodic canary signature
//	}
//
// Keys: CKA_LABEL is the kid and a random 16-byte CKA_ID ties the pair; KeyRef.ExternalID is
// the hex CKA_ID, so tenants that reuse a kid never share a token object.
package pkcs11

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"time"

	"github.com/kmsgate/kmsgate/hsm"
	"github.com/kmsgate/kmsgate/internal/errs"
	"github.com/kmsgate/kmsgate/providers"
)

// Config is a pkcs11 entry of kms.json.
type Config struct {
	providers.Common
	Library string `json:"library"`
	// Slot is a number (index into the slots holding a token), a string of digits (same) or a
	// token label.
	Slot SlotRef `json:"slot"`
	// PIN is the user PIN with placeholders already expanded. It is never logged.
	PIN            string   `json:"pin" secret:"true"`
	ReadOnly       bool     `json:"readOnly"`
	PoolSize       int      `json:"poolSize"`
	AcquireTimeout Duration `json:"acquireTimeout"`
	CanaryInterval Duration `json:"canaryInterval"`
}

// SlotRef accepts a JSON number or string.
type SlotRef string

// UnmarshalJSON implements json.Unmarshaler.
func (r *SlotRef) UnmarshalJSON(b []byte) error {
	b = bytes.TrimSpace(b)
	if len(b) > 0 && b[0] == '"' {
		var s string
		if err := json.Unmarshal(b, &s); err != nil {
			return err
		}
		*r = SlotRef(s)
		return nil
	}
	var n json.Number
	if err := json.Unmarshal(b, &n); err != nil {
		return errors.New(`"slot" must be a slot index or a token label`)
	}
	i, err := strconv.Atoi(n.String())
	if err != nil || i < 0 {
		return fmt.Errorf(`"slot" index must be a non-negative integer, got %s`, n)
	}
	*r = SlotRef(strconv.Itoa(i))
	return nil
}

// Duration accepts a Go duration string ("2s", "150ms").
type Duration time.Duration

// UnmarshalJSON implements json.Unmarshaler.
func (d *Duration) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		return errors.New(`must be a duration string such as "2s"`)
	}
	v, err := time.ParseDuration(s)
	if err != nil {
		return fmt.Errorf("invalid duration %q: %w", s, err)
	}
	if v < 0 {
		return fmt.Errorf("duration %q must not be negative", s)
	}
	*d = Duration(v)
	return nil
}

// Provider is a providers.Provider backed by one PKCS#11 slot.
type Provider struct {
	providers.Base
	readOnly bool
	slot     *hsm.Slot
	log      *slog.Logger
}

var _ providers.Provider = (*Provider)(nil)

// ParseConfig decodes and validates a pkcs11 entry strictly. It never includes the PIN in an
// error.
func ParseConfig(cfg providers.Config) (Config, error) {
	var c Config
	if err := providers.DecodeStrict(cfg, &c); err != nil {
		return c, err
	}
	if strings.TrimSpace(c.Library) == "" {
		return c, fmt.Errorf("provider %q (type pkcs11): field \"library\" is required (path of the vendor's PKCS#11 module)", cfg.ID)
	}
	if strings.TrimSpace(string(c.Slot)) == "" {
		return c, fmt.Errorf("provider %q (type pkcs11): field \"slot\" is required (slot index or token label)", cfg.ID)
	}
	if c.PoolSize < 0 {
		return c, fmt.Errorf("provider %q (type pkcs11): field \"poolSize\" must be positive", cfg.ID)
	}
	return c, nil
}

// HSMConfig turns the entry into the hsm package's slot configuration.
func (c Config) HSMConfig(logger *slog.Logger) hsm.Config {
	return hsm.Config{Library: c.Library, Slot: string(c.Slot), PIN: c.PIN, ReadOnly: c.ReadOnly,
		PoolSize: c.PoolSize, AcquireTimeout: time.Duration(c.AcquireTimeout), CanaryInterval: time.Duration(c.CanaryInterval),
		Logger: logger}
}

// New builds the provider. Only configuration errors fail it: a missing library, absent token or
// wrong PIN yields a provider whose Health explains the fix while it keeps retrying.
func New(ctx context.Context, cfg providers.Config, logger *slog.Logger) (*Provider, error) {
	c, err := ParseConfig(cfg)
	if err != nil {
		return nil, err
	}
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	log := logger.With("provider", cfg.ID, "type", providers.TypePKCS11)
	slot, err := hsm.Open(ctx, c.HSMConfig(log))
	if err != nil {
		return nil, fmt.Errorf("provider %q (type pkcs11): %w", cfg.ID, err)
	}
	if err := slot.LastError(); err != nil {
		log.Error("pkcs11 provider is not ready; retrying in the background", "error", err)
	}
	desc := c.Description
	if desc == "" {
		desc = cfg.Description
	}
	return &Provider{Base: providers.NewBase(providers.TypePKCS11, cfg.ID, desc), readOnly: c.ReadOnly, slot: slot, log: log}, nil
}

// ID implements providers.Provider.

// Type implements providers.Provider.

// Description implements providers.Provider.

// Capabilities implements providers.Provider.
func (p *Provider) Capabilities() providers.Capabilities {
	return providers.Capabilities{CanCreate: !p.readOnly, CanImport: false, CanDelete: !p.readOnly,
		CanSignDigest: true, CanSignMessage: true, SupportedAlgs: []string{providers.ES256}, DefaultAlg: providers.ES256}
}

// fail classifies an hsm error into a provider error with a caller-safe message.
func (p *Provider) fail(op string, err error) error {
	var kind errs.Kind
	msg := "PKCS#11 operation failed"
	var oe *hsm.OpError
	switch {
	case errors.Is(err, hsm.ErrKeyNotFound):
		kind, msg = errs.NotFound, "key not found on the token"
	case errors.Is(err, hsm.ErrReadOnly):
		kind, msg = errs.Forbidden, "provider is readOnly: keys cannot be created or deleted"
	case errors.Is(err, hsm.ErrPoolExhausted):
		kind, msg = errs.Unavailable, "all PKCS#11 sessions are busy; retry later"
	case errors.Is(err, hsm.ErrSlotDown), errors.Is(err, hsm.ErrClosed):
		kind, msg = errs.Unavailable, "PKCS#11 slot unavailable (recovering in the background); retry later"
	case errors.Is(err, context.DeadlineExceeded), errors.Is(err, context.Canceled):
		kind, msg = errs.Unavailable, "request deadline reached before the token answered"
	case errors.As(err, &oe):
		switch oe.Class() {
		case hsm.ClassFatal:
			kind, msg = errs.Unavailable, "PKCS#11 token failed ("+hsm.CKRName(oe.RV)+"); the slot is being rebuilt, retry later"
		case hsm.ClassCaller:
			kind, msg = errs.BadInput, "the token refused the request ("+hsm.CKRName(oe.RV)+")"
		case hsm.ClassStaleHandle:
			kind, msg = errs.NotFound, "key handle is no longer valid on the token"
		default:
			kind, msg = errs.Internal, "PKCS#11 call failed ("+hsm.CKRName(oe.RV)+")"
		}
	case errors.Is(err, hsm.ErrNotP256):
		kind, msg = errs.NotSupported, "the key is not a P-256 key; the pkcs11 provider supports ES256 only"
	case errors.Is(err, hsm.ErrBadKey):
		kind, msg = errs.Internal, "the token returned an invalid P-256 public key"
	}
	e := errs.Wrap(kind, err, msg)
	e.Provider, e.Op = p.ID(), op
	if kind == errs.Unavailable {
		e.RetryAfter = time.Second
	}
	return e
}

// Generate implements providers.Provider: a P-256 pair is generated inside the token. The
// returned ExternalID is the hex CKA_ID, unique even when two tenants use the same kid.
func (p *Provider) Generate(ctx context.Context, spec providers.KeySpec) (providers.KeyRef, error) {
	alg := spec.Alg
	if alg == "" {
		alg = providers.ES256
	}
	if spec.KID == "" {
		return providers.KeyRef{}, errs.Errorf(errs.BadInput, "kid is required")
	}
	if p.readOnly {
		return providers.KeyRef{}, p.fail("generate", hsm.ErrReadOnly)
	}
	var k hsm.Key
	var pub *ecdsa.PublicKey
	var err error
	if spec.ExternalID != "" {
		if !providers.ValidHint(spec.ExternalID) {
			return providers.KeyRef{}, errs.Errorf(errs.BadInput, "invalid key id hint")
		}
		id, _ := hex.DecodeString(spec.ExternalID)
		k, pub, err = p.slot.GenerateWithID(ctx, spec.KID, id)
	} else {
		k, pub, err = p.slot.Generate(ctx, spec.KID)
	}
	if err != nil {
		return providers.KeyRef{}, p.fail("generate", err)
	}
	return providers.KeyRef{ProviderID: p.ID(), Tenant: spec.Tenant, KID: spec.KID, Alg: alg, ExternalID: k.ID, Public: pub}, nil
}

// ExternalIDFor implements providers.Namer: a hinted key's CKA_ID is the hint, and ExternalID is
// the hex CKA_ID.
func (p *Provider) ExternalIDFor(spec providers.KeySpec) (string, error) {
	if spec.ExternalID == "" {
		return "", nil
	}
	if !providers.ValidHint(spec.ExternalID) {
		return "", errs.Errorf(errs.BadInput, "invalid key id hint")
	}
	return spec.ExternalID, nil
}

// Import implements providers.Provider: never supported, keys are born in the HSM.
func (p *Provider) Import(context.Context, providers.KeySpec, *ecdsa.PrivateKey) (providers.KeyRef, error) {
	e := errs.Errorf(errs.NotSupported, "pkcs11 keys must be generated inside the HSM; import is not supported")
	e.Provider, e.Op = p.ID(), "import"
	return providers.KeyRef{}, e
}

func keyOf(ref providers.KeyRef) hsm.Key { return hsm.Key{ID: ref.ExternalID, Label: ref.KID} }

// Delete implements providers.Provider; deleting a missing key succeeds.
func (p *Provider) Delete(ctx context.Context, ref providers.KeyRef) error {
	if p.readOnly {
		return p.fail("delete", hsm.ErrReadOnly)
	}
	if err := p.slot.Delete(ctx, keyOf(ref)); err != nil {
		return p.fail("delete", err)
	}
	return nil
}

// PublicKey implements providers.Provider.
func (p *Provider) PublicKey(ctx context.Context, ref providers.KeyRef) (*ecdsa.PublicKey, error) {
	pub, err := p.slot.PublicKey(ctx, keyOf(ref))
	if err != nil {
		return nil, p.fail("public key", err)
	}
	return pub, nil
}

// SignMessage implements providers.Provider: SHA-256 in Go, CKM_ECDSA in the token.
func (p *Provider) SignMessage(ctx context.Context, ref providers.KeyRef, alg string, msg []byte) ([]byte, error) {
	d := sha256.Sum256(msg)
	return p.sign(ctx, ref, d[:])
}

// SignDigest implements providers.Provider.
func (p *Provider) SignDigest(ctx context.Context, ref providers.KeyRef, alg string, digest []byte) ([]byte, error) {
	if len(digest) != sha256.Size {
		return nil, errs.Errorf(errs.BadInput, "ES256 digest must be 32 bytes, got %d", len(digest))
	}
	return p.sign(ctx, ref, digest)
}

func (p *Provider) sign(ctx context.Context, ref providers.KeyRef, digest []byte) ([]byte, error) {
	if ref.Alg != "" && ref.Alg != providers.ES256 {
		return nil, &errs.Error{Kind: errs.NotSupported, Provider: p.ID(), Op: "sign", Code: "unsupported_alg",
			Msg: fmt.Sprintf("key %q has algorithm %q; only ES256 keys can sign", ref.KID, ref.Alg)}
	}
	sig, err := p.slot.Sign(ctx, keyOf(ref), digest)
	if err != nil {
		return nil, p.fail("sign", err)
	}
	return sig, nil
}

// Health implements providers.Provider.
func (p *Provider) Health(ctx context.Context) providers.Health {
	start := time.Now()
	h := p.slot.Health(ctx)
	return providers.Health{OK: h.OK, Error: h.Error, LatencyMs: time.Since(start).Milliseconds()}
}

// Stats returns the slot's counters for metrics; it makes no PKCS#11 call.
func (p *Provider) Stats() hsm.Stats { return p.slot.Stats() }

// SlotInfo describes the resolved slot and token (zero until the slot first came up).
func (p *Provider) SlotInfo() hsm.SlotInfo { return p.slot.Stats().Slot }

// Canary signs with the slot's throw-away session key and verifies the signature (doctor).
func (p *Provider) Canary(ctx context.Context) error { return p.slot.Canary(ctx) }

// LastError is why the slot is down, or nil.
func (p *Provider) LastError() error { return p.slot.LastError() }

// Slot exposes the underlying slot for tests and diagnostics.
func (p *Provider) Slot() *hsm.Slot { return p.slot }

// Close implements providers.Provider.
func (p *Provider) Close() error { return p.slot.Close() }

// SecretFields lists the config fields (JSON names) that hold secrets, for redacted output.
func SecretFields() []string { return providers.SecretFields(Config{}) }
