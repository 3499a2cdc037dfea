// Package tenants manages tenants and their API credentials. An API key is shown once, at
// creation; only the SHA-256 of its secret half is stored, and verification compares in constant
// time. Verified credentials are served from memory so authentication costs no store read.
package tenants

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"regexp"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/kmsgate/kmsgate/appliance/store"
	"github.com/kmsgate/kmsgate/internal/errs"
	"github.com/kmsgate/kmsgate/providers"
)

// Roles a credential can carry.
const (
	RoleManage = "manage" // create/import/delete keys and key chains
	RoleSign   = "sign"   // sign with keys and key chains
	RoleExport = "export" // export private material of db key chains
	RoleAdmin  = "admin"  // manage tenants (not bound to a tenant)
)

// DefaultRoles are the roles of a key printed by `kmsgate tenant create` without --roles.
var DefaultRoles = []string{RoleManage, RoleSign}

var knownRoles = map[string]bool{RoleManage: true, RoleSign: true, RoleExport: true, RoleAdmin: true}

// keyPrefix marks kmsgate API keys so secret scanners can find leaked ones.
const keyPrefix = "kmsgate_"

// Principal is an authenticated caller. It is shared between requests: treat it as read-only.
type Principal struct {
	CredentialID    string
	TenantID        string
	Roles           []string
	DefaultProvider string
}

// Has reports whether the principal holds role.
func (p *Principal) Has(role string) bool { return slices.Contains(p.Roles, role) }

// Errors.
var (
	ErrUnauthenticated = errors.New("missing or invalid API key")
	ErrTenantExists    = errors.New("tenant already exists")
	ErrTenantNotFound  = errors.New("tenant not found")
	ErrCredNotFound    = errors.New("credential not found")
)

var idRe = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`)

// ValidID reports whether id is a valid tenant id: 1–64 of [A-Za-z0-9._-], starting alphanumeric.
func ValidID(id string) bool { return idRe.MatchString(id) }

// ProviderIDs lists the ids of the configured providers. The service calls it only when a tenant
// names providers, so a caller may load the configuration lazily (the offline CLI reads kms.json,
// whose placeholders need secrets in the environment, only when it must).
type ProviderIDs func() ([]string, error)

// Option configures a Service.
type Option func(*Service)

// WithProviders tells the service which provider ids exist, so that a tenant's allow-list and
// default provider are checked when it is created. Without it no provider id is known and a tenant
// that names one is refused.
func WithProviders(ids ProviderIDs) Option { return func(s *Service) { s.providerIDs = ids } }

// Service manages tenants and credentials.
type Service struct {
	st          *store.Store
	now         func() time.Time
	providerIDs ProviderIDs

	mu    sync.RWMutex
	creds map[string]*activeCred // by credential id; revoked ones removed
	pins  map[string]*activeCred // certificate bindings by SPKI SHA-256 (raw bytes as a string)
}

// activeCred is a verified-on-demand credential with its principal built once: credentials are
// immutable, so authentication hands out the same read-only principal every time.
type activeCred struct {
	hash      []byte
	spki      string // non-empty for a certificate binding
	principal *Principal
}

func newActiveCred(c *store.Credential) *activeCred {
	return &activeCred{hash: c.SecretHash, spki: string(c.SPKI), principal: &Principal{CredentialID: c.ID,
		TenantID: c.TenantID, Roles: c.Roles, DefaultProvider: c.DefaultProvider}}
}

// New loads every active credential into memory.
func New(ctx context.Context, st *store.Store, opts ...Option) (*Service, error) {
	s := &Service{st: st, now: time.Now, creds: map[string]*activeCred{}, pins: map[string]*activeCred{}}
	for _, o := range opts {
		o(s)
	}
	if err := s.Reload(ctx); err != nil {
		return nil, err
	}
	return s, nil
}

// Reload re-reads the credentials from the store.
func (s *Service) Reload(ctx context.Context) error {
	m, pins := map[string]*activeCred{}, map[string]*activeCred{}
	err := s.st.List(ctx, store.CredentialPrefix, func(_ string, val []byte) error {
		var c store.Credential
		if err := json.Unmarshal(val, &c); err != nil {
			return fmt.Errorf("decode credential: %w", err)
		}
		if c.RevokedAt == nil {
			ac := newActiveCred(&c)
			m[c.ID] = ac
			if ac.spki != "" {
				pins[ac.spki] = ac
			}
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("load credentials: %w", err)
	}
	s.mu.Lock()
	s.creds, s.pins = m, pins
	s.mu.Unlock()
	return nil
}

// Authenticate verifies an API key. The lookup is by the public id half; the secret half is
// compared by hash in constant time.
func (s *Service) Authenticate(key string) (*Principal, error) {
	id, secret, ok := splitKey(key)
	if !ok {
		return nil, ErrUnauthenticated
	}
	s.mu.RLock()
	c := s.creds[id]
	s.mu.RUnlock()
	h := sha256.Sum256([]byte(secret))
	if c == nil || len(c.hash) == 0 {
		// A certificate binding has no secret: its id is no API key. Spend the same comparison
		// on unknown ids so timing does not reveal which ids exist.
		subtle.ConstantTimeCompare(h[:], make([]byte, sha256.Size))
		return nil, ErrUnauthenticated
	}
	if subtle.ConstantTimeCompare(h[:], c.hash) != 1 {
		return nil, ErrUnauthenticated
	}
	return c.principal, nil
}

func splitKey(key string) (id, secret string, ok bool) {
	rest, ok := strings.CutPrefix(key, keyPrefix)
	if !ok {
		return "", "", false
	}
	id, secret, ok = strings.Cut(rest, "_")
	if !ok || len(id) != 16 || len(secret) < 43 {
		return "", "", false
	}
	return id, secret, true
}

// NewKeyResult is a freshly minted API key; Key is shown once and never stored.
type NewKeyResult struct {
	CredentialID string   `json:"credentialId"`
	Key          string   `json:"apiKey"`
	Roles        []string `json:"roles"`
}

// CreateTenantRequest creates a tenant and its first credential.
type CreateTenantRequest struct {
	ID               string   `json:"id"`
	Name             string   `json:"name,omitempty"`
	Roles            []string `json:"roles,omitempty"`
	AllowedProviders []string `json:"allowedProviders,omitempty"`
	DefaultProvider  string   `json:"defaultProvider,omitempty"`
}

// CreateTenantResult is printed by `kmsgate tenant create`.
type CreateTenantResult struct {
	ID     string   `json:"id"`
	Name   string   `json:"name"`
	APIKey string   `json:"apiKey"`
	Roles  []string `json:"roles"`
}

// ValidateRoles checks a role list for a tenant credential.
func ValidateRoles(roles []string) error {
	for _, r := range roles {
		if !knownRoles[r] {
			return fmt.Errorf("unknown role %q (known: manage, sign, export)", r)
		}
		if r == RoleAdmin {
			return errors.New("role admin cannot be given to a tenant credential")
		}
	}
	return nil
}

// CreateTenant creates a tenant with one API key.
func (s *Service) CreateTenant(ctx context.Context, req CreateTenantRequest) (*CreateTenantResult, error) {
	if !ValidID(req.ID) {
		return nil, fmt.Errorf("invalid tenant id %q: use 1-64 characters of A-Z a-z 0-9 . _ - starting with a letter or digit", req.ID)
	}
	if req.Name == "" {
		req.Name = req.ID
	}
	roles := req.Roles
	if len(roles) == 0 {
		roles = DefaultRoles
	}
	if err := ValidateRoles(roles); err != nil {
		return nil, err
	}
	if err := s.validateProviders(req.AllowedProviders, req.DefaultProvider); err != nil {
		return nil, err
	}
	t := store.Tenant{ID: req.ID, Name: req.Name, AllowedProviders: req.AllowedProviders,
		DefaultProvider: req.DefaultProvider, CreatedAt: s.now().UTC()}
	key, cred, err := s.mint(req.ID, roles, "initial")
	if err != nil {
		return nil, err
	}
	err = s.st.Update(ctx, func(tx *store.Txn) error {
		var existing store.Tenant
		if err := tx.Get(store.TenantKey(t.ID), &existing); err == nil {
			return ErrTenantExists
		} else if !errors.Is(err, store.ErrNotFound) {
			return err
		}
		if err := tx.Put(store.TenantKey(t.ID), t); err != nil {
			return err
		}
		return tx.Put(store.CredentialKey(cred.ID), cred)
	})
	if err != nil {
		return nil, err
	}
	s.remember(cred)
	return &CreateTenantResult{ID: t.ID, Name: t.Name, APIKey: key, Roles: roles}, nil
}

// validateProviders refuses provider ids that are not configured, and a default provider that the
// tenant's own allow-list excludes: such a tenant could never use its default.
func (s *Service) validateProviders(allowed []string, def string) error {
	if len(allowed) == 0 && def == "" {
		return nil
	}
	var known []string
	if s.providerIDs != nil {
		ids, err := s.providerIDs()
		if err != nil {
			return fmt.Errorf("cannot check the tenant's providers against the configuration: %w", err)
		}
		known = ids
	}
	for _, id := range append(slices.Clone(allowed), def) {
		if id != "" && !slices.Contains(known, id) {
			sorted := slices.Sorted(slices.Values(known))
			return errs.Errorf(errs.BadInput, "unknown provider %q (configured: %s)", id, strings.Join(sorted, ", ")).
				WithCode("unknown_provider")
		}
	}
	if def != "" && len(allowed) > 0 && !slices.Contains(allowed, def) {
		return errs.Errorf(errs.BadInput, "default provider %q is not in the tenant's allowed providers %v", def, allowed).
			WithCode("default_provider_not_allowed")
	}
	return nil
}

// EnsureTenant creates the tenant without a credential if it does not exist (config-folder import).
func (s *Service) EnsureTenant(ctx context.Context, id, name string) (created bool, err error) {
	if !ValidID(id) {
		return false, fmt.Errorf("invalid tenant id %q", id)
	}
	if name == "" {
		name = id
	}
	err = s.st.Create(ctx, store.TenantKey(id), store.Tenant{ID: id, Name: name, CreatedAt: s.now().UTC()})
	if errors.Is(err, store.ErrExists) {
		return false, nil
	}
	return err == nil, err
}

// AddKey mints another credential for an existing tenant ("" with RoleAdmin for an admin key).
func (s *Service) AddKey(ctx context.Context, tenantID string, roles []string, name string) (*NewKeyResult, error) {
	if tenantID != "" {
		if _, err := s.Tenant(ctx, tenantID); err != nil {
			return nil, err
		}
		if len(roles) == 0 {
			roles = DefaultRoles
		}
		if err := ValidateRoles(roles); err != nil {
			return nil, err
		}
	} else {
		roles = []string{RoleAdmin}
	}
	key, cred, err := s.mint(tenantID, roles, name)
	if err != nil {
		return nil, err
	}
	if err := s.st.Create(ctx, store.CredentialKey(cred.ID), cred); err != nil {
		return nil, err
	}
	s.remember(cred)
	return &NewKeyResult{CredentialID: cred.ID, Key: key, Roles: roles}, nil
}

func (s *Service) mint(tenantID string, roles []string, name string) (string, *store.Credential, error) {
	var idb [8]byte
	var sec [32]byte
	if _, err := rand.Read(idb[:]); err != nil {
		return "", nil, err
	}
	if _, err := rand.Read(sec[:]); err != nil {
		return "", nil, err
	}
	id := hex.EncodeToString(idb[:])
	secret := base64.RawURLEncoding.EncodeToString(sec[:])
	h := sha256.Sum256([]byte(secret))
	c := &store.Credential{ID: id, TenantID: tenantID, Name: name, SecretHash: h[:], Roles: slices.Clone(roles),
		CreatedAt: s.now().UTC()}
	return keyPrefix + id + "_" + secret, c, nil
}

func (s *Service) remember(c *store.Credential) {
	ac := newActiveCred(c)
	s.mu.Lock()
	if old := s.creds[c.ID]; old != nil && old.spki != "" && s.pins[old.spki] == old {
		delete(s.pins, old.spki)
	}
	s.creds[c.ID] = ac
	if ac.spki != "" {
		s.pins[ac.spki] = ac
	}
	s.mu.Unlock()
}

// Tenant returns one tenant.
func (s *Service) Tenant(ctx context.Context, id string) (*store.Tenant, error) {
	var t store.Tenant
	if err := s.st.Get(ctx, store.TenantKey(id), &t); err != nil {
		if errors.Is(err, store.ErrNotFound) {
			return nil, ErrTenantNotFound
		}
		return nil, err
	}
	return &t, nil
}

// TenantInfo is a tenant with its active credentials' ids (never secrets).
type TenantInfo struct {
	store.Tenant
	Credentials []CredentialInfo `json:"credentials"`
}

// CredentialInfo describes a credential without its secret.
type CredentialInfo struct {
	ID    string   `json:"id"`
	Roles []string `json:"roles"`
	// SPKI marks a client-certificate binding: the pin, as `tenant add-cert` printed it.
	SPKI      string    `json:"spki,omitempty"`
	Name      string    `json:"name,omitempty"`
	CreatedAt time.Time `json:"createdAt"`
}

// List returns every tenant with its active credentials.
func (s *Service) List(ctx context.Context) ([]TenantInfo, error) {
	var out []TenantInfo
	err := s.st.List(ctx, store.TenantPrefix, func(_ string, val []byte) error {
		var t store.Tenant
		if err := json.Unmarshal(val, &t); err != nil {
			return err
		}
		out = append(out, TenantInfo{Tenant: t, Credentials: []CredentialInfo{}})
		return nil
	})
	if err != nil {
		return nil, err
	}
	creds := map[string][]CredentialInfo{}
	err = s.st.List(ctx, store.CredentialPrefix, func(_ string, val []byte) error {
		var c store.Credential
		if err := json.Unmarshal(val, &c); err != nil {
			return err
		}
		if c.RevokedAt == nil {
			creds[c.TenantID] = append(creds[c.TenantID], CredentialInfo{ID: c.ID, Roles: c.Roles, Name: c.Name,
				SPKI: FormatPin(c.SPKI), CreatedAt: c.CreatedAt})
		}
		return nil
	})
	for i := range out {
		if c := creds[out[i].ID]; c != nil {
			out[i].Credentials = c
		}
	}
	return out, err
}

// RevokeTarget says what a revoke id names.
type RevokeTarget int

const (
	// RevokeAny takes the id as a credential id or a tenant id, and refuses an id that is both.
	RevokeAny RevokeTarget = iota
	// RevokeTenant revokes every credential of the tenant with that id.
	RevokeTenant
	// RevokeCredential revokes the one credential with that id.
	RevokeCredential
)

// Revoke revokes every credential of a tenant or one credential, as target says. It returns the
// ids revoked. With RevokeAny, an id that names both a tenant and a credential is refused: guessing
// would revoke either too much or too little.
func (s *Service) Revoke(ctx context.Context, id string, target RevokeTarget) ([]string, error) {
	var c store.Credential
	credErr := s.st.Get(ctx, store.CredentialKey(id), &c)
	if credErr != nil && !errors.Is(credErr, store.ErrNotFound) {
		return nil, credErr
	}
	var t store.Tenant
	tenErr := s.st.Get(ctx, store.TenantKey(id), &t)
	if tenErr != nil && !errors.Is(tenErr, store.ErrNotFound) {
		return nil, tenErr
	}
	isCred, isTenant := credErr == nil, tenErr == nil
	switch {
	case target == RevokeAny && isCred && isTenant:
		return nil, errs.Errorf(errs.Conflict, "%q is both a tenant id and a credential id: pass --tenant or "+
			"--credential to say which to revoke", id).WithCode("ambiguous_revoke_target")
	case target == RevokeTenant && !isTenant:
		return nil, fmt.Errorf("%w: no tenant %q", ErrCredNotFound, id)
	case target == RevokeCredential && !isCred:
		return nil, fmt.Errorf("%w: no credential %q", ErrCredNotFound, id)
	case target == RevokeAny && !isCred && !isTenant:
		return nil, fmt.Errorf("%w: no tenant or credential %q", ErrCredNotFound, id)
	}
	if target == RevokeCredential || (target == RevokeAny && isCred) {
		return s.revokeCredential(ctx, id)
	}
	return s.revokeTenant(ctx, id)
}

func (s *Service) revokeCredential(ctx context.Context, id string) ([]string, error) {
	var ids []string
	now := s.now().UTC()
	err := s.st.Update(ctx, func(tx *store.Txn) error {
		ids = ids[:0]
		var c store.Credential
		if err := tx.Get(store.CredentialKey(id), &c); err != nil {
			return err
		}
		if c.RevokedAt != nil {
			return nil
		}
		c.RevokedAt = &now
		ids = append(ids, c.ID)
		return tx.Put(store.CredentialKey(c.ID), c)
	})
	if err != nil {
		return nil, err
	}
	s.forgetCreds(ids)
	return ids, nil
}

func (s *Service) revokeTenant(ctx context.Context, tenant string) ([]string, error) {
	var active []store.Credential
	err := s.st.List(ctx, store.CredentialPrefix, func(_ string, val []byte) error {
		var c store.Credential
		if err := json.Unmarshal(val, &c); err != nil {
			return err
		}
		if c.TenantID == tenant && c.RevokedAt == nil {
			active = append(active, c)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	now := s.now().UTC()
	err = s.st.Update(ctx, func(tx *store.Txn) error {
		for _, c := range active {
			c.RevokedAt = &now
			if err := tx.Put(store.CredentialKey(c.ID), c); err != nil {
				return err
			}
		}
		var t store.Tenant
		if err := tx.Get(store.TenantKey(tenant), &t); err != nil {
			return err
		}
		if t.RevokedAt == nil {
			t.RevokedAt = &now
		}
		return tx.Put(store.TenantKey(tenant), &t)
	})
	if err != nil {
		return nil, err
	}
	ids := make([]string, 0, len(active))
	for _, c := range active {
		ids = append(ids, c.ID)
	}
	s.forgetCreds(ids)
	return ids, nil
}

// forgetCreds drops revoked credentials from the in-memory index, so they are refused at once.
func (s *Service) forgetCreds(ids []string) {
	s.mu.Lock()
	for _, id := range ids {
		if c := s.creds[id]; c != nil && c.spki != "" && s.pins[c.spki] == c {
			delete(s.pins, c.spki)
		}
		delete(s.creds, id)
	}
	s.mu.Unlock()
}

// ProviderSource is what ProviderFor needs from the provider registry.
type ProviderSource interface {
	Get(id string) (providers.Provider, error)
}

// ProviderFor resolves which provider a principal uses: an explicit request, else the credential's
// default, else the tenant's default, else the registry default. It also enforces the tenant's
// allow-list.
func (s *Service) ProviderFor(ctx context.Context, p *Principal, requested string, reg ProviderSource) (providers.Provider, error) {
	t, err := s.Tenant(ctx, p.TenantID)
	if err != nil {
		return nil, err
	}
	id := requested
	if id == "" {
		id = p.DefaultProvider
	}
	if id == "" {
		id = t.DefaultProvider
	}
	prov, err := reg.Get(id)
	if err != nil {
		return nil, err
	}
	if len(t.AllowedProviders) > 0 && !slices.Contains(t.AllowedProviders, prov.ID()) {
		return nil, errs.Errorf(errs.Forbidden, "tenant %q may not use provider %q", t.ID, prov.ID()).
			WithCode("provider_not_allowed")
	}
	return prov, nil
}

// IsAPIKey reports whether a credential value has the form of a kmsgate API key (a bearer value
// without the prefix is a token).
func IsAPIKey(v string) bool { return strings.HasPrefix(v, keyPrefix) }
