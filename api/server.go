// Package api is kmsgate's HTTP face: the remote-KMS contract EUDIPLO's http provider speaks
// (/keys, /health), the key-chain API, the admin API and /metrics, on Fiber.
package api

import (
	"context"
	"log/slog"
	"strings"
	"time"

	"github.com/gofiber/fiber/v2"
	"github.com/gofiber/fiber/v2/middleware/adaptor"
	"github.com/gofiber/fiber/v2/middleware/recover"

	"github.com/kmsgate/kmsgate/appliance/keychain"
	"github.com/kmsgate/kmsgate/appliance/keys"
	"github.com/kmsgate/kmsgate/appliance/tenants"
	"github.com/kmsgate/kmsgate/metrics"
	"github.com/kmsgate/kmsgate/providers"
)

// DefaultBodyLimit bounds request bodies: the largest legitimate body is a key-chain import with a
// certificate chain, well under 1 MiB.
const DefaultBodyLimit = 1 << 20

// HealthChecker reports provider health. The appliance probes in the background, at most one probe
// in flight per provider, so callers cannot turn /health into a probe flood.
type HealthChecker interface {
	// Check answers from a result at most about a second old, joining or starting the provider's
	// single in-flight probe when the last one is older (authenticated callers).
	Check(ctx context.Context, ids []string) []ProviderHealth
	// Last answers from the last result whatever its age; it waits only while a provider has never
	// been probed (anonymous callers).
	Last(ctx context.Context, ids []string) []ProviderHealth
	// Store reports the record store's health from the background monitor's last probe.
	Store() StoreHealth
}

// StoreHealth is the record store's health: the engine, and on failure a stable code
// (store_unavailable, probe_timeout, not_probed) with a short reason, never the engine's own text.
type StoreHealth struct {
	Backend   string `json:"backend"`
	OK        bool   `json:"ok"`
	LatencyMs int64  `json:"latencyMs"`
	Code      string `json:"code,omitempty"`
	Error     string `json:"error,omitempty"`
}

// ProviderHealth is one provider's health as callers see it: a stable code and a short reason,
// never the backend's own error text (it can carry URLs and network details; the log has it).
type ProviderHealth struct {
	ProviderID string `json:"providerId"`
	Type       string `json:"type"`
	OK         bool   `json:"ok"`
	LatencyMs  int64  `json:"latencyMs"`
	Code       string `json:"code,omitempty"`
	Error      string `json:"error,omitempty"`
}

// Health codes of a failing provider.
const (
	HealthTimeout   = "probe_timeout"
	HealthFailed    = "backend_unhealthy"
	HealthNotProbed = "not_probed"
)

// TenantCreator creates a tenant and bootstraps its default key chains (the appliance's one
// tenant-creation path, shared by the admin API, the CLI and dev mode).
type TenantCreator func(ctx context.Context, req tenants.CreateTenantRequest) (*TenantCreated, error)

// TenantCreated is the admin API's answer to a tenant creation: the tenant, its first API key and
// what the key-chain bootstrap created, skipped and failed to create.
type TenantCreated struct {
	*tenants.CreateTenantResult
	Bootstrap *keychain.BootstrapReport `json:"bootstrap,omitempty"`
}

// TokenVerifier verifies a bearer token that is not a kmsgate API key (an access token kmsgate or a
// trusted external issuer signed) and returns its principal. It must refuse a token whose
// credential or client has been revoked.
type TokenVerifier interface {
	VerifyToken(ctx context.Context, raw string) (*tenants.Principal, error)
}

// Deps are the services the API calls.
type Deps struct {
	Tenants *tenants.Service
	// Tokens verifies bearer tokens; nil refuses every bearer value that is not an API key.
	Tokens       TokenVerifier
	Keys         *keys.Service
	Registry     *providers.Registry
	Health       HealthChecker
	Metrics      *metrics.Metrics
	Logger       *slog.Logger
	KeyChains    KeyChainService
	CreateTenant TenantCreator
	BodyLimit    int
	// Limits are the per-credential rate limits.
	Limits RateLimits
	// MetricsElsewhere leaves /metrics off this app: the appliance serves it on its own listener.
	MetricsElsewhere bool
	// OAuth serves the token endpoint and the discovery documents (nil: not mounted).
	OAuth OAuthIssuer
	// KeyChainLegacyStatus answers PUT, DELETE and rotate of /key-chain with the older API's
	// 200, 200 and 201 instead of 204 (--keychain-legacy-status).
	KeyChainLegacyStatus bool
}

// Server holds the API's dependencies.
type Server struct {
	Deps
	log *slog.Logger
	// routes maps each registered route template to itself: the metrics label is the route
	// table's own string, never one built from the request.
	routes map[string]string

	createLimit, signLimit *limiterSet
}

const localPrincipal = "principal"

// New builds the public app: contract face, key-chain API, admin API (admin credential), health
// and metrics.
func New(d Deps) *fiber.App {
	s := &Server{Deps: d, log: d.Logger, createLimit: newLimiterSet(d.Limits.CreateRate, d.Limits.CreateBurst),
		signLimit: newLimiterSet(d.Limits.SignRate, d.Limits.SignBurst)}
	app := s.newApp()
	if !d.MetricsElsewhere {
		app.Get("/metrics", adaptor.HTTPHandler(d.Metrics.Handler()))
	}
	app.Get("/healthz", func(c *fiber.Ctx) error { return c.JSON(fiber.Map{"ok": true}) })
	app.Get("/health", s.optionalAuth, s.health)

	k := app.Group("/keys", s.auth)
	k.Post("/", s.limited(s.createLimit, s.requireRole(tenants.RoleManage), s.generate)...)
	k.Get("/:kid", s.requireAnyRole(tenants.RoleSign, tenants.RoleManage), s.getKey)
	k.Post("/:kid/sign", s.limited(s.signLimit, s.requireRole(tenants.RoleSign), s.sign)...)
	k.Post("/:kid/import", s.limited(s.createLimit, s.requireRole(tenants.RoleManage), s.importKey)...)
	k.Delete("/:kid", s.requireRole(tenants.RoleManage), s.deleteKey)

	s.mountKeyChains(app)

	adm := app.Group("/admin", s.auth, s.requireRole(tenants.RoleAdmin))
	s.mountAdmin(adm)
	s.mountOAuth(app)
	app.Use(func(c *fiber.Ctx) error {
		return problem(fiber.StatusNotFound, "route_not_found", "no route "+c.Method()+" "+c.Path())
	})
	s.indexRoutes(app)
	return app
}

// indexRoutes records the route table once every route is registered.
func (s *Server) indexRoutes(app *fiber.App) {
	s.routes = map[string]string{}
	for _, r := range app.GetRoutes() {
		s.routes[r.Path] = r.Path
	}
}

// NewAdmin builds the app served on the local admin socket: admin routes only, and every request is
// an admin (the socket's file permissions are the authentication).
func NewAdmin(d Deps) *fiber.App {
	s := &Server{Deps: d, log: d.Logger}
	app := s.newApp()
	adm := app.Group("/admin", func(c *fiber.Ctx) error {
		c.Locals(localPrincipal, &tenants.Principal{CredentialID: "local-socket", Roles: []string{tenants.RoleAdmin}})
		return c.Next()
	})
	s.mountAdmin(adm)
	s.indexRoutes(app)
	return app
}

func (s *Server) newApp() *fiber.App {
	limit := s.BodyLimit
	if limit == 0 {
		limit = DefaultBodyLimit
	}
	app := fiber.New(fiber.Config{
		AppName:               "kmsgate",
		DisableStartupMessage: true,
		BodyLimit:             limit,
		ReadTimeout:           30 * time.Second,
		WriteTimeout:          30 * time.Second,
		IdleTimeout:           120 * time.Second,
		ErrorHandler:          s.errorHandler,
		StrictRouting:         false,
		CaseSensitive:         true,
		ReadBufferSize:        8192,
	})
	app.Use(recover.New())
	app.Use(s.observe)
	return app
}

// observe records request metrics by route template, never by raw path (kids would explode the
// series count).
func (s *Server) observe(c *fiber.Ctx) error {
	start := time.Now()
	err := c.Next()
	status := c.Response().StatusCode()
	if err != nil {
		// Run the error handler here, so the recorded status is the one the client receives; a
		// nil result tells Fiber the error has been answered.
		if herr := s.errorHandler(c, err); herr == nil {
			err = nil
		}
		status = c.Response().StatusCode()
	}
	route, known := s.routes[c.Route().Path]
	if !known || (status == fiber.StatusNotFound && (route == "/" || route == "")) {
		route = "unmatched"
	}
	method := metrics.HTTPMethod(c.Method())
	s.Metrics.HTTPRequests.WithLabelValues(route, method, metrics.StatusCode(status)).Inc()
	s.Metrics.HTTPDuration.WithLabelValues(route, method).Observe(time.Since(start).Seconds())
	return err
}

// apiKeyFrom reads "Authorization: Bearer <key>" or "x-api-key: <key>". bearer says which: only a
// bearer value may be a token. The value points into the request buffer.
func apiKeyFrom(c *fiber.Ctx) (key string, bearer bool) {
	if h := c.Get(fiber.HeaderAuthorization); h != "" {
		if len(h) > 7 && strings.EqualFold(h[:7], "bearer ") {
			return strings.TrimSpace(h[7:]), true
		}
		return "", false
	}
	return c.Get("X-Api-Key"), false
}

// peerPin returns the SHA-256 pin of the client certificate the TLS connection presented. Plain
// connections and TLS ones without a certificate cost nothing beyond the check.
func peerPin(c *fiber.Ctx) (pin [32]byte, ok bool) {
	if !c.Context().IsTLS() {
		return pin, false
	}
	cs := c.Context().TLSConnectionState()
	if cs == nil || len(cs.PeerCertificates) == 0 {
		return pin, false
	}
	return tenants.SPKIPin(cs.PeerCertificates[0]), true
}

func unauthorized(c *fiber.Ctx, msg string) error {
	c.Set(fiber.HeaderWWWAuthenticate, `Bearer realm="kmsgate", error="invalid_token"`)
	return problem(fiber.StatusUnauthorized, "unauthorized", msg)
}

// auth authenticates the caller by whichever credentials it sent: an API key, a bearer token, a
// client certificate bound to a tenant, or a certificate together with a key or token. Every
// credential yields the same principal, so every route checks roles the same way.
func (s *Server) auth(c *fiber.Ctx) error {
	key, bearer := apiKeyFrom(c)
	pin, hasCert := peerPin(c)
	var certP *tenants.Principal
	if hasCert {
		certP = s.Tenants.AuthenticateCert(pin[:])
	}
	if key == "" {
		switch {
		case certP != nil:
			c.Locals(localPrincipal, certP)
			return c.Next()
		case hasCert:
			return unauthorized(c, "client certificate is not bound to a tenant (kmsgate tenant add-cert) and no API key was sent")
		case c.Get(fiber.HeaderAuthorization) != "":
			return unauthorized(c, "unsupported Authorization scheme: send Authorization: Bearer <key or token>")
		}
		c.Set(fiber.HeaderWWWAuthenticate, `Bearer realm="kmsgate"`)
		return problem(fiber.StatusUnauthorized, "unauthorized",
			"missing credentials: send Authorization: Bearer <API key or token>, x-api-key, or a bound client certificate")
	}
	var p *tenants.Principal
	if bearer && !tenants.IsAPIKey(key) {
		if s.Tokens == nil {
			return unauthorized(c, "invalid API key or token")
		}
		tp, err := s.Tokens.VerifyToken(c.UserContext(), strings.Clone(key))
		if err != nil || tp == nil {
			return unauthorized(c, "invalid, expired or revoked token")
		}
		p = tp
	} else {
		kp, err := s.Tenants.Authenticate(key)
		if err != nil {
			return unauthorized(c, "invalid or revoked API key")
		}
		p = kp
	}
	// A bound certificate and a key of another tenant: one of them is not the caller's, so
	// neither is trusted. The key's roles apply when both name the same tenant.
	if certP != nil && certP.TenantID != p.TenantID {
		return unauthorized(c, "the client certificate and the API key or token belong to different tenants")
	}
	c.Locals(localPrincipal, p)
	return c.Next()
}

// optionalAuth authenticates when a credential is sent (a wrong one is still a 401) and lets
// anonymous callers through, for /health.
func (s *Server) optionalAuth(c *fiber.Ctx) error {
	if key, _ := apiKeyFrom(c); key == "" && c.Get(fiber.HeaderAuthorization) == "" {
		if _, hasCert := peerPin(c); !hasCert {
			return c.Next()
		}
	}
	return s.auth(c)
}

func principal(c *fiber.Ctx) *tenants.Principal {
	p, _ := c.Locals(localPrincipal).(*tenants.Principal)
	return p
}

func (s *Server) requireRole(role string) fiber.Handler {
	return s.requireAnyRole(role)
}

func (s *Server) requireAnyRole(roles ...string) fiber.Handler {
	return func(c *fiber.Ctx) error {
		p := principal(c)
		for _, r := range roles {
			if p != nil && p.Has(r) {
				if r != tenants.RoleAdmin && p.TenantID == "" {
					break
				}
				return c.Next()
			}
		}
		return problem(fiber.StatusForbidden, "forbidden", "this credential lacks the "+strings.Join(roles, " or ")+" role")
	}
}
