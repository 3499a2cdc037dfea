package extauth

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"slices"
	"strings"
	"sync"
	"time"

	jose "github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"

	"github.com/kmsgate/kmsgate/appliance/store"
	"github.com/kmsgate/kmsgate/appliance/tenants"
	"github.com/kmsgate/kmsgate/internal/errs"
)

const (
	// Leeway is the clock skew tolerated on exp and nbf.
	Leeway = 30 * time.Second
	// maxTokenBytes bounds what is parsed at all; real access tokens are a few KB.
	maxTokenBytes = 16 << 10
	// tenantTTL is how long a tenant's existence is remembered, so that a burst of requests does not
	// read the store each time while a change still shows within a second.
	tenantTTL = time.Second
	// maxTenantCache bounds the tenant cache; it is simply emptied when full.
	maxTenantCache = 4096
)

// CredentialPrefix marks the CredentialID of a principal authenticated by an external token.
const CredentialPrefix = "ext:"

// builtinRoles maps role names an external token may carry to kmsgate roles. EUDIPLO's own roles
// for its KMS client mean "create keys and sign with them"; kmsgate's tenant roles pass through.
// admin never does: an external issuer is trusted for tenants, not for the appliance.
var builtinRoles = map[string][]string{
	"issuance:manage":     {tenants.RoleManage, tenants.RoleSign},
	"presentation:manage": {tenants.RoleManage, tenants.RoleSign},
	tenants.RoleManage:    {tenants.RoleManage},
	tenants.RoleSign:      {tenants.RoleSign},
	tenants.RoleExport:    {tenants.RoleExport},
}

// roleOrder is the order of roles in a principal, for stable output.
var roleOrder = []string{tenants.RoleManage, tenants.RoleSign, tenants.RoleExport}

// TenantLookup is what the verifier needs from the tenants service: a tenant named by a token must
// exist. *tenants.Service fits.
type TenantLookup interface {
	Tenant(ctx context.Context, id string) (*store.Tenant, error)
}

// Option configures a Verifier.
type Option func(*Verifier)

// WithClock replaces time.Now (tests check exp/nbf without sleeping through the leeway).
func WithClock(now func() time.Time) Option { return func(v *Verifier) { v.now = now } }

// WithRefreshInterval sets the least time between two JWKS fetches of one issuer.
func WithRefreshInterval(d time.Duration) Option { return func(v *Verifier) { v.interval = d } }

// WithHTTPClient replaces the JWKS client (its redirect and timeout policy then is the caller's).
func WithHTTPClient(c *http.Client) Option { return func(v *Verifier) { v.client = c } }

// WithLogger sets where JWKS fetch failures and refused tokens are logged.
func WithLogger(l *slog.Logger) Option { return func(v *Verifier) { v.log = l } }

// Verifier checks external bearer tokens. It is safe for concurrent use.
type Verifier struct {
	tenants  TenantLookup
	now      func() time.Time
	interval time.Duration
	client   *http.Client
	log      *slog.Logger

	issuers map[string]*issuer
	names   []string
	algs    []jose.SignatureAlgorithm // union of every issuer's algorithms, for parsing

	tmu        sync.Mutex
	tenantSeen map[string]time.Time // tenant id → when its existence was last confirmed
}

type issuer struct {
	cfg   Issuer
	algs  []jose.SignatureAlgorithm
	roles map[string][]string
	keys  *keySet
}

// New builds a verifier for the configured issuers (validated by Parse). With no issuers every
// token is refused.
func New(issuers []Issuer, tl TenantLookup, opts ...Option) (*Verifier, error) {
	v := &Verifier{tenants: tl, now: time.Now, interval: DefaultRefreshInterval, log: slog.New(slog.DiscardHandler),
		issuers: map[string]*issuer{}, tenantSeen: map[string]time.Time{}}
	for _, o := range opts {
		o(v)
	}
	if v.client == nil {
		v.client = newHTTPClient()
	}
	for _, c := range issuers {
		if err := c.validate(); err != nil {
			return nil, err
		}
		if _, dup := v.issuers[c.Issuer]; dup {
			return nil, fmt.Errorf("duplicate issuer %q", c.Issuer)
		}
		is := &issuer{cfg: c, roles: map[string][]string{}, keys: newKeySet(c.JWKSURL, v.client, v.interval, v.now)}
		for _, a := range c.Algorithms {
			is.algs = append(is.algs, jose.SignatureAlgorithm(a))
			if !slices.Contains(v.algs, jose.SignatureAlgorithm(a)) {
				v.algs = append(v.algs, jose.SignatureAlgorithm(a))
			}
		}
		for k, r := range builtinRoles {
			is.roles[k] = r
		}
		for k, r := range c.RoleMap {
			is.roles[k] = r
		}
		v.issuers[c.Issuer] = is
		v.names = append(v.names, c.Issuer)
	}
	slices.Sort(v.names)
	return v, nil
}

// Issuers returns the configured issuer identifiers (exact iss values), sorted.
func (v *Verifier) Issuers() []string { return slices.Clone(v.names) }

// customClaims are read from the verified payload next to the registered claims.
type customClaims map[string]any

// VerifyToken verifies a compact JWS from an external issuer and returns its principal. Every
// refusal wraps tenants.ErrUnauthenticated; the reason is for logs, not for the caller. A store
// failure while checking the tenant is errs.Unavailable instead.
func (v *Verifier) VerifyToken(ctx context.Context, raw string) (*tenants.Principal, error) {
	if len(v.issuers) == 0 {
		return nil, refuse("no external issuer is configured")
	}
	if len(raw) > maxTokenBytes {
		return nil, refuse("token larger than %d bytes", maxTokenBytes)
	}
	// ParseSigned refuses any alg outside the union of configured algorithms, so "none" and HS*
	// never reach key selection.
	tok, err := jwt.ParseSigned(raw, v.algs)
	if err != nil {
		return nil, refuse("malformed token or algorithm not accepted: %v", err)
	}
	if len(tok.Headers) != 1 {
		return nil, refuse("token must carry exactly one signature")
	}
	hdr := tok.Headers[0]
	var unverified jwt.Claims
	if err := tok.UnsafeClaimsWithoutVerification(&unverified); err != nil {
		return nil, refuse("malformed claims: %v", err)
	}
	is := v.issuers[unverified.Issuer]
	if is == nil {
		return nil, refuse("issuer %q is not trusted", truncate(unverified.Issuer))
	}
	alg := jose.SignatureAlgorithm(hdr.Algorithm)
	if !slices.Contains(is.algs, alg) {
		return nil, refuse("issuer %q: algorithm %q is not accepted", is.cfg.Issuer, truncate(hdr.Algorithm))
	}
	keys, err := is.keys.lookup(ctx, hdr.KeyID)
	if err != nil {
		if errors.Is(err, errFetch) {
			v.log.WarnContext(ctx, "external issuer: JWKS fetch failed", "issuer", is.cfg.Issuer, "error", err)
		}
		return nil, refuse("issuer %q: no key for kid %q", is.cfg.Issuer, truncate(hdr.KeyID))
	}
	if len(keys) == 0 {
		return nil, refuse("issuer %q: no key for kid %q", is.cfg.Issuer, truncate(hdr.KeyID))
	}
	var std jwt.Claims
	var custom customClaims
	verified := false
	for _, k := range keys {
		if k.Algorithm != "" && k.Algorithm != hdr.Algorithm {
			continue
		}
		if !k.IsPublic() {
			continue
		}
		if err := tok.Claims(k.Key, &std, &custom); err == nil {
			verified = true
			break
		}
	}
	if !verified {
		return nil, refuse("issuer %q: signature does not verify with any key for kid %q", is.cfg.Issuer,
			truncate(hdr.KeyID))
	}
	if std.Expiry == nil {
		return nil, refuse("issuer %q: token has no exp", is.cfg.Issuer)
	}
	if err := std.ValidateWithLeeway(jwt.Expected{Issuer: is.cfg.Issuer, AnyAudience: jwt.Audience{is.cfg.Audience},
		Time: v.now()}, Leeway); err != nil {
		return nil, refuse("issuer %q: %v", is.cfg.Issuer, err)
	}
	if std.Subject == "" {
		return nil, refuse("issuer %q: token has no sub", is.cfg.Issuer)
	}
	tenant, ok := claim(custom, is.cfg.TenantClaim).(string)
	if !ok || !tenants.ValidID(tenant) {
		return nil, refuse("issuer %q: claim %q does not name a tenant", is.cfg.Issuer, is.cfg.TenantClaim)
	}
	roles := is.mapRoles(claim(custom, is.cfg.RolesClaim))
	if len(roles) == 0 {
		return nil, refuse("issuer %q: claim %q carries no kmsgate role", is.cfg.Issuer, is.cfg.RolesClaim)
	}
	if err := v.checkTenant(ctx, tenant); err != nil {
		return nil, err
	}
	return &tenants.Principal{CredentialID: credentialID(is.cfg.Issuer, std.Subject), TenantID: tenant, Roles: roles}, nil
}

// checkTenant confirms the tenant exists, remembering a confirmation for tenantTTL.
func (v *Verifier) checkTenant(ctx context.Context, id string) error {
	now := v.now()
	v.tmu.Lock()
	seen, ok := v.tenantSeen[id]
	v.tmu.Unlock()
	if ok && now.Sub(seen) >= 0 && now.Sub(seen) < tenantTTL {
		return nil
	}
	t, err := v.tenants.Tenant(ctx, id)
	if err != nil {
		if errors.Is(err, tenants.ErrTenantNotFound) {
			return refuse("tenant %q does not exist", id)
		}
		return errs.Wrap(errs.Unavailable, err, "cannot check the token's tenant")
	}
	if t.RevokedAt != nil {
		return refuse("tenant %q is revoked", id)
	}
	v.tmu.Lock()
	if len(v.tenantSeen) >= maxTenantCache {
		clear(v.tenantSeen)
	}
	v.tenantSeen[id] = now
	v.tmu.Unlock()
	return nil
}

// mapRoles turns a roles claim (space-separated string or array of strings) into kmsgate roles;
// names it does not know are ignored.
func (is *issuer) mapRoles(c any) []string {
	var names []string
	switch t := c.(type) {
	case string:
		names = strings.Fields(t)
	case []any:
		for _, e := range t {
			if s, ok := e.(string); ok {
				names = append(names, s)
			}
		}
	}
	got := map[string]bool{}
	for _, n := range names {
		for _, r := range is.roles[n] {
			got[r] = true
		}
	}
	var out []string
	for _, r := range roleOrder {
		if got[r] {
			out = append(out, r)
		}
	}
	return out
}

// claim looks name up as a top-level claim, then as a dotted path into nested objects.
func claim(c customClaims, name string) any {
	if v, ok := c[name]; ok {
		return v
	}
	var cur any = map[string]any(c)
	for part := range strings.SplitSeq(name, ".") {
		m, ok := cur.(map[string]any)
		if !ok {
			return nil
		}
		cur = m[part]
	}
	return cur
}

// credentialID names the external subject stably and without exposing it, so logs and per-credential
// rate limits key on it; iss is part of it because two issuers may both have a subject "admin".
func credentialID(iss, sub string) string {
	h := sha256.Sum256([]byte(iss + "\x00" + sub))
	return CredentialPrefix + hex.EncodeToString(h[:16])
}

func refuse(format string, args ...any) error {
	return fmt.Errorf("%w: "+format, append([]any{tenants.ErrUnauthenticated}, args...)...)
}

// truncate keeps attacker-controlled header values short in log lines.
func truncate(s string) string {
	if len(s) > 64 {
		return s[:64] + "…"
	}
	return s
}
