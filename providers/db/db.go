// Package db is the built-in provider: P-256 keys generated or imported in process and kept sealed
// (AES-256-GCM under the master key, bound to tenant and kid) in the embedded store, in a namespace
// of their own. Like every other backend it owns its keys: a KeyRef carries only the key's id, and
// deleting the key destroys the sealed record. It is the default when there is no kms.json.
package db

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"log/slog"
	"strings"
	"sync"

	"github.com/kmsgate/kmsgate/internal/errs"
	"github.com/kmsgate/kmsgate/internal/keyutil"
	"github.com/kmsgate/kmsgate/providers"
)

// Sealer encrypts key material bound to associated data; appliance/seal implements it.
type Sealer interface {
	Seal(plaintext, aad []byte) ([]byte, error)
	Open(sealed, aad []byte) ([]byte, error)
}

// AADFunc builds the associated data for (tenant, kid).
type AADFunc func(tenant, kid string) []byte

// KeyStore persists sealed keys; appliance/store adapts to it. Load reports found=false for a
// missing key. Writes must be durable before they return.
type KeyStore interface {
	Load(ctx context.Context, id string) (sealed []byte, found bool, err error)
	Save(ctx context.Context, id string, sealed []byte) error
	Remove(ctx context.Context, id string) error
}

// Provider is the db provider.
type Provider struct {
	providers.Base
	sealer Sealer
	aad    AADFunc
	keys   KeyStore

	// Unsealed keys by key id. An id is random and never reused, so the cache cannot hand out a
	// stale key; it spares the hot path a store read, AES-GCM and scalar decoding.
	mu    sync.RWMutex
	cache map[string]*ecdsa.PrivateKey
}

type config struct {
	providers.Common
}

// New builds a db provider from its kms.json entry.
func New(cfg providers.Config, sealer Sealer, aad AADFunc, keys KeyStore) (*Provider, error) {
	var c config
	if err := providers.DecodeStrict(cfg, &c); err != nil {
		return nil, err
	}
	return &Provider{Base: providers.NewBase(providers.TypeDB, cfg.ID, cfg.Description), sealer: sealer, aad: aad, keys: keys,
		cache: make(map[string]*ecdsa.PrivateKey)}, nil
}

// Factory adapts New to the registry.
func Factory(sealer Sealer, aad AADFunc, keys KeyStore, _ *slog.Logger) providers.Factory {
	return func(_ context.Context, cfg providers.Config) (providers.Provider, error) {
		return New(cfg, sealer, aad, keys)
	}
}

func (p *Provider) Capabilities() providers.Capabilities {
	return providers.Capabilities{CanCreate: true, CanImport: true, CanDelete: true, CanSignDigest: true,
		CanSignMessage: true, SupportedAlgs: []string{providers.ES256}, DefaultAlg: providers.ES256}
}

func (p *Provider) Generate(ctx context.Context, spec providers.KeySpec) (providers.KeyRef, error) {
	priv, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return providers.KeyRef{}, errs.Wrap(errs.Internal, err, "generate key")
	}
	return p.store(ctx, spec, priv)
}

func (p *Provider) Import(ctx context.Context, spec providers.KeySpec, priv *ecdsa.PrivateKey) (providers.KeyRef, error) {
	if priv == nil || priv.Curve != elliptic.P256() {
		return providers.KeyRef{}, errs.Errorf(errs.BadInput, "only P-256 private keys can be imported")
	}
	return p.store(ctx, spec, priv)
}

// ExternalIDFor implements providers.Namer: a hinted key is saved under the hint itself.
func (p *Provider) ExternalIDFor(spec providers.KeySpec) (string, error) {
	if spec.ExternalID == "" {
		return "", nil
	}
	if !providers.ValidHint(spec.ExternalID) {
		return "", errs.Errorf(errs.BadInput, "invalid key id hint")
	}
	return spec.ExternalID, nil
}

// store seals priv to (tenant, kid) and saves it under the hint or a fresh random id, so an import
// over an existing kid never overwrites the key that the current reference still points to.
func (p *Provider) store(ctx context.Context, spec providers.KeySpec, priv *ecdsa.PrivateKey) (providers.KeyRef, error) {
	// Bytes may return the buffer of crypto/ecdsa's internal copy of the key (Go 1.26 does), so
	// it is not ours to clear: clearing it zeroed the caller's key material.
	d, err := priv.Bytes()
	if err != nil {
		return providers.KeyRef{}, errs.Wrap(errs.Internal, err, "encode key")
	}
	sealed, err := p.sealer.Seal(d, p.aad(spec.Tenant, spec.KID))
	if err != nil {
		return providers.KeyRef{}, errs.Wrap(errs.Internal, err, "seal key")
	}
	id, err := p.ExternalIDFor(spec)
	if err != nil {
		return providers.KeyRef{}, err
	}
	if id == "" {
		var idb [16]byte
		if _, err := rand.Read(idb[:]); err != nil {
			return providers.KeyRef{}, errs.Wrap(errs.Internal, err, "key id")
		}
		id = hex.EncodeToString(idb[:])
	}
	if err := p.keys.Save(ctx, id, sealed); err != nil {
		return providers.KeyRef{}, errs.Wrap(errs.Internal, err, "store sealed key")
	}
	alg := spec.Alg
	if alg == "" {
		alg = providers.ES256
	}
	return providers.KeyRef{ProviderID: p.ID(), Tenant: spec.Tenant, KID: spec.KID, Alg: alg,
		Public: &priv.PublicKey, ExternalID: id}, nil
}

// Delete destroys the sealed key. Deleting a key that is already gone succeeds.
func (p *Provider) Delete(ctx context.Context, ref providers.KeyRef) error {
	p.mu.Lock()
	delete(p.cache, ref.ExternalID)
	p.mu.Unlock()
	if ref.ExternalID == "" {
		return nil
	}
	if err := p.keys.Remove(ctx, ref.ExternalID); err != nil {
		return errs.Wrap(errs.Internal, err, "delete sealed key")
	}
	return nil
}

func (p *Provider) PublicKey(ctx context.Context, ref providers.KeyRef) (*ecdsa.PublicKey, error) {
	k, err := p.key(ctx, ref)
	if err != nil {
		return nil, err
	}
	return &k.PublicKey, nil
}

func (p *Provider) key(ctx context.Context, ref providers.KeyRef) (*ecdsa.PrivateKey, error) {
	p.mu.RLock()
	k, ok := p.cache[ref.ExternalID]
	p.mu.RUnlock()
	if ok {
		return k, nil
	}
	sealed, found, err := p.keys.Load(ctx, ref.ExternalID)
	if err != nil {
		return nil, errs.Wrap(errs.Internal, err, "load sealed key")
	}
	if !found || ref.ExternalID == "" {
		return nil, errs.Errorf(errs.NotFound, "key %q not found in provider %s", ref.KID, p.ID())
	}
	d, err := p.sealer.Open(sealed, p.aad(ref.Tenant, ref.KID))
	if err != nil {
		return nil, errs.Wrap(errs.Internal, err, "open sealed key")
	}
	k, err = ecdsa.ParseRawPrivateKey(elliptic.P256(), d)
	clear(d)
	if err != nil {
		return nil, errs.Wrap(errs.Internal, err, "decode sealed key")
	}
	p.mu.Lock()
	p.cache[strings.Clone(ref.ExternalID)] = k
	p.mu.Unlock()
	return k, nil
}

func (p *Provider) SignMessage(ctx context.Context, ref providers.KeyRef, alg string, msg []byte) ([]byte, error) {
	d := sha256.Sum256(msg)
	return p.SignDigest(ctx, ref, alg, d[:])
}

func (p *Provider) SignDigest(ctx context.Context, ref providers.KeyRef, alg string, digest []byte) ([]byte, error) {
	if len(digest) != sha256.Size {
		return nil, errs.Errorf(errs.BadInput, "digest must be %d bytes for ES256, got %d", sha256.Size, len(digest))
	}
	k, err := p.key(ctx, ref)
	if err != nil {
		return nil, err
	}
	der, err := ecdsa.SignASN1(rand.Reader, k, digest)
	if err != nil {
		return nil, errs.Wrap(errs.Internal, err, "sign")
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
