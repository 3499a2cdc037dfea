package keys

import (
	"context"
	"crypto/ecdsa"
	"crypto/sha256"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/kmsgate/kmsgate/appliance/store"
	"github.com/kmsgate/kmsgate/internal/errs"
	"github.com/kmsgate/kmsgate/internal/keyutil"
	"github.com/kmsgate/kmsgate/providers"
)

// Lifecycle is the one key lifecycle both API faces use: it creates, imports, deletes and signs
// with keys in their providers and makes sure that a key whose reference could not be persisted
// does not stay behind in the backend, not even after a crash (see intents.go), and that a tenant
// stays within its key quota. Checks every provider call needs (algorithm, digest length,
// signature shape) and metrics are done by the provider decorator, not here.
type Lifecycle struct {
	log     *slog.Logger
	st      TxStore
	owner   string
	maxKeys int
	now     func() time.Time
	stripes [64]sync.Mutex
}

// LifecycleConfig configures a lifecycle.
type LifecycleConfig struct {
	// Store keeps create intents, owned-key records and per-tenant counts. Without one the
	// lifecycle neither survives crashes nor enforces the quota (tools and unit tests).
	Store TxStore
	Log   *slog.Logger
	// Owner identifies this process in the intents it writes (diagnostics; a sweep decides by age).
	Owner string
	// MaxKeysPerTenant is the per-tenant key quota across both faces (0: DefaultMaxKeysPerTenant;
	// negative: no quota).
	MaxKeysPerTenant int
	// Now is the clock (default time.Now).
	Now func() time.Time
}

// NewLifecycle builds a lifecycle without a store; log receives cleanup failures.
func NewLifecycle(log *slog.Logger) *Lifecycle { return NewLifecycleWith(LifecycleConfig{Log: log}) }

// NewLifecycleWith builds a lifecycle from c.
func NewLifecycleWith(c LifecycleConfig) *Lifecycle {
	l := &Lifecycle{log: c.Log, st: c.Store, owner: c.Owner, maxKeys: c.MaxKeysPerTenant, now: c.Now}
	if l.log == nil {
		l.log = slog.New(slog.DiscardHandler)
	}
	if l.maxKeys == 0 {
		l.maxKeys = DefaultMaxKeysPerTenant
	}
	if l.now == nil {
		l.now = time.Now
	}
	if l.owner == "" {
		l.owner, _ = newIntentID()
	}
	return l
}

// Batch tracks the keys created during one operation, so that a failure before the reference is
// persisted deletes them again: a failed create, import or rotation must not leak keys.
type Batch struct {
	l       *Lifecycle
	created []createdKey
}

type createdKey struct {
	prov   providers.Provider
	ref    providers.KeyRef
	intent *Intent // nil without a store
}

// Begin starts a batch.
func (l *Lifecycle) Begin() *Batch { return &Batch{l: l} }

// Generate creates a key in prov and tracks it for rollback. The tenant's quota is checked first.
func (b *Batch) Generate(ctx context.Context, prov providers.Provider, spec providers.KeySpec) (providers.KeyRef, error) {
	return b.create(ctx, prov, spec, func(spec providers.KeySpec) (providers.KeyRef, error) {
		return prov.Generate(ctx, spec)
	})
}

// Import stores priv in prov and tracks the new key for rollback.
func (b *Batch) Import(ctx context.Context, prov providers.Provider, spec providers.KeySpec, priv *ecdsa.PrivateKey) (providers.KeyRef, error) {
	return b.create(ctx, prov, spec, func(spec providers.KeySpec) (providers.KeyRef, error) {
		return prov.Import(ctx, spec, priv)
	})
}

func (b *Batch) create(ctx context.Context, prov providers.Provider, spec providers.KeySpec,
	call func(providers.KeySpec) (providers.KeyRef, error)) (providers.KeyRef, error) {
	in, err := b.l.reserve(ctx, prov, &spec)
	if err != nil {
		return providers.KeyRef{}, err
	}
	ref, err := call(spec)
	if err != nil {
		b.l.abandon(prov, in, err)
		return ref, err
	}
	b.l.learned(ctx, in, ref)
	b.created = append(b.created, createdKey{prov, ref, in})
	return ref, nil
}

// Transactional reports whether CommitTx can be used: the lifecycle keeps its bookkeeping in a
// store that callers can write their references to in the same transaction.
func (b *Batch) Transactional() bool { return b.l.st != nil }

// CommitTx writes the batch's references: persist's writes, an owned record per key and the
// removal of the keys' intents land in one store transaction, so a crash leaves either the
// reference or the intent (which the sweep resolves), never a key nothing points to. When it
// fails, every key of the batch is deleted again and the error is returned. persist may run more
// than once (the store retries conflicting transactions).
func (b *Batch) CommitTx(ctx context.Context, persist func(tx *store.Txn) error) error {
	if b.l.st == nil {
		return errors.New("key lifecycle has no store for a transactional commit")
	}
	err := b.l.st.Update(ctx, func(tx *store.Txn) error {
		err := b.confirm(tx, func(in *Intent) error { return tx.Delete(intentKey(in.Tenant, in.ID)) })
		if err != nil {
			return err
		}
		return persist(tx)
	})
	if err != nil {
		b.Rollback()
		return err
	}
	b.created = nil
	return nil
}

// Commit runs persist, which writes the references of the batch's keys outside the lifecycle's
// store transaction; when it fails, every key of the batch is deleted again and persist's error is
// returned. Before persist runs, the keys' owned records are written and their intents marked
// confirming in one transaction: a crash before that lets the sweep delete the keys; a crash
// after it keeps them, since the reference may have been written (at worst a key that counts
// against the quota and that no record uses; the sweep logs it). CommitTx has no such window.
func (b *Batch) Commit(persist func() error) error {
	if b.l.st != nil && len(b.created) > 0 {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		err := b.l.st.Update(ctx, func(tx *store.Txn) error {
			return b.confirm(tx, func(in *Intent) error {
				next := *in
				next.State = IntentConfirming
				return tx.Put(intentKey(next.Tenant, next.ID), &next)
			})
		})
		if err != nil {
			b.Rollback()
			return fmt.Errorf("confirm key intents: %w", err)
		}
	}
	if err := persist(); err != nil {
		b.Rollback()
		return err
	}
	for _, k := range b.created {
		if k.intent != nil {
			b.l.settle(nil, k.intent.Tenant, k.intent.ID, false)
		}
	}
	b.created = nil
	return nil
}

// confirm checks, inside tx, that no sweep has claimed the intents of the batch's keys, writes
// each key's owned record, and hands each intent to settle (delete it, or mark it confirming).
func (b *Batch) confirm(tx *store.Txn, settle func(in *Intent) error) error {
	for _, k := range b.created {
		if k.intent == nil {
			continue
		}
		if err := checkIntent(tx, k.intent); err != nil {
			return err
		}
		if err := b.l.confirmOwned(tx, k.ref); err != nil {
			return err
		}
		if err := settle(k.intent); err != nil {
			return err
		}
	}
	return nil
}

// Rollback deletes the batch's keys from their backends (best effort, logged) and their
// bookkeeping; a key whose delete failed keeps its intent, so the sweep retries it.
func (b *Batch) Rollback() {
	for _, k := range b.created {
		err := b.l.cleanup(k.prov, k.ref)
		if k.intent != nil {
			b.l.settle(&k.ref, k.intent.Tenant, k.intent.ID, err != nil)
		}
	}
	b.created = nil
}

// Generate creates one key and persists its reference with persist, in the same store
// transaction as the lifecycle's bookkeeping; if persist fails, the key is deleted again.
func (l *Lifecycle) Generate(ctx context.Context, prov providers.Provider, spec providers.KeySpec,
	persist func(*store.Txn, providers.KeyRef) error) (providers.KeyRef, error) {
	b := l.Begin()
	ref, err := b.Generate(ctx, prov, spec)
	if err != nil {
		return ref, err
	}
	return ref, b.CommitTx(ctx, func(tx *store.Txn) error { return persist(tx, ref) })
}

// Import is Generate for an existing private key.
func (l *Lifecycle) Import(ctx context.Context, prov providers.Provider, spec providers.KeySpec, priv *ecdsa.PrivateKey,
	persist func(*store.Txn, providers.KeyRef) error) (providers.KeyRef, error) {
	b := l.Begin()
	ref, err := b.Import(ctx, prov, spec, priv)
	if err != nil {
		return ref, err
	}
	return ref, b.CommitTx(ctx, func(tx *store.Txn) error { return persist(tx, ref) })
}

// Delete removes a key from its backend. A provider that cannot delete keys leaves it there
// (logged); a key that is already gone is not an error. Unless the backend failed transiently
// (the caller keeps the reference and retries), the key stops counting against the quota.
func (l *Lifecycle) Delete(ctx context.Context, prov providers.Provider, ref providers.KeyRef) error {
	if !prov.Capabilities().CanDelete {
		l.log.Info("provider cannot delete keys; key left in the backend", "provider", prov.ID(), "tenant", ref.Tenant,
			"key_id", ref.KID)
		l.Forget(ref)
		return nil
	}
	if err := prov.Delete(ctx, ref); err != nil && !errors.Is(err, errs.NotFound) {
		if k := errs.KindOf(err); k != errs.Unavailable && k != errs.Throttled {
			l.Forget(ref)
		}
		return err
	}
	l.Forget(ref)
	return nil
}

// deleteDetached deletes a key detached from the request context (a cancelled request must
// still clean up).
func (l *Lifecycle) deleteDetached(prov providers.Provider, ref providers.KeyRef) error {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if !prov.Capabilities().CanDelete {
		return nil
	}
	if err := prov.Delete(ctx, ref); err != nil && !errors.Is(err, errs.NotFound) {
		return err
	}
	return nil
}

// cleanup deletes a key no reference points to, detached from the request context, logging
// failures; it drops the key's owned record.
func (l *Lifecycle) cleanup(prov providers.Provider, ref providers.KeyRef) error {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	err := l.Delete(ctx, prov, ref)
	if err != nil {
		l.log.Warn("could not delete a backend key after a failed operation", "provider", prov.ID(),
			"tenant", ref.Tenant, "key_id", ref.KID, "error", err)
	}
	return err
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
