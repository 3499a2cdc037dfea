// Package keys implements the key operations behind the remote-KMS contract face: per-tenant kids
// mapped to provider references, persisted as stub records in the store and cached in memory so a
// signature costs one map lookup before the provider call.
package keys

import (
	"context"
	"crypto/ecdsa"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

	"github.com/kmsgate/kmsgate/appliance/store"
	"github.com/kmsgate/kmsgate/internal/errs"
	"github.com/kmsgate/kmsgate/internal/keyutil"
	"github.com/kmsgate/kmsgate/providers"
)

// MaxKIDLen bounds a kid; providers use it in labels and key names.
const MaxKIDLen = 200

// Registry is what the service needs from the provider registry.
type Registry interface {
	Get(id string) (providers.Provider, error)
}

// Store is what the service needs from the record store.
type Store interface {
	Get(ctx context.Context, key string, v any) error
	Put(ctx context.Context, key string, v any) error
	Create(ctx context.Context, key string, v any) error
	Delete(ctx context.Context, key string) error
}

// Service is the key service of the remote-KMS contract face. It is safe for concurrent use.
type Service struct {
	st      Store
	reg     Registry
	lc      *Lifecycle
	log     *slog.Logger
	now     func() time.Time
	mu      sync.RWMutex
	entries map[entryKey]*entry
	gen     uint64 // bumped under mu by every invalidation (see install)
}

type entryKey struct{ tenant, kid string }

type entry struct {
	ref  providers.KeyRef
	prov providers.Provider
	caps providers.Capabilities
}

// New builds the service with a lifecycle of its own: crash-safe, with the default quota, when st
// supports transactions.
func New(st Store, reg Registry, log *slog.Logger) *Service {
	c := LifecycleConfig{Log: log}
	if ts, ok := st.(TxStore); ok {
		c.Store = ts
	}
	return NewWithLifecycle(st, reg, NewLifecycleWith(c), log)
}

// NewWithLifecycle builds the service on lc, which must keep its bookkeeping in st.
func NewWithLifecycle(st Store, reg Registry, lc *Lifecycle, log *slog.Logger) *Service {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Service{st: st, reg: reg, lc: lc, log: log, now: time.Now, entries: map[entryKey]*entry{}}
}

// Lifecycle is the key lifecycle the service uses, for the other face to share.
func (s *Service) Lifecycle() *Lifecycle { return s.lc }

// ValidateKID checks a kid from a URL or body.
func ValidateKID(kid string) error {
	switch {
	case kid == "":
		return errs.Errorf(errs.BadInput, "kid must not be empty").WithCode("invalid_kid")
	case len(kid) > MaxKIDLen:
		return errs.Errorf(errs.BadInput, "kid is longer than %d bytes", MaxKIDLen).WithCode("invalid_kid")
	case !utf8.ValidString(kid):
		return errs.Errorf(errs.BadInput, "kid is not valid UTF-8").WithCode("invalid_kid")
	}
	for _, r := range kid {
		if r < 0x20 || r == 0x7f {
			return errs.Errorf(errs.BadInput, "kid contains control characters").WithCode("invalid_kid")
		}
	}
	return nil
}

// ResolveAlg applies the provider default and checks support.
func ResolveAlg(p providers.Provider, alg string) (string, error) {
	caps := p.Capabilities()
	if alg == "" {
		alg = caps.DefaultAlg
	}
	if !caps.Supports(alg) {
		return "", errs.Errorf(errs.BadInput, "unsupported alg %q (provider %s supports %s)", alg,
			p.ID(), strings.Join(caps.SupportedAlgs, ", ")).WithCode("unsupported_alg")
	}
	return alg, nil
}

// KeyInfo is a key's public description.
type KeyInfo struct {
	KID        string      `json:"kid"`
	ProviderID string      `json:"kmsProvider"`
	Alg        string      `json:"alg"`
	PublicJWK  keyutil.JWK `json:"publicJwk"`
	Imported   bool        `json:"imported,omitempty"`
	CreatedAt  time.Time   `json:"createdAt"`
	UpdatedAt  time.Time   `json:"updatedAt"`
}

func info(r *store.KeyRef) *KeyInfo {
	return &KeyInfo{KID: r.KID, ProviderID: r.ProviderID, Alg: r.Alg, PublicJWK: r.PublicJWK, Imported: r.Imported,
		CreatedAt: r.CreatedAt, UpdatedAt: r.UpdatedAt}
}

func errExists(kid string) error {
	return errs.Errorf(errs.Conflict, "key %q already exists", kid).WithCode("key_exists")
}

func errNotFound(kid string) error {
	return errs.Errorf(errs.NotFound, "key %q not found", kid).WithCode("key_not_found")
}

// Generate creates a key in prov. A kid that exists for the tenant is a conflict.
func (s *Service) Generate(ctx context.Context, tenant, kid, alg string, prov providers.Provider) (*KeyInfo, error) {
	if err := ValidateKID(kid); err != nil {
		return nil, err
	}
	alg, err := ResolveAlg(prov, alg)
	if err != nil {
		return nil, err
	}
	if !prov.Capabilities().CanCreate {
		return nil, errs.Errorf(errs.NotSupported, "provider %s cannot create keys", prov.ID())
	}
	var existing store.KeyRef
	if err := s.st.Get(ctx, store.KeyRecordKey(tenant, kid), &existing); err == nil {
		return nil, errExists(kid)
	} else if !errors.Is(err, store.ErrNotFound) {
		return nil, fmt.Errorf("read key record: %w", err)
	}
	var rec *store.KeyRef
	_, err = s.lc.Generate(ctx, prov, providers.KeySpec{Tenant: tenant, KID: kid, Alg: alg}, func(tx *store.Txn, ref providers.KeyRef) error {
		var err error
		if rec, err = s.record(ref, false); err != nil {
			return err
		}
		// Create, not Put: a concurrent generate of the same kid loses here, and its backend key
		// is rolled back.
		if err := tx.Create(store.KeyRecordKey(tenant, kid), rec); err != nil {
			if errors.Is(err, store.ErrExists) {
				return errExists(kid)
			}
			return fmt.Errorf("store key record: %w", err)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	s.forget(tenant, kid)
	return info(rec), nil
}

// Import stores priv under kid in prov, replacing an existing key of that kid (an upsert, so a
// forced config re-import is idempotent).
func (s *Service) Import(ctx context.Context, tenant, kid, alg string, prov providers.Provider, priv *ecdsa.PrivateKey) (*KeyInfo, error) {
	if err := ValidateKID(kid); err != nil {
		return nil, err
	}
	alg, err := ResolveAlg(prov, alg)
	if err != nil {
		return nil, err
	}
	if !prov.Capabilities().CanImport {
		return nil, errs.Errorf(errs.NotSupported, "provider %s (%s) cannot import keys", prov.ID(), prov.Type()).
			WithCode("import_not_supported")
	}
	var old store.KeyRef
	hadOld := false
	if err := s.st.Get(ctx, store.KeyRecordKey(tenant, kid), &old); err == nil {
		hadOld = true
	} else if !errors.Is(err, store.ErrNotFound) {
		return nil, fmt.Errorf("read key record: %w", err)
	}
	var rec *store.KeyRef
	ref, err := s.lc.Import(ctx, prov, providers.KeySpec{Tenant: tenant, KID: kid, Alg: alg}, priv, func(tx *store.Txn, ref providers.KeyRef) error {
		var err error
		if rec, err = s.record(ref, true); err != nil {
			return err
		}
		if hadOld {
			rec.CreatedAt = old.CreatedAt
		}
		if err := tx.Put(store.KeyRecordKey(tenant, kid), rec); err != nil {
			return fmt.Errorf("store key record: %w", err)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	s.forget(tenant, kid)
	if hadOld && (old.ProviderID != ref.ProviderID || old.ExternalID != ref.ExternalID) {
		// The record now points at the new key: the one it replaced is unreferenced.
		if op, err := s.reg.Get(old.ProviderID); err == nil {
			if oref, err := ProviderRef(old, tenant); err == nil {
				_ = s.lc.cleanup(op, oref)
			}
		}
	}
	return info(rec), nil
}

func (s *Service) record(ref providers.KeyRef, imported bool) (*store.KeyRef, error) {
	r, err := Persisted(ref, ref.Alg)
	if err != nil {
		return nil, err
	}
	now := s.now().UTC()
	r.Imported, r.CreatedAt, r.UpdatedAt = imported, now, now
	return &r, nil
}

// Get returns the key's public description.
func (s *Service) Get(ctx context.Context, tenant, kid string) (*KeyInfo, error) {
	if err := ValidateKID(kid); err != nil {
		return nil, err
	}
	var r store.KeyRef
	if err := s.st.Get(ctx, store.KeyRecordKey(tenant, kid), &r); err != nil {
		if errors.Is(err, store.ErrNotFound) {
			return nil, errNotFound(kid)
		}
		return nil, fmt.Errorf("read key record: %w", err)
	}
	return info(&r), nil
}

// Delete removes the key in its backend (best effort) and its record. Deleting a missing key
// succeeds, so retries are safe.
func (s *Service) Delete(ctx context.Context, tenant, kid string) error {
	if err := ValidateKID(kid); err != nil {
		return err
	}
	var r store.KeyRef
	if err := s.st.Get(ctx, store.KeyRecordKey(tenant, kid), &r); err != nil {
		if errors.Is(err, store.ErrNotFound) {
			return nil
		}
		return fmt.Errorf("read key record: %w", err)
	}
	ref, rerr := ProviderRef(r, tenant)
	backendFailed := rerr != nil
	if p, err := s.reg.Get(r.ProviderID); err == nil && rerr == nil {
		if err := s.lc.Delete(ctx, p, ref); err != nil {
			backendFailed = true
			s.log.Warn("backend delete failed; removing the reference anyway", "provider", p.ID(), "tenant", tenant,
				"key_id", kid, "error", err)
		}
	} else {
		backendFailed = true
	}
	if err := s.st.Delete(ctx, store.KeyRecordKey(tenant, kid)); err != nil {
		return fmt.Errorf("delete key record: %w", err)
	}
	if backendFailed {
		// Nothing references the key any more: it stops counting against the quota.
		s.lc.Forget(providers.KeyRef{ProviderID: r.ProviderID, Tenant: tenant, KID: r.KID, ExternalID: r.ExternalID})
	}
	s.forget(tenant, kid)
	return nil
}

func (s *Service) forget(tenant, kid string) { s.Invalidate(tenant, kid) }

func (s *Service) lookup(ctx context.Context, tenant, kid string) (*entry, error) {
	s.mu.RLock()
	e := s.entries[entryKey{tenant, kid}]
	s.mu.RUnlock()
	if e != nil {
		return e, nil
	}
	if err := ValidateKID(kid); err != nil {
		return nil, err
	}
	gen := s.generation()
	var r store.KeyRef
	if err := s.st.Get(ctx, store.KeyRecordKey(tenant, kid), &r); err != nil {
		if errors.Is(err, store.ErrNotFound) {
			return nil, errNotFound(kid)
		}
		return nil, fmt.Errorf("read key record: %w", err)
	}
	p, err := s.reg.Get(r.ProviderID)
	if err != nil {
		return nil, errs.Errorf(errs.Unavailable, "key %q belongs to provider %q, which is not configured", kid, r.ProviderID)
	}
	ref, err := ProviderRef(r, tenant)
	if err != nil {
		return nil, err
	}
	e = &entry{ref: ref, prov: p, caps: p.Capabilities()}
	s.install(tenant, kid, e, gen)
	return e, nil
}

// Sign signs a message (isDigest false) or a SHA-256 digest with the tenant's key kid and returns
// raw r‖s. An empty alg means the key's algorithm.
func (s *Service) Sign(ctx context.Context, tenant, kid, alg string, data []byte, isDigest bool) ([]byte, error) {
	e, err := s.lookup(ctx, tenant, kid)
	if err != nil {
		return nil, err
	}
	if alg == "" {
		alg = e.ref.Alg
	} else if alg != e.ref.Alg {
		return nil, errs.Errorf(errs.BadInput, "alg %q does not match the key's algorithm %s", alg, e.ref.Alg).
			WithCode("unsupported_alg")
	}
	sig, err := s.lc.Sign(ctx, e.prov, e.caps, e.ref, alg, data, isDigest)
	if err != nil && errs.KindOf(err) == errs.NotFound {
		// The backend lost the key (deleted out of band): drop the cached entry, and report it
		// with the same code as a key deleted through kmsgate.
		s.forget(tenant, kid)
		return nil, &errs.Error{Kind: errs.NotFound, Msg: fmt.Sprintf("key %q not found", kid), Code: "key_not_found", Err: err}
	}
	return sig, err
}
