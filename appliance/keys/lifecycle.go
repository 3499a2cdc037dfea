package keys

import (
	"context"
	"crypto/ecdsa"
	"crypto/sha256"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/kmsgate/kmsgate/appliance/store"
	"github.com/kmsgate/kmsgate/internal/errs"
	"github.com/kmsgate/kmsgate/internal/keyutil"
	"github.com/kmsgate/kmsgate/providers"
)

// Lifecycle is the one key lifecycle both API faces use: it creates, imports, deletes and signs
// with keys in their providers and makes sure that a key whose reference could not be persisted
// does not stay behind in the backend. Checks every provider call needs (algorithm, digest
// length, signature shape) and metrics are done by the provider decorator, not here.
type Lifecycle struct {
	log *slog.Logger
}

// NewLifecycle builds the lifecycle; log receives cleanup failures.
func NewLifecycle(log *slog.Logger) *Lifecycle {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Lifecycle{log: log}
}

// Batch tracks the keys created during one operation, so that a failure before the reference is
// persisted deletes them again: a failed create, import or rotation must not leak keys.
type Batch struct {
	l       *Lifecycle
	created []createdKey
}

type createdKey struct {
	prov providers.Provider
	ref  providers.KeyRef
}

// Begin starts a batch.
func (l *Lifecycle) Begin() *Batch { return &Batch{l: l} }

// Generate creates a key in prov and tracks it for rollback.
func (b *Batch) Generate(ctx context.Context, prov providers.Provider, spec providers.KeySpec) (providers.KeyRef, error) {
	ref, err := prov.Generate(ctx, spec)
	if err != nil {
		return ref, err
	}
	b.created = append(b.created, createdKey{prov, ref})
	return ref, nil
}

// Import stores priv in prov and tracks the new key for rollback.
func (b *Batch) Import(ctx context.Context, prov providers.Provider, spec providers.KeySpec, priv *ecdsa.PrivateKey) (providers.KeyRef, error) {
	ref, err := prov.Import(ctx, spec, priv)
	if err != nil {
		return ref, err
	}
	b.created = append(b.created, createdKey{prov, ref})
	return ref, nil
}

// Commit runs persist, which writes the references of the batch's keys; when it fails, every key
// of the batch is deleted again and persist's error is returned.
func (b *Batch) Commit(persist func() error) error {
	if err := persist(); err != nil {
		b.Rollback()
		return err
	}
	b.created = nil
	return nil
}

// Rollback deletes the batch's keys from their backends (best effort, logged).
func (b *Batch) Rollback() {
	for _, k := range b.created {
		b.l.cleanup(k.prov, k.ref)
	}
	b.created = nil
}

// Generate creates one key and persists its reference with persist; if persist fails, the key is
// deleted from the backend again.
func (l *Lifecycle) Generate(ctx context.Context, prov providers.Provider, spec providers.KeySpec,
	persist func(providers.KeyRef) error) (providers.KeyRef, error) {
	b := l.Begin()
	ref, err := b.Generate(ctx, prov, spec)
	if err != nil {
		return ref, err
	}
	return ref, b.Commit(func() error { return persist(ref) })
}

// Import is Generate for an existing private key.
func (l *Lifecycle) Import(ctx context.Context, prov providers.Provider, spec providers.KeySpec, priv *ecdsa.PrivateKey,
	persist func(providers.KeyRef) error) (providers.KeyRef, error) {
	b := l.Begin()
	ref, err := b.Import(ctx, prov, spec, priv)
	if err != nil {
		return ref, err
	}
	return ref, b.Commit(func() error { return persist(ref) })
}

// Delete removes a key from its backend. A provider that cannot delete keys leaves it there
// (logged); a key that is already gone is not an error.
func (l *Lifecycle) Delete(ctx context.Context, prov providers.Provider, ref providers.KeyRef) error {
	if !prov.Capabilities().CanDelete {
		l.log.Info("provider cannot delete keys; key left in the backend", "provider", prov.ID(), "tenant", ref.Tenant,
			"key_id", ref.KID)
		return nil
	}
	if err := prov.Delete(ctx, ref); err != nil && !errors.Is(err, errs.NotFound) {
		return err
	}
	return nil
}

// cleanup deletes a key no reference points to, detached from the request context (a cancelled
// request must still clean up), logging and never failing.
func (l *Lifecycle) cleanup(prov providers.Provider, ref providers.KeyRef) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := l.Delete(ctx, prov, ref); err != nil {
		l.log.Warn("could not delete a backend key after a failed operation", "provider", prov.ID(),
			"tenant", ref.Tenant, "key_id", ref.KID, "error", err)
	}
}

// Sign signs a message (isDigest false) or a SHA-256 digest and returns raw r‖s. caps are prov's
// capabilities (callers on the hot path cache them). A provider that signs digests only gets the
// message's SHA-256; a digest for a provider that signs whole messages only is refused with
// digest_not_supported, since the message cannot be recovered from it.
func (l *Lifecycle) Sign(ctx context.Context, prov providers.Provider, caps providers.Capabilities, ref providers.KeyRef,
	alg string, data []byte, isDigest bool) ([]byte, error) {
	switch {
	case isDigest && len(data) == providers.DigestSize && !caps.CanSignDigest:
		return nil, errs.Errorf(errs.NotSupported, "provider %s signs whole messages only; send data instead of digest",
			prov.ID()).WithCode("digest_not_supported")
	case isDigest:
		return prov.SignDigest(ctx, ref, alg, data)
	case !caps.CanSignMessage:
		d := sha256.Sum256(data)
		return prov.SignDigest(ctx, ref, alg, d[:])
	}
	return prov.SignMessage(ctx, ref, alg, data)
}

// PublicKey asks the backend for the key's public half.
func (l *Lifecycle) PublicKey(ctx context.Context, prov providers.Provider, ref providers.KeyRef) (*ecdsa.PublicKey, error) {
	return prov.PublicKey(ctx, ref)
}

// Persisted converts a provider reference into its persisted form; jwkAlg is the alg published in
// the public JWK (ECDH-ES for encryption keys).
func Persisted(ref providers.KeyRef, jwkAlg string) (store.KeyRef, error) {
	jwk, err := keyutil.PublicJWK(ref.Public, ref.KID, jwkAlg)
	if err != nil {
		return store.KeyRef{}, fmt.Errorf("provider returned an unusable public key: %w", err)
	}
	return store.KeyRef{Tenant: ref.Tenant, KID: ref.KID, ProviderID: ref.ProviderID, ExternalID: ref.ExternalID,
		Alg: ref.Alg, PublicJWK: jwk}, nil
}

// ProviderRef rebuilds the provider reference of a persisted key of tenant.
func ProviderRef(r store.KeyRef, tenant string) (providers.KeyRef, error) {
	pub, err := keyutil.ParsePublicJWK(r.PublicJWK)
	if err != nil {
		return providers.KeyRef{}, fmt.Errorf("stored key %q has an invalid public key: %w", r.KID, err)
	}
	return providers.KeyRef{ProviderID: r.ProviderID, Tenant: tenant, KID: r.KID, Alg: r.Alg,
		ExternalID: r.ExternalID, Public: pub}, nil
}
