// Package keys implements the key operations behind the remote-KMS contract face: per-tenant kids
// mapped to provider references, persisted as stub records in the store and cached in memory so a
// signature costs one map lookup before the provider call.
package keys

import (
	"context"
	"crypto/ecdsa"
	"crypto/sha256"
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
	"github.com/kmsgate/kmsgate/metrics"
	"github.com/kmsgate/kmsgate/providers"
)

// MaxKIDLen bounds a kid; providers use it in labels and key names.
const MaxKIDLen = 200

// Registry is what the service needs from the provider registry.
type Registry interface {
	Get(id string) (providers.Provider, error)
}

// Service is the key service. It is safe for concurrent use.
type Service struct {
	st      *store.Store
	reg     Registry
	m       *metrics.Metrics
	log     *slog.Logger
	now     func() time.Time
	recs    map[string]*metrics.SignRecorder
	recsMu  sync.Mutex
	mu      sync.RWMutex
	entries map[entryKey]*entry
}

type entryKey struct{ tenant, kid string }

type entry struct {
	ref  providers.KeyRef
	prov providers.Provider
	caps providers.Capabilities
	jwk  keyutil.JWK
	rec  *metrics.SignRecorder
}

// New builds the service.
func New(st *store.Store, reg Registry, m *metrics.Metrics, log *slog.Logger) *Service {
	return &Service{st: st, reg: reg, m: m, log: log, now: time.Now, recs: map[string]*metrics.SignRecorder{},
		entries: map[entryKey]*entry{}}
}

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

func (s *Service) recorder(id string) *metrics.SignRecorder {
	s.recsMu.Lock()
	defer s.recsMu.Unlock()
	r, ok := s.recs[id]
	if !ok {
		r = s.m.SignRecorder(id)
		s.recs[id] = r
	}
	return r
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

func info(r *store.KeyRecord) *KeyInfo {
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
	var existing store.KeyRecord
	if err := s.st.Get(ctx, store.KeyRecordKey(tenant, kid), &existing); err == nil {
		return nil, errExists(kid)
	} else if !errors.Is(err, store.ErrNotFound) {
		return nil, fmt.Errorf("read key record: %w", err)
	}
	ref, err := prov.Generate(ctx, providers.KeySpec{Tenant: tenant, KID: kid, Alg: alg})
	s.countOp(prov.ID(), "generate", err)
	if err != nil {
		return nil, err
	}
	rec, err := s.record(ref, false)
	if err != nil {
		s.cleanup(prov, ref)
		return nil, err
	}
	if err := s.st.Create(ctx, store.KeyRecordKey(tenant, kid), rec); err != nil {
		// Lost a race with a concurrent generate of the same kid, or the store failed: do not
		// leave an orphan key in the backend.
		s.cleanup(prov, ref)
		if errors.Is(err, store.ErrExists) {
			return nil, errExists(kid)
		}
		return nil, fmt.Errorf("store key record: %w", err)
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
	var old store.KeyRecord
	hadOld := false
	if err := s.st.Get(ctx, store.KeyRecordKey(tenant, kid), &old); err == nil {
		hadOld = true
	} else if !errors.Is(err, store.ErrNotFound) {
		return nil, fmt.Errorf("read key record: %w", err)
	}
	ref, err := prov.Import(ctx, providers.KeySpec{Tenant: tenant, KID: kid, Alg: alg}, priv)
	s.countOp(prov.ID(), "import", err)
	if err != nil {
		return nil, err
	}
	rec, err := s.record(ref, true)
	if err != nil {
		s.cleanup(prov, ref)
		return nil, err
	}
	if hadOld {
		rec.CreatedAt = old.CreatedAt
	}
	if err := s.st.Put(ctx, store.KeyRecordKey(tenant, kid), rec); err != nil {
		s.cleanup(prov, ref)
		return nil, fmt.Errorf("store key record: %w", err)
	}
	s.forget(tenant, kid)
	if hadOld && (old.ProviderID != ref.ProviderID || old.ExternalID != ref.ExternalID) {
		if op, err := s.reg.Get(old.ProviderID); err == nil {
			s.cleanup(op, refOf(&old))
		}
	}
	return info(rec), nil
}

func (s *Service) record(ref providers.KeyRef, imported bool) (*store.KeyRecord, error) {
	jwk, err := keyutil.PublicJWK(ref.Public, ref.KID, ref.Alg)
	if err != nil {
		return nil, fmt.Errorf("provider returned an unusable public key: %w", err)
	}
	now := s.now().UTC()
	return &store.KeyRecord{Tenant: ref.Tenant, KID: ref.KID, ProviderID: ref.ProviderID, ExternalID: ref.ExternalID,
		Alg: ref.Alg, PublicJWK: jwk, Material: ref.Material, Imported: imported, CreatedAt: now, UpdatedAt: now}, nil
}

func refOf(r *store.KeyRecord) providers.KeyRef {
	pub, _ := keyutil.ParsePublicJWK(r.PublicJWK)
	return providers.KeyRef{ProviderID: r.ProviderID, Tenant: r.Tenant, KID: r.KID, Alg: r.Alg,
		ExternalID: r.ExternalID, Public: pub, Material: r.Material}
}

// cleanup deletes a backend key that no record points to, logging (never failing) on error.
func (s *Service) cleanup(p providers.Provider, ref providers.KeyRef) {
	if !p.Capabilities().CanDelete {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := p.Delete(ctx, ref); err != nil {
		s.log.Warn("could not delete orphaned backend key", "provider", p.ID(), "tenant", ref.Tenant, "kid", ref.KID, "err", err)
	}
}

func (s *Service) countOp(provider, op string, err error) {
	res := metrics.ResultOK
	if err != nil {
		res = resultOf(err)
	}
	s.m.KeyOps.WithLabelValues(provider, op, res).Inc()
}

// Get returns the key's public description.
func (s *Service) Get(ctx context.Context, tenant, kid string) (*KeyInfo, error) {
	if err := ValidateKID(kid); err != nil {
		return nil, err
	}
	var r store.KeyRecord
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
	var r store.KeyRecord
	if err := s.st.Get(ctx, store.KeyRecordKey(tenant, kid), &r); err != nil {
		if errors.Is(err, store.ErrNotFound) {
			return nil
		}
		return fmt.Errorf("read key record: %w", err)
	}
	if p, err := s.reg.Get(r.ProviderID); err == nil && p.Capabilities().CanDelete {
		err := p.Delete(ctx, refOf(&r))
		s.countOp(p.ID(), "delete", err)
		if err != nil {
			s.log.Warn("backend delete failed; removing the reference anyway", "provider", p.ID(), "tenant", tenant,
				"kid", kid, "err", err)
		}
	}
	if err := s.st.Delete(ctx, store.KeyRecordKey(tenant, kid)); err != nil {
		return fmt.Errorf("delete key record: %w", err)
	}
	s.forget(tenant, kid)
	return nil
}

func (s *Service) forget(tenant, kid string) {
	s.mu.Lock()
	delete(s.entries, entryKey{tenant, kid})
	s.mu.Unlock()
}

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
	var r store.KeyRecord
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
	ref := refOf(&r)
	if ref.Public == nil {
		return nil, fmt.Errorf("key record %q has an invalid public key", kid)
	}
	e = &entry{ref: ref, prov: p, caps: p.Capabilities(), jwk: r.PublicJWK, rec: s.recorder(p.ID())}
	s.mu.Lock()
	s.entries[entryKey{strings.Clone(tenant), strings.Clone(kid)}] = e
	s.mu.Unlock()
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
	start := time.Now()
	var sig []byte
	switch {
	case isDigest && len(data) != sha256.Size:
		err = errs.Errorf(errs.BadInput, "digest must be %d bytes for %s, got %d", sha256.Size, alg, len(data)).
			WithCode("invalid_digest")
	case isDigest && !e.caps.CanSignDigest:
		err = errs.Errorf(errs.NotSupported, "provider %s signs whole messages only; send data instead of digest", e.prov.ID()).
			WithCode("digest_not_supported")
	case !isDigest && !e.caps.CanSignMessage:
		d := sha256.Sum256(data)
		sig, err = e.prov.SignDigest(ctx, e.ref, alg, d[:])
	case isDigest:
		sig, err = e.prov.SignDigest(ctx, e.ref, alg, data)
	default:
		sig, err = e.prov.SignMessage(ctx, e.ref, alg, data)
	}
	res := metrics.ResultOK
	if err != nil {
		res = resultOf(err)
		if errs.KindOf(err) == errs.Throttled {
			s.m.Throttled.WithLabelValues(e.prov.ID()).Inc()
		}
		if errs.KindOf(err) == errs.NotFound {
			// The backend lost the key (deleted out of band); drop the cached entry.
			s.forget(tenant, kid)
		}
	} else if len(sig) != 64 {
		// Never hand a caller a signature of the wrong shape: a wrong length corrupts JWS.
		res = metrics.ResultError
		sig, err = nil, errs.Errorf(errs.Internal, "provider %s returned a %d-byte signature", e.prov.ID(), len(sig))
	}
	e.rec.Observe(alg, res, time.Since(start))
	return sig, err
}

func resultOf(err error) string {
	switch errs.KindOf(err) {
	case errs.Unavailable:
		return metrics.ResultUnavailable
	case errs.Throttled:
		return metrics.ResultThrottled
	case errs.BadInput, errs.NotSupported:
		return metrics.ResultBadInput
	case errs.NotFound:
		return metrics.ResultNotFound
	}
	return metrics.ResultError
}
