// Package db is the built-in provider: P-256 keys generated or imported in process and kept sealed
// (AES-256-GCM under the master key) in the KeyRef's Material, which the appliance stores in
// Badger. It is the default when there is no kms.json.
package db

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"log/slog"
	"sync"

	"github.com/kmsgate/kmsgate/providers"
	"github.com/kmsgate/kmsgate/providers/keyutil"
)

// Sealer encrypts key material bound to associated data; appliance/seal implements it.
type Sealer interface {
	Seal(plaintext, aad []byte) ([]byte, error)
	Open(sealed, aad []byte) ([]byte, error)
}

// AADFunc builds the associated data for (tenant, kid).
type AADFunc func(tenant, kid string) []byte

// Provider is the db provider.
type Provider struct {
	id, desc string
	sealer   Sealer
	aad      AADFunc

	// Unsealed keys by sealed blob: a blob is unique per key (random nonce) and immutable, so the
	// cache can never hand out a stale key, and the hot path skips AES-GCM and scalar decoding.
	mu    sync.RWMutex
	cache map[string]*ecdsa.PrivateKey
}

type config struct {
	providers.Common
}

// New builds a db provider from its kms.json entry.
func New(cfg providers.Config, sealer Sealer, aad AADFunc) (*Provider, error) {
	var c config
	if err := providers.DecodeStrict(cfg, &c); err != nil {
		return nil, err
	}
	return &Provider{id: cfg.ID, desc: cfg.Description, sealer: sealer, aad: aad,
		cache: make(map[string]*ecdsa.PrivateKey)}, nil
}

// Factory adapts New to the registry.
func Factory(sealer Sealer, aad AADFunc, _ *slog.Logger) providers.Factory {
	return func(_ context.Context, cfg providers.Config) (providers.Provider, error) {
		return New(cfg, sealer, aad)
	}
}

func (p *Provider) ID() string          { return p.id }
func (p *Provider) Type() string        { return providers.TypeDB }
func (p *Provider) Description() string { return p.desc }

func (p *Provider) Capabilities() providers.Capabilities {
	return providers.Capabilities{CanCreate: true, CanImport: true, CanDelete: true, CanSignDigest: true,
		CanSignMessage: true, SupportedAlgs: []string{providers.ES256}, DefaultAlg: providers.ES256}
}

func checkAlg(alg string) error {
	if alg != providers.ES256 {
		return providers.Errorf(providers.KindNotSupported, "algorithm %q is not supported (supported: ES256)", alg).
			WithCode("unsupported_alg")
	}
	return nil
}

func (p *Provider) Generate(ctx context.Context, spec providers.KeySpec) (providers.KeyRef, error) {
	if err := checkAlg(spec.Alg); err != nil {
		return providers.KeyRef{}, err
	}
	priv, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return providers.KeyRef{}, providers.Wrap(providers.KindInternal, err, "generate key")
	}
	return p.seal(spec, priv)
}

func (p *Provider) Import(ctx context.Context, spec providers.KeySpec, priv *ecdsa.PrivateKey) (providers.KeyRef, error) {
	if err := checkAlg(spec.Alg); err != nil {
		return providers.KeyRef{}, err
	}
	if priv == nil || priv.Curve != elliptic.P256() {
		return providers.KeyRef{}, providers.Errorf(providers.KindBadInput, "only P-256 private keys can be imported")
	}
	return p.seal(spec, priv)
}

func (p *Provider) seal(spec providers.KeySpec, priv *ecdsa.PrivateKey) (providers.KeyRef, error) {
	d, err := priv.Bytes()
	if err != nil {
		return providers.KeyRef{}, providers.Wrap(providers.KindInternal, err, "encode key")
	}
	sealed, err := p.sealer.Seal(d, p.aad(spec.Tenant, spec.KID))
	clear(d)
	if err != nil {
		return providers.KeyRef{}, providers.Wrap(providers.KindInternal, err, "seal key")
	}
	return providers.KeyRef{ProviderID: p.id, Tenant: spec.Tenant, KID: spec.KID, Alg: spec.Alg,
		Public: &priv.PublicKey, Material: sealed}, nil
}

// Delete drops the cached key. The sealed material lives in the appliance's record, which the
// caller deletes; there is nothing else to destroy.
func (p *Provider) Delete(ctx context.Context, ref providers.KeyRef) error {
	p.mu.Lock()
	delete(p.cache, string(ref.Material))
	p.mu.Unlock()
	return nil
}

func (p *Provider) PublicKey(ctx context.Context, ref providers.KeyRef) (*ecdsa.PublicKey, error) {
	k, err := p.key(ref)
	if err != nil {
		return nil, err
	}
	return &k.PublicKey, nil
}

func (p *Provider) key(ref providers.KeyRef) (*ecdsa.PrivateKey, error) {
	p.mu.RLock()
	k, ok := p.cache[string(ref.Material)]
	p.mu.RUnlock()
	if ok {
		return k, nil
	}
	if len(ref.Material) == 0 {
		return nil, providers.Errorf(providers.KindNotFound, "key %q has no material in this provider", ref.KID)
	}
	d, err := p.sealer.Open(ref.Material, p.aad(ref.Tenant, ref.KID))
	if err != nil {
		return nil, providers.Wrap(providers.KindInternal, err, "open sealed key")
	}
	k, err = ecdsa.ParseRawPrivateKey(elliptic.P256(), d)
	clear(d)
	if err != nil {
		return nil, providers.Wrap(providers.KindInternal, err, "decode sealed key")
	}
	p.mu.Lock()
	p.cache[string(ref.Material)] = k
	p.mu.Unlock()
	return k, nil
}

func (p *Provider) SignMessage(ctx context.Context, ref providers.KeyRef, alg string, msg []byte) ([]byte, error) {
	d := sha256.Sum256(msg)
	return p.SignDigest(ctx, ref, alg, d[:])
}

func (p *Provider) SignDigest(ctx context.Context, ref providers.KeyRef, alg string, digest []byte) ([]byte, error) {
	if err := checkAlg(alg); err != nil {
		return nil, err
	}
	if len(digest) != sha256.Size {
		return nil, providers.Errorf(providers.KindBadInput, "digest must be %d bytes for ES256, got %d", sha256.Size, len(digest))
	}
	k, err := p.key(ref)
	if err != nil {
		return nil, err
	}
	der, err := ecdsa.SignASN1(rand.Reader, k, digest)
	if err != nil {
		return nil, providers.Wrap(providers.KindInternal, err, "sign")
	}
	return keyutil.DERToRaw(der, 32)
}

func (p *Provider) Health(ctx context.Context) providers.Health { return providers.Health{OK: true} }

func (p *Provider) Close() error {
	p.mu.Lock()
	clear(p.cache)
	p.mu.Unlock()
	return nil
}

var _ providers.Provider = (*Provider)(nil)
