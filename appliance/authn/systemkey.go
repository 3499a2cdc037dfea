// Package authn makes kmsgate an OAuth2 issuer for its own API: the system key that signs access
// tokens, the client-credentials token issuer and the verifier of those tokens.
package authn

import (
	"context"
	"crypto/ecdsa"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/kmsgate/kmsgate/appliance/keys"
	"github.com/kmsgate/kmsgate/appliance/store"
	"github.com/kmsgate/kmsgate/internal/keyutil"
	"github.com/kmsgate/kmsgate/providers"
)

// SystemTenant is the namespace the system key lives in inside its provider. It is not a valid
// tenant id (ids start with a letter or digit), so no tenant can reach, count or publish the key.
const SystemTenant = "_system"

// RecordKey is the store record naming the system key, shared by every replica.
var RecordKey = store.MetaKey("system-key")

// Record is the shared description of the system key: the key tokens are signed with and, after a
// rotation, the one before it, still published so that tokens it signed verify until they expire.
type Record struct {
	Active    store.KeyRef  `json:"active"`
	Previous  *store.KeyRef `json:"previous,omitempty"`
	UpdatedAt time.Time     `json:"updatedAt"`
}

// reloadEvery bounds how often an unknown kid may make a replica re-read the record, so that
// tokens with made-up kids cannot turn into a store-read flood.
const reloadEvery = time.Second

// SystemKeyConfig configures a SystemKey.
type SystemKeyConfig struct {
	Store     *store.Store
	Registry  keys.Registry
	Lifecycle *keys.Lifecycle
	// ProviderID holds new system keys (creation and rotation); an existing key stays where the
	// record says it is.
	ProviderID string
	Log        *slog.Logger
	Now        func() time.Time
}

// SystemKey is this replica's view of the system key record, with the providers it needs to sign.
type SystemKey struct {
	cfg SystemKeyConfig

	mu         sync.RWMutex
	active     *signingKey
	pubs       map[string]*ecdsa.PublicKey
	jwks       []keyutil.JWK
	lastReload time.Time
}

type signingKey struct {
	ref  providers.KeyRef
	prov providers.Provider
	caps providers.Capabilities
}

// NewSystemKey builds the system key manager; Ensure loads or creates the key.
func NewSystemKey(c SystemKeyConfig) *SystemKey {
	if c.Log == nil {
		c.Log = slog.New(slog.DiscardHandler)
	}
	if c.Now == nil {
		c.Now = time.Now
	}
	return &SystemKey{cfg: c, pubs: map[string]*ecdsa.PublicKey{}}
}

// ErrNoSystemKey answers a token request or verification before the system key exists (its
// provider was down at start-up and is still down).
var ErrNoSystemKey = errors.New("the system key is not available")

// Ensure loads the system key record, creating the key first when no replica has yet. Replicas
// starting together race on the record's creation: the loser deletes its own key and uses the
// winner's.
func (k *SystemKey) Ensure(ctx context.Context) error {
	err := k.Reload(ctx)
	if !errors.Is(err, ErrNoSystemKey) {
		return err
	}
	prov, err := k.cfg.Registry.Get(k.cfg.ProviderID)
	if err != nil {
		return fmt.Errorf("system key provider: %w", err)
	}
	_, err = k.create(ctx, prov, func(tx *store.Txn, ref store.KeyRef) error {
		return tx.Create(RecordKey, Record{Active: ref, UpdatedAt: k.cfg.Now().UTC()})
	})
	if err != nil && !errors.Is(err, store.ErrExists) {
		return fmt.Errorf("create the system key in provider %s: %w", prov.ID(), err)
	}
	return k.Reload(ctx)
}

// create generates a new system key in prov and persists it with persist in the lifecycle's
// transaction, so that a failed persist deletes the key again.
func (k *SystemKey) create(ctx context.Context, prov providers.Provider, persist func(*store.Txn, store.KeyRef) error) (store.KeyRef, error) {
	var b [6]byte
	if _, err := rand.Read(b[:]); err != nil {
		return store.KeyRef{}, err
	}
	kid := "kmsgate-" + k.cfg.Now().UTC().Format("20060102") + "-" + hex.EncodeToString(b[:])
	var out store.KeyRef
	_, err := k.cfg.Lifecycle.Generate(ctx, prov, providers.KeySpec{Tenant: SystemTenant, KID: kid, Alg: providers.ES256},
		func(tx *store.Txn, ref providers.KeyRef) error {
			r, err := keys.Persisted(ref, providers.ES256)
			if err != nil {
				return err
			}
			r.CreatedAt = k.cfg.Now().UTC()
			out = r
			return persist(tx, r)
		})
	return out, err
}

// Rotate creates a new system key that signs from now on; the active one becomes the previous
// one, still published and accepted, and the key before it is deleted. Tokens signed with that
// key are refused from then on, so rotate at most once per token lifetime.
func (k *SystemKey) Rotate(ctx context.Context) (kid string, err error) {
	prov, err := k.cfg.Registry.Get(k.cfg.ProviderID)
	if err != nil {
		return "", fmt.Errorf("system key provider: %w", err)
	}
	var dropped *store.KeyRef
	ref, err := k.create(ctx, prov, func(tx *store.Txn, ref store.KeyRef) error {
		var cur Record
		if err := tx.Get(RecordKey, &cur); err != nil {
			return err
		}
		dropped = cur.Previous
		prev := cur.Active
		return tx.Put(RecordKey, Record{Active: ref, Previous: &prev, UpdatedAt: k.cfg.Now().UTC()})
	})
	if err != nil {
		return "", err
	}
	if dropped != nil {
		if p, err := k.cfg.Registry.Get(dropped.ProviderID); err == nil {
			if pref, err := keys.ProviderRef(*dropped, SystemTenant); err == nil {
				if err := k.cfg.Lifecycle.Delete(ctx, p, pref); err != nil {
					k.cfg.Log.Warn("could not delete the rotated-out system key", "key_id", dropped.KID, "error", err)
				}
			}
		}
	}
	return ref.KID, k.Reload(ctx)
}

// Reload re-reads the record (another replica may have rotated the key).
func (k *SystemKey) Reload(ctx context.Context) error {
	var rec Record
	err := k.cfg.Store.Get(ctx, RecordKey, &rec)
	if errors.Is(err, store.ErrNotFound) {
		return ErrNoSystemKey
	}
	if err != nil {
		return fmt.Errorf("read the system key record: %w", err)
	}
	active, err := k.signer(rec.Active)
	if err != nil {
		return err
	}
	pubs := map[string]*ecdsa.PublicKey{rec.Active.KID: active.ref.Public}
	jwks := []keyutil.JWK{publishable(rec.Active.PublicJWK)}
	if rec.Previous != nil {
		pub, err := keyutil.ParsePublicJWK(rec.Previous.PublicJWK)
		if err != nil {
			return fmt.Errorf("the previous system key's public key: %w", err)
		}
		pubs[rec.Previous.KID] = pub
		jwks = append(jwks, publishable(rec.Previous.PublicJWK))
	}
	k.mu.Lock()
	k.active, k.pubs, k.jwks, k.lastReload = active, pubs, jwks, k.cfg.Now()
	k.mu.Unlock()
	return nil
}

func (k *SystemKey) signer(r store.KeyRef) (*signingKey, error) {
	prov, err := k.cfg.Registry.Get(r.ProviderID)
	if err != nil {
		return nil, fmt.Errorf("the system key's provider %q: %w", r.ProviderID, err)
	}
	if r.ProviderID != k.cfg.ProviderID {
		k.cfg.Log.Warn("the system key lives in another provider than the system key provider; rotate to move it",
			"provider", r.ProviderID, "system_key_provider", k.cfg.ProviderID)
	}
	ref, err := keys.ProviderRef(r, SystemTenant)
	if err != nil {
		return nil, err
	}
	return &signingKey{ref: ref, prov: prov, caps: prov.Capabilities()}, nil
}

func publishable(j keyutil.JWK) keyutil.JWK {
	j = j.Public()
	j.Alg, j.Use = providers.ES256, "sig"
	return j
}

// JWKS is the published key set: the active key and, after a rotation, the previous one.
func (k *SystemKey) JWKS() []keyutil.JWK {
	k.mu.RLock()
	defer k.mu.RUnlock()
	return k.jwks
}

// ActiveKID is the kid tokens are signed with now ("" before Ensure succeeded).
func (k *SystemKey) ActiveKID() string {
	k.mu.RLock()
	defer k.mu.RUnlock()
	if k.active == nil {
		return ""
	}
	return k.active.ref.KID
}

// ProviderID is the provider holding the active key ("" before Ensure succeeded).
func (k *SystemKey) ProviderID() string {
	k.mu.RLock()
	defer k.mu.RUnlock()
	if k.active == nil {
		return ""
	}
	return k.active.ref.ProviderID
}

// PublicKey returns the published key kid. An unknown kid re-reads the record first (at most once
// a second): another replica may have rotated.
func (k *SystemKey) PublicKey(ctx context.Context, kid string) (*ecdsa.PublicKey, bool) {
	k.mu.RLock()
	pub, ok := k.pubs[kid]
	stale := k.cfg.Now().Sub(k.lastReload) >= reloadEvery
	k.mu.RUnlock()
	if ok || !stale {
		return pub, ok
	}
	if err := k.Reload(ctx); err != nil {
		k.cfg.Log.Warn("could not re-read the system key record", "error", err)
		k.mu.Lock()
		k.lastReload = k.cfg.Now()
		k.mu.Unlock()
	}
	k.mu.RLock()
	defer k.mu.RUnlock()
	pub, ok = k.pubs[kid]
	return pub, ok
}

// Sign builds the message to sign for the active key's kid (a JWS signing input names it in its
// header) and signs it with that key in its provider, returning the message and the raw r‖s
// signature. Building and signing under one snapshot of the active key keeps a concurrent rotation
// from pairing a header with the wrong key.
func (k *SystemKey) Sign(ctx context.Context, build func(kid string) ([]byte, error)) (msg, sig []byte, err error) {
	k.mu.RLock()
	a := k.active
	k.mu.RUnlock()
	if a == nil {
		if err := k.Ensure(ctx); err != nil {
			return nil, nil, err
		}
		k.mu.RLock()
		a = k.active
		k.mu.RUnlock()
	}
	if msg, err = build(a.ref.KID); err != nil {
		return nil, nil, err
	}
	sig, err = k.cfg.Lifecycle.Sign(ctx, a.prov, a.caps, a.ref, providers.ES256, msg, false)
	if err != nil {
		return nil, nil, err
	}
	return msg, sig, nil
}
