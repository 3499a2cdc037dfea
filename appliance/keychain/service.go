package keychain

import (
	"context"
	"crypto/ecdsa"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"sync"
	"time"
	"unicode/utf8"

	"github.com/google/uuid"

	"github.com/kmsgate/kmsgate/appliance/keys"
	"github.com/kmsgate/kmsgate/appliance/store"
	"github.com/kmsgate/kmsgate/appliance/tenants"
	"github.com/kmsgate/kmsgate/internal/errs"
	"github.com/kmsgate/kmsgate/internal/keyutil"
	"github.com/kmsgate/kmsgate/metrics"
	"github.com/kmsgate/kmsgate/providers"
)

// prefixChain namespaces chain records in the shared store: chain/<tenant>\x00<id>. The NUL
// separator cannot occur in tenant ids, so one tenant's prefix never matches another's.
const prefixChain = "chain/"

func chainKey(tenant, id string) string { return prefixChain + tenant + "\x00" + id }
func tenantPrefix(tenant string) string { return prefixChain + tenant + "\x00" }

// idRe bounds chain ids: they become part of provider kids and store keys.
var idRe = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$`)

// dbProviderID is the provider the encrypt chain always uses (EUDIPLO: encryption uses the DB),
// and the fallback for bootstrap when the default provider cannot create keys.
const dbProviderID = "db"

// Store is what the service needs from the record store.
type Store interface {
	Get(ctx context.Context, key string, v any) error
	Put(ctx context.Context, key string, v any) error
	Create(ctx context.Context, key string, v any) error
	Delete(ctx context.Context, key string) error
	List(ctx context.Context, prefix string, fn func(key string, val []byte) error) error
}

// Registry is what the service needs from the provider registry.
type Registry interface {
	Get(id string) (providers.Provider, error)
	All() []providers.Provider
	DefaultID() string
}

// Tenants is what the service needs from the tenant service.
type Tenants interface {
	Tenant(ctx context.Context, id string) (*store.Tenant, error)
	EnsureTenant(ctx context.Context, id, name string) (created bool, err error)
	ProviderFor(ctx context.Context, p *tenants.Principal, requested string, reg tenants.ProviderSource) (providers.Provider, error)
}

// Config wires the service.
type Config struct {
	Store    Store
	Registry Registry
	Tenants  Tenants
	Metrics  *metrics.Metrics // optional
	Logger   *slog.Logger
	// Lifecycle creates, deletes and signs with keys (default: a lifecycle of its own); the
	// contract face's key service shares its lifecycle.
	Lifecycle *keys.Lifecycle
	// PublicURL's host becomes the certificates' dNSName SAN.
	PublicURL string
	// Country is the C= of certificate subjects (default DE).
	Country string
	// Grace is how long a rotated-out key stays published (default 30 days).
	Grace time.Duration
	// Now is the clock (default time.Now); tests move it to trigger rotation and expiry.
	Now func() time.Time
}

// Service manages key chains. It is safe for concurrent use; mutations of one chain are
// serialised in-process (Badger's directory lock guarantees a single process per data dir).
type Service struct {
	st    Store
	reg   Registry
	ten   Tenants
	lc    *keys.Lifecycle
	m     *metrics.Metrics
	log   *slog.Logger
	prof  certProfile
	grace time.Duration

	clockMu sync.RWMutex
	clock   func() time.Time

	locks sync.Map // chainKey -> *sync.Mutex
}

// New builds the service.
func New(c Config) *Service {
	s := &Service{st: c.Store, reg: c.Registry, ten: c.Tenants, m: c.Metrics, log: c.Logger,
		prof: newCertProfile(c.PublicURL, c.Country), grace: c.Grace, clock: c.Now}
	if s.grace <= 0 {
		s.grace = DefaultGrace
	}
	if s.clock == nil {
		s.clock = time.Now
	}
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	s.lc = c.Lifecycle
	if s.lc == nil {
		s.lc = keys.NewLifecycle(s.log)
	}
	return s
}

// SetClock replaces the clock (tests move time to trigger the scheduler).
func (s *Service) SetClock(now func() time.Time) {
	s.clockMu.Lock()
	s.clock = now
	s.clockMu.Unlock()
}

func (s *Service) now() time.Time {
	s.clockMu.RLock()
	defer s.clockMu.RUnlock()
	return s.clock().UTC()
}

func (s *Service) lock(tenant, id string) func() {
	v, _ := s.locks.LoadOrStore(chainKey(tenant, id), &sync.Mutex{})
	mu := v.(*sync.Mutex)
	mu.Lock()
	return mu.Unlock
}

func errNotFound(id string) error {
	return errs.Errorf(errs.NotFound, "key chain %q not found", id).WithCode("key_chain_not_found")
}

func (s *Service) load(ctx context.Context, tenant, id string) (*Chain, error) {
	if !idRe.MatchString(id) {
		return nil, errNotFound(id)
	}
	var c Chain
	if err := s.st.Get(ctx, chainKey(tenant, id), &c); err != nil {
		if errors.Is(err, store.ErrNotFound) {
			return nil, errNotFound(id)
		}
		return nil, fmt.Errorf("load key chain %s: %w", id, err)
	}
	return &c, nil
}

func (s *Service) save(ctx context.Context, c *Chain) error {
	if err := s.st.Put(ctx, chainKey(c.Tenant, c.ID), c); err != nil {
		return fmt.Errorf("store key chain %s: %w", c.ID, err)
	}
	return nil
}

func (s *Service) list(ctx context.Context, prefix string) ([]*Chain, error) {
	var out []*Chain
	err := s.st.List(ctx, prefix, func(key string, val []byte) error {
		var c Chain
		if err := json.Unmarshal(val, &c); err != nil {
			return fmt.Errorf("decode key chain %q: %w", key, err)
		}
		out = append(out, &c)
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("list key chains: %w", err)
	}
	// Oldest first: deterministic, and usage lookups pick the longest-lived chain.
	sort.SliceStable(out, func(i, j int) bool { return out[i].CreatedAt.Before(out[j].CreatedAt) })
	return out, nil
}

func (s *Service) tenantName(ctx context.Context, tenant string) (string, error) {
	t, err := s.ten.Tenant(ctx, tenant)
	if err != nil {
		return "", fmt.Errorf("tenant %s: %w", tenant, err)
	}
	return t.Name, nil
}

// ---- validation ----

func validateDescription(d *string) error {
	if d == nil {
		return nil
	}
	if !utf8.ValidString(*d) || utf8.RuneCountInString(*d) > MaxDescriptionLen {
		return badRequest("validation_failed", "description must be valid UTF-8 of at most %d characters", MaxDescriptionLen)
	}
	return nil
}

func validateUsage(u string) error {
	if !ValidUsageType(u) {
		return badRequest("validation_failed", "usageType must be one of access, attestation, trustList, statusList, encrypt (got %q)", u)
	}
	return nil
}

func validatePolicy(p *PolicyInput, requireEnabled bool) error {
	if p == nil {
		return nil
	}
	if requireEnabled && p.Enabled == nil {
		return badRequest("validation_failed", "rotationPolicy.enabled is required")
	}
	for name, v := range map[string]*int{"intervalDays": p.IntervalDays, "certValidityDays": p.CertValidityDays} {
		if v != nil && (*v < MinDays || *v > MaxDays) {
			return badRequest("validation_failed", "rotationPolicy.%s must be between %d and %d (got %d)", name, MinDays, MaxDays, *v)
		}
	}
	return nil
}

func (p *PolicyInput) apply(dst *Policy) {
	if p == nil {
		return
	}
	if p.Enabled != nil {
		dst.Enabled = *p.Enabled
	}
	if p.IntervalDays != nil {
		dst.IntervalDays = *p.IntervalDays
	}
	if p.CertValidityDays != nil {
		dst.CertValidityDays = *p.CertValidityDays
	}
}

// ---- key bookkeeping ----

func (s *Service) deleteKey(ctx context.Context, tenant string, k store.KeyRef) error {
	prov, err := s.reg.Get(k.ProviderID)
	if err != nil {
		return fmt.Errorf("provider of key %s: %w", k.KID, err)
	}
	ref, err := keys.ProviderRef(k, tenant)
	if err != nil {
		return err
	}
	if err := s.lc.Delete(ctx, prov, ref); err != nil {
		return fmt.Errorf("delete key %s: %w", k.KID, err)
	}
	return nil
}

func sameKey(a, b store.KeyRef) bool {
	return a.ProviderID == b.ProviderID && a.KID == b.KID && a.ExternalID == b.ExternalID
}

// jwkAlg is the alg published for a chain's keys: encrypt chains hold an ECDH-ES key.
func jwkAlg(usage string) string {
	if usage == UsageEncrypt {
		return "ECDH-ES"
	}
	return providers.ES256
}

// ---- create ----

// Create generates a chain (POST /key-chain) and returns its id.
func (s *Service) Create(ctx context.Context, p *tenants.Principal, req CreateRequest) (string, error) {
	if err := validateUsage(req.UsageType); err != nil {
		return "", err
	}
	if req.Type != TypeStandalone && req.Type != TypeInternalChain {
		return "", badRequest("validation_failed", "type must be standalone or internalChain (got %q)", req.Type)
	}
	if err := validateDescription(req.Description); err != nil {
		return "", err
	}
	if err := validatePolicy(req.RotationPolicy, true); err != nil {
		return "", err
	}
	prov, err := s.ten.ProviderFor(ctx, p, req.KMSProvider, s.reg)
	if err != nil {
		return "", err
	}
	var pol Policy
	req.RotationPolicy.apply(&pol)
	desc := ""
	if req.Description != nil {
		desc = *req.Description
	}
	return s.create(ctx, p.TenantID, prov, req.UsageType, req.Type, desc, pol)
}

func cannotCreate(prov providers.Provider) error {
	return errs.Errorf(errs.NotSupported, "provider %q (type %s) cannot create keys", prov.ID(), prov.Type()).
		WithCode("create_not_supported")
}

func (s *Service) create(ctx context.Context, tenant string, prov providers.Provider, usage, typ, desc string, pol Policy) (string, error) {
	if !prov.Capabilities().CanCreate {
		return "", cannotCreate(prov)
	}
	name, err := s.tenantName(ctx, tenant)
	if err != nil {
		return "", err
	}
	now := s.now()
	c := &Chain{ID: uuid.NewString(), Tenant: tenant, Description: desc, UsageType: usage, Usage: KeyUseSign,
		Provider: prov.ID(), Rotation: pol, CreatedAt: now, UpdatedAt: now}
	ks := s.lc.Begin()
	if err := s.generateChain(ctx, c, prov, typ, name, ks); err != nil {
		ks.Rollback()
		return "", err
	}
	err = ks.Commit(func() error {
		if err := s.st.Create(ctx, chainKey(tenant, c.ID), c); err != nil {
			return fmt.Errorf("store key chain: %w", err)
		}
		return nil
	})
	if err != nil {
		return "", err
	}
	return c.ID, nil
}

// generateChain fills c with freshly generated keys and certificates.
func (s *Service) generateChain(ctx context.Context, c *Chain, prov providers.Provider, typ, name string, ks *keys.Batch) error {
	if c.UsageType == UsageEncrypt {
		// The encrypt chain is an ECDH key: no certificate, never signs (EUDIPLO usage=encrypt).
		c.Usage = KeyUseEncrypt
		k, _, err := s.newKey(ctx, c, prov, c.ID+"-active", ks)
		if err != nil {
			return err
		}
		c.Active = k
		return nil
	}
	var issuer *x509.Certificate
	var issuerSigner signer
	var rootPEM string
	if typ == TypeInternalChain {
		rk, rref, err := s.newKey(ctx, c, prov, c.ID+"-root", ks)
		if err != nil {
			return err
		}
		rootSigner := s.signerOf(prov, rref)
		root, err := s.prof.issue(ctx, certSpec{commonName: name + " Root CA", ca: true, days: RootValidityDays,
			subjectPub: rref.Public, now: s.now()}, rootSigner)
		if err != nil {
			return fmt.Errorf("root certificate: %w", err)
		}
		c.Root, c.RootCertificate = &rk, pemOf(root)
		issuer, issuerSigner, rootPEM = root, rootSigner, c.RootCertificate
	}
	ak, aref, err := s.newKey(ctx, c, prov, c.ID+"-active", ks)
	if err != nil {
		return err
	}
	if issuer == nil {
		issuerSigner = s.signerOf(prov, aref)
	}
	leaf, err := s.prof.issue(ctx, certSpec{commonName: name, days: c.certValidityDays(), subjectPub: aref.Public,
		issuer: issuer, now: s.now()}, issuerSigner)
	if err != nil {
		return fmt.Errorf("leaf certificate: %w", err)
	}
	c.Active, c.ActiveCertificate = ak, joinPEM(pemOf(leaf), rootPEM)
	return nil
}

func (s *Service) newKey(ctx context.Context, c *Chain, prov providers.Provider, kid string, ks *keys.Batch) (store.KeyRef, providers.KeyRef, error) {
	ref, err := ks.Generate(ctx, prov, providers.KeySpec{Tenant: c.Tenant, KID: kid, Alg: providers.ES256})
	if err != nil {
		return store.KeyRef{}, ref, fmt.Errorf("generate key %s: %w", kid, err)
	}
	k, err := storedKey(ref, jwkAlg(c.UsageType))
	return k, ref, err
}

func (s *Service) importKey(ctx context.Context, c *Chain, prov providers.Provider, kid string, priv *ecdsa.PrivateKey, ks *keys.Batch) (store.KeyRef, providers.KeyRef, error) {
	ref, err := ks.Import(ctx, prov, providers.KeySpec{Tenant: c.Tenant, KID: kid, Alg: providers.ES256}, priv)
	if err != nil {
		return store.KeyRef{}, ref, fmt.Errorf("import key %s: %w", kid, err)
	}
	k, err := storedKey(ref, jwkAlg(c.UsageType))
	return k, ref, err
}

// ---- read ----

// Get returns one chain's response DTO.
func (s *Service) Get(ctx context.Context, tenant, id string) (*Response, error) {
	c, err := s.load(ctx, tenant, id)
	if err != nil {
		return nil, err
	}
	return s.response(c), nil
}

// List returns the tenant's chains, optionally filtered by usage type.
func (s *Service) List(ctx context.Context, tenant, usageType string) ([]Response, error) {
	if usageType != "" {
		if err := validateUsage(usageType); err != nil {
			return nil, err
		}
	}
	chains, err := s.list(ctx, tenantPrefix(tenant))
	if err != nil {
		return nil, err
	}
	out := make([]Response, 0, len(chains))
	for _, c := range chains {
		if usageType == "" || c.UsageType == usageType {
			out = append(out, *s.response(c))
		}
	}
	return out, nil
}

func pubInfo(k store.KeyRef) PublicKeyInfo {
	return PublicKeyInfo{Kty: k.PublicJWK.Kty, Alg: k.PublicJWK.Alg, Kid: k.KID, Crv: k.PublicJWK.Crv}
}

func intPtr(v int) *int {
	if v == 0 {
		return nil
	}
	return &v
}

func (s *Service) response(c *Chain) *Response {
	r := &Response{ID: c.ID, UsageType: c.UsageType, Type: c.Type(), Description: c.Description,
		KMSProvider: c.Provider, ActivePublicKey: pubInfo(c.Active), ActiveCertificate: certInfo(c.ActiveCertificate),
		RotationPolicy: PolicyInfo{Enabled: c.Rotation.Enabled, IntervalDays: intPtr(c.Rotation.IntervalDays),
			CertValidityDays: intPtr(c.Rotation.CertValidityDays)},
		LastRotatedAt: c.LastRotatedAt, CreatedAt: c.CreatedAt, UpdatedAt: c.UpdatedAt}
	if c.Type() == TypeInternalChain {
		r.RootCertificate = certInfo(c.RootCertificate)
	}
	if c.Previous != nil {
		pk := pubInfo(*c.Previous)
		r.PreviousPublicKey, r.PreviousCertificate, r.PreviousKeyExpiry = &pk, certInfo(c.PreviousCertificate), c.PreviousKeyExpiry
	}
	if next, ok := c.nextRotation(); ok {
		r.RotationPolicy.NextRotationAt = &next
	}
	return r
}

// ---- update / delete ----

// Update patches description, rotation policy and/or the active certificate chain.
func (s *Service) Update(ctx context.Context, tenant, id string, req UpdateRequest) error {
	if err := validateDescription(req.Description); err != nil {
		return err
	}
	if err := validatePolicy(req.RotationPolicy, false); err != nil {
		return err
	}
	defer s.lock(tenant, id)()
	c, err := s.load(ctx, tenant, id)
	if err != nil {
		return err
	}
	if req.ActiveCertificate != nil {
		if c.Usage == KeyUseEncrypt {
			return badRequest("validation_failed", "encrypt key chains carry no certificate")
		}
		// Unlike EUDIPLO the replacement is validated: a chain whose leaf does not hold the active
		// key would make every signature unverifiable.
		entries, err := pemEntries(*req.ActiveCertificate)
		if err != nil {
			return err
		}
		certs, err := validateChain("activeCertificate", entries, s.now())
		if err != nil {
			return err
		}
		pub, err := publicOf(c.Active)
		if err != nil {
			return err
		}
		if err := requireKeyMatch("activeCertificate", 0, len(certs), certs[0], pub, "chain's active key"); err != nil {
			return err
		}
		c.ActiveCertificate = pemChain(certs)
	}
	if req.Description != nil {
		c.Description = *req.Description
	}
	req.RotationPolicy.apply(&c.Rotation)
	c.UpdatedAt = s.now()
	return s.save(ctx, c)
}

// pemEntries splits a PEM string into one PEM per certificate.
func pemEntries(s string) ([]string, error) {
	out := splitPEMStrict(s)
	if len(out) == 0 {
		return nil, badCert("activeCertificate holds no PEM CERTIFICATE block")
	}
	return out, nil
}

// Delete removes the chain and all its keys (active, previous, root) from their backends.
func (s *Service) Delete(ctx context.Context, tenant, id string) error {
	defer s.lock(tenant, id)()
	c, err := s.load(ctx, tenant, id)
	if err != nil {
		return err
	}
	for _, k := range c.keys() {
		if err := s.deleteKey(ctx, tenant, k); err != nil {
			kind := errs.KindOf(err)
			if kind == errs.Unavailable || kind == errs.Throttled {
				// Transient: keep the chain so a retry deletes the remaining keys.
				return err
			}
			s.log.Warn("key chain delete: key could not be deleted in its backend", "chain", id, "kid", k.KID, "err", err)
		}
	}
	if err := s.st.Delete(ctx, chainKey(tenant, id)); err != nil {
		return fmt.Errorf("delete key chain %s: %w", id, err)
	}
	return nil
}

// ---- providers ----

// Providers lists the providers the caller's tenant may use and its effective default.
func (s *Service) Providers(ctx context.Context, p *tenants.Principal) (*ProvidersResponse, error) {
	t, err := s.ten.Tenant(ctx, p.TenantID)
	if err != nil {
		return nil, err
	}
	out := &ProvidersResponse{Providers: []ProviderInfo{}, Default: s.reg.DefaultID()}
	for _, prov := range s.reg.All() {
		if len(t.AllowedProviders) > 0 && !slices.Contains(t.AllowedProviders, prov.ID()) {
			continue
		}
		out.Providers = append(out.Providers, ProviderInfo{Name: prov.ID(), Type: prov.Type(),
			Description: prov.Description(), Capabilities: prov.Capabilities()})
	}
	if def, err := s.ten.ProviderFor(ctx, p, "", s.reg); err == nil {
		out.Default = def.ID()
	}
	return out, nil
}

// ---- rotation ----

// Rotate replaces the active key and certificate now (POST /rotate). trigger labels the metric.
func (s *Service) Rotate(ctx context.Context, tenant, id, trigger string) (err error) {
	defer func() {
		if s.m != nil {
			res := "ok"
			if err != nil {
				res = "error"
			}
			s.m.RotationsTotal.WithLabelValues(trigger, res).Inc()
		}
	}()
	defer s.lock(tenant, id)()
	c, err := s.load(ctx, tenant, id)
	if err != nil {
		return err
	}
	return s.rotateLocked(ctx, c)
}

// rotateIfDue re-checks under the chain lock that the chain is still due (a manual rotation or an
// update may have happened since the scheduler listed it) and rotates it.
func (s *Service) rotateIfDue(ctx context.Context, tenant, id string) (done bool, err error) {
	defer s.lock(tenant, id)()
	c, err := s.load(ctx, tenant, id)
	if err != nil {
		if errs.KindOf(err) == errs.NotFound {
			return false, nil // deleted meanwhile
		}
		return false, err
	}
	if next, ok := c.nextRotation(); !ok || s.now().Before(next) {
		return false, nil
	}
	err = s.rotateLocked(ctx, c)
	if s.m != nil {
		res := "ok"
		if err != nil {
			res = "error"
		}
		s.m.RotationsTotal.WithLabelValues("scheduled", res).Inc()
	}
	return err == nil, err
}

// rotateLocked rotates c. Order matters for "a failed rotation leaves the chain as it was": the
// new key and certificate are made first, then one store write switches over; any failure
// before the write deletes the new key and leaves the record untouched.
func (s *Service) rotateLocked(ctx context.Context, c *Chain) error {
	prov, err := s.reg.Get(c.Provider)
	if err != nil {
		return err
	}
	if !prov.Capabilities().CanCreate {
		return cannotCreate(prov)
	}
	now := s.now()
	kid := s.rotationKID(c, now)
	ks := s.lc.Begin()
	nk, nref, err := s.newKey(ctx, c, prov, kid, ks)
	if err != nil {
		ks.Rollback()
		return err
	}
	certPEM := ""
	if c.Usage != KeyUseEncrypt {
		certPEM, err = s.leafFor(ctx, c, prov, nref)
		if err != nil {
			ks.Rollback()
			return err
		}
	}
	next := *c
	older := c.Previous
	prev := c.Active
	exp := now.Add(s.grace)
	next.Previous, next.PreviousCertificate, next.PreviousKeyExpiry = &prev, c.ActiveCertificate, &exp
	next.Active, next.ActiveCertificate = nk, certPEM
	next.LastRotatedAt = &now
	next.UpdatedAt = now
	if err := ks.Commit(func() error { return s.save(ctx, &next) }); err != nil {
		return err
	}
	*c = next
	// Only one previous slot: the key it held is no longer published, so delete it now instead of
	// leaking it in the backend (EUDIPLO never deletes).
	if older != nil {
		if err := s.deleteKey(ctx, c.Tenant, *older); err != nil {
			s.log.Warn("rotation: could not delete the older previous key", "chain", c.ID, "kid", older.KID, "err", err)
		}
	}
	return nil
}

// rotationKID is <id>-<epochMillis>, bumped when a clock has not moved since the last rotation so
// kids never repeat within a chain.
func (s *Service) rotationKID(c *Chain, now time.Time) string {
	ms := now.UnixMilli()
	for {
		kid := c.ID + "-" + strconv.FormatInt(ms, 10)
		used := kid == c.Active.KID || (c.Previous != nil && kid == c.Previous.KID) || (c.Root != nil && kid == c.Root.KID)
		if !used {
			return kid
		}
		ms++
	}
}

// leafFor certifies a new active key: by the root for internal chains, self-signed otherwise.
func (s *Service) leafFor(ctx context.Context, c *Chain, prov providers.Provider, ref providers.KeyRef) (string, error) {
	name, err := s.tenantName(ctx, c.Tenant)
	if err != nil {
		return "", err
	}
	spec := certSpec{commonName: name, days: c.certValidityDays(), subjectPub: ref.Public, now: s.now()}
	by := s.signerOf(prov, ref)
	rootPEM := ""
	if c.Type() == TypeInternalChain {
		roots, err := parsePEMChain(c.RootCertificate)
		if err != nil {
			return "", fmt.Errorf("stored root certificate of chain %s is unreadable: %w", c.ID, err)
		}
		if len(roots) == 0 {
			return "", fmt.Errorf("stored root certificate of chain %s holds no certificate", c.ID)
		}
		rref, err := keys.ProviderRef(*c.Root, c.Tenant)
		if err != nil {
			return "", err
		}
		spec.issuer, by, rootPEM = roots[0], s.signerOf(prov, rref), c.RootCertificate
	}
	leaf, err := s.prof.issue(ctx, spec, by)
	if err != nil {
		return "", fmt.Errorf("leaf certificate: %w", err)
	}
	return joinPEM(pemOf(leaf), rootPEM), nil
}

// expirePrevious deletes a previous key whose grace period is over: first in its backend, then
// from the record. If the backend refuses, the record keeps it so the next tick retries; it is no
// longer published either way because JWKS filters on the expiry.
func (s *Service) expirePrevious(ctx context.Context, tenant, id string) error {
	defer s.lock(tenant, id)()
	c, err := s.load(ctx, tenant, id)
	if err != nil {
		return err
	}
	if c.Previous == nil || c.PreviousKeyExpiry == nil || s.now().Before(*c.PreviousKeyExpiry) {
		return nil
	}
	if err := s.deleteKey(ctx, tenant, *c.Previous); err != nil {
		return err
	}
	c.Previous, c.PreviousCertificate, c.PreviousKeyExpiry = nil, "", nil
	c.UpdatedAt = s.now()
	return s.save(ctx, c)
}

// Tick runs one scheduler pass: rotates due chains and deletes expired previous keys. Errors are
// logged per chain and never stop the pass. It returns the number of rotations.
func (s *Service) Tick(ctx context.Context) int {
	chains, err := s.list(ctx, prefixChain)
	if err != nil {
		s.log.Error("rotation scheduler: list key chains", "err", err)
		return 0
	}
	rotated := 0
	for _, c := range chains {
		if ctx.Err() != nil {
			return rotated
		}
		now := s.now()
		if next, ok := c.nextRotation(); ok && !now.Before(next) {
			done, err := s.rotateIfDue(ctx, c.Tenant, c.ID)
			switch {
			case err != nil:
				s.log.Error("rotation scheduler: rotation failed", "tenant", c.Tenant, "chain", c.ID, "err", err)
			case done:
				rotated++
				s.log.Info("rotation scheduler: rotated key chain", "tenant", c.Tenant, "chain", c.ID)
			}
		}
		if c.Previous != nil && c.PreviousKeyExpiry != nil && !now.Before(*c.PreviousKeyExpiry) {
			if err := s.expirePrevious(ctx, c.Tenant, c.ID); err != nil {
				s.log.Warn("rotation scheduler: could not delete an expired previous key", "tenant", c.Tenant,
					"chain", c.ID, "err", err)
			}
		}
	}
	return rotated
}

// RunScheduler calls Tick every interval (default 1 h) until ctx ends.
func (s *Service) RunScheduler(ctx context.Context, every time.Duration) {
	if every <= 0 {
		every = time.Hour
	}
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		s.Tick(ctx)
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// ---- export ----

// Export returns the chain in the import-file format (GET /export).
func (s *Service) Export(ctx context.Context, tenant, id string) (*Export, error) {
	c, err := s.load(ctx, tenant, id)
	if err != nil {
		return nil, err
	}
	ex, _ := s.exporter(c.Provider)
	exportable := ex != nil
	jwkOf := func(k store.KeyRef) (keyutil.JWK, error) {
		if ex == nil {
			return k.PublicJWK, nil
		}
		ref, err := keys.ProviderRef(k, tenant)
		if err != nil {
			return keyutil.JWK{}, err
		}
		priv, err := ex.ExportPrivate(ref)
		if err != nil {
			return keyutil.JWK{}, fmt.Errorf("export key %s: %w", k.KID, err)
		}
		return keyutil.PrivateJWK(priv, k.KID, k.PublicJWK.Alg)
	}
	out := &Export{ID: c.ID, Description: c.Description, UsageType: c.UsageType, KMSProvider: c.Provider,
		PrivateKeyExportable: exportable}
	if c.Rotation.Enabled {
		out.RotationPolicy = &ExportPolicy{Enabled: true, IntervalDays: intPtr(c.Rotation.IntervalDays),
			CertValidityDays: intPtr(c.Rotation.CertValidityDays)}
	}
	if c.Type() == TypeInternalChain {
		if out.Key, err = jwkOf(*c.Root); err != nil {
			return nil, err
		}
		out.Crt = splitPEM(c.RootCertificate)
		ak, err := jwkOf(c.Active)
		if err != nil {
			return nil, err
		}
		out.ActiveKey, out.ActiveCrt = &ak, splitPEM(c.ActiveCertificate)
		return out, nil
	}
	if out.Key, err = jwkOf(c.Active); err != nil {
		return nil, err
	}
	out.Crt = splitPEM(c.ActiveCertificate)
	return out, nil
}

func (s *Service) exporter(providerID string) (providers.PrivateExporter, error) {
	prov, err := s.reg.Get(providerID)
	if err != nil {
		return nil, err
	}
	ex, _ := providers.As[providers.PrivateExporter](prov)
	return ex, nil
}

// KeyRefs returns the provider references of a chain's keys (active, previous, root; absent ones
// omitted), for diagnostics and tests that check a backend directly.
func (s *Service) KeyRefs(ctx context.Context, tenant, id string) (map[string]providers.KeyRef, error) {
	c, err := s.load(ctx, tenant, id)
	if err != nil {
		return nil, err
	}
	out := map[string]providers.KeyRef{}
	add := func(name string, k *store.KeyRef) error {
		if k == nil {
			return nil
		}
		r, err := keys.ProviderRef(*k, tenant)
		if err != nil {
			return err
		}
		out[name] = r
		return nil
	}
	for name, k := range map[string]*store.KeyRef{"active": &c.Active, "previous": c.Previous, "root": c.Root} {
		if err := add(name, k); err != nil {
			return nil, err
		}
	}
	return out, nil
}
