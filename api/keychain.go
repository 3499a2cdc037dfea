package api

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"strings"

	"github.com/gofiber/fiber/v2"

	"github.com/kmsgate/kmsgate/appliance/keychain"
	"github.com/kmsgate/kmsgate/appliance/tenants"
)

// KeyChainService is what the /key-chain routes need from appliance/keychain. Every method is
// scoped to the caller's tenant, which the handlers take from the credential only (never from the
// URL or body), so another tenant's id is indistinguishable from a missing one (404).
type KeyChainService interface {
	Create(ctx context.Context, p *tenants.Principal, req keychain.CreateRequest) (string, error)
	Import(ctx context.Context, p *tenants.Principal, req keychain.ImportRequest) (string, error)
	Get(ctx context.Context, tenant, id string) (*keychain.Response, error)
	List(ctx context.Context, tenant, usageType string) ([]keychain.Response, error)
	Update(ctx context.Context, tenant, id string, req keychain.UpdateRequest) error
	Delete(ctx context.Context, tenant, id string) error
	Rotate(ctx context.Context, tenant, id, trigger string) error
	Export(ctx context.Context, tenant, id string) (*keychain.Export, error)
	Providers(ctx context.Context, p *tenants.Principal) (*keychain.ProvidersResponse, error)
	Sign(ctx context.Context, tenant, id string, req keychain.SignRequest) (*keychain.SignResult, error)
	JWS(ctx context.Context, tenant, id string, req keychain.JWSRequest) (*keychain.JWSResult, error)
	ChainJWKS(ctx context.Context, tenant, id string) (*keychain.JWKS, error)
	TenantJWKS(ctx context.Context, tenant string) (*keychain.JWKS, error)
	ResolveUsage(ctx context.Context, tenant, usage string) (string, error)
}

// keyChainPrefixes are where the key-chain routes are served: bare (the older EUDIPLO API and its
// e2e tests) and under EUDIPLO's global prefix "api", as upstream serves them in production.
// Both are route templates of their own, so the metrics' route label stays a closed set.
var keyChainPrefixes = []string{"/key-chain", "/api/key-chain"}

// mountKeyChains registers the /key-chain routes under each prefix, with the same authentication,
// roles and limits, and the tenant-wide /jwks (bare only: it is kmsgate's, not EUDIPLO's).
func (s *Server) mountKeyChains(app *fiber.App) {
	if s.KeyChains == nil {
		return
	}
	for _, prefix := range keyChainPrefixes {
		// kcErrors first, so a 400 from any handler of the group, authentication included, is
		// answered in the two-sided body.
		s.keyChainRoutes(app.Group(prefix, s.kcErrors, s.auth))
	}

	read := s.requireAnyRole(tenants.RoleManage, tenants.RoleSign)
	app.Get("/jwks", s.auth, read, func(c *fiber.Ctx) error {
		set, err := s.KeyChains.TenantJWKS(c.UserContext(), principal(c).TenantID)
		if err != nil {
			return err
		}
		return c.JSON(set)
	})
}

// keyChainRoutes registers the key-chain routes on r, one prefix's group. Fixed paths
// (providers, providers/health, import, usage/…) are registered before /:id so they win.
func (s *Server) keyChainRoutes(r fiber.Router) {
	read := s.requireAnyRole(tenants.RoleManage, tenants.RoleSign)
	manage := s.requireRole(tenants.RoleManage)
	sign := s.requireRole(tenants.RoleSign)
	// Export hands out private keys of db chains: only the dedicated export role, not manage.
	export := s.requireRole(tenants.RoleExport)

	r.Get("/providers", read, s.kcProviders)
	r.Get("/providers/health", read, s.kcProvidersHealth)
	// providers/config routes are mounted here (kcconfig)
	r.Post("/import", s.limited(s.createLimit, manage, s.kcImport)...)
	// Sign by usage type: statusList falls back to the tenant's attestation chain.
	r.Post("/usage/:usage/jws", s.limited(s.signLimit, sign, s.kcUsage(s.kcJWS))...)
	r.Post("/usage/:usage/sign", s.limited(s.signLimit, sign, s.kcUsage(s.kcSign))...)
	r.Get("/", read, s.kcList)
	r.Post("/", s.limited(s.createLimit, manage, s.kcCreate)...)
	r.Get("/:id", read, s.kcGet)
	r.Put("/:id", manage, s.kcUpdate)
	r.Delete("/:id", manage, s.kcDelete)
	r.Post("/:id/rotate", s.limited(s.createLimit, manage, s.kcRotate)...)
	r.Get("/:id/export", export, s.kcExport)
	r.Post("/:id/sign", s.limited(s.signLimit, sign, s.kcSign)...)
	r.Post("/:id/jws", s.limited(s.signLimit, sign, s.kcJWS)...)
	r.Get("/:id/jwks", read, s.kcJWKS)
}

// Success statuses of the key-chain writes without a result. EUDIPLO now answers 204 to all
// three; the older API (and kmsgate before it) 200, 200 and 201, which KeyChainLegacyStatus
// restores. Either way the body is empty.
const (
	legacyUpdateStatus = fiber.StatusOK
	legacyDeleteStatus = fiber.StatusOK
	legacyRotateStatus = fiber.StatusCreated
)

// noContent answers a key-chain write: 204, or status under the legacy switch; no body, no
// content type.
func (s *Server) noContent(c *fiber.Ctx, legacy int) error {
	status := fiber.StatusNoContent
	if s.KeyChainLegacyStatus {
		status = legacy
	}
	c.Status(status)
	c.Response().ResetBody()
	c.Response().Header.Del(fiber.HeaderContentType)
	return nil
}

// chainID is the :id of the route, or the id resolved from :usage by kcUsage. The param is
// cloned: the service keys its per-chain locks and caches by it, and Fiber's params point into a
// reused request buffer.
func chainID(c *fiber.Ctx) string {
	if id, ok := c.Locals("keyChainID").(string); ok {
		return id
	}
	return strings.Clone(c.Params("id"))
}

func (s *Server) kcUsage(next fiber.Handler) fiber.Handler {
	return func(c *fiber.Ctx) error {
		id, err := s.KeyChains.ResolveUsage(c.UserContext(), principal(c).TenantID, strings.Clone(c.Params("usage")))
		if err != nil {
			return err
		}
		c.Locals("keyChainID", id)
		return next(c)
	}
}

func (s *Server) kcProviders(c *fiber.Ctx) error {
	res, err := s.KeyChains.Providers(c.UserContext(), principal(c))
	if err != nil {
		return err
	}
	return c.JSON(res)
}

// kcProvidersHealth probes the tenant's providers in parallel under the monitor's deadline; one
// failing provider is reported in its entry and never fails the call.
func (s *Server) kcProvidersHealth(c *fiber.Ctx) error {
	res, err := s.KeyChains.Providers(c.UserContext(), principal(c))
	if err != nil {
		return err
	}
	ids := make([]string, len(res.Providers))
	for i, p := range res.Providers {
		ids[i] = p.Name
	}
	if len(ids) == 0 {
		return c.JSON([]any{})
	}
	return c.JSON(s.Health.Check(c.UserContext(), ids))
}

func (s *Server) kcList(c *fiber.Ctx) error {
	res, err := s.KeyChains.List(c.UserContext(), principal(c).TenantID, strings.Clone(c.Query("usageType")))
	if err != nil {
		return err
	}
	return c.JSON(res)
}

func (s *Server) kcGet(c *fiber.Ctx) error {
	res, err := s.KeyChains.Get(c.UserContext(), principal(c).TenantID, chainID(c))
	if err != nil {
		return err
	}
	return c.JSON(res)
}

func (s *Server) kcCreate(c *fiber.Ctx) error {
	var req keychain.CreateRequest
	if err := kcDecode(c, &req); err != nil {
		return err
	}
	id, err := s.KeyChains.Create(c.UserContext(), principal(c), req)
	if err != nil {
		return err
	}
	return c.Status(fiber.StatusCreated).JSON(fiber.Map{"id": id})
}

func (s *Server) kcImport(c *fiber.Ctx) error {
	var req keychain.ImportRequest
	if err := kcDecode(c, &req); err != nil {
		return err
	}
	id, err := s.KeyChains.Import(c.UserContext(), principal(c), req)
	if err != nil {
		return err
	}
	return c.Status(fiber.StatusCreated).JSON(fiber.Map{"id": id})
}

func (s *Server) kcUpdate(c *fiber.Ctx) error {
	var req keychain.UpdateRequest
	if err := kcDecode(c, &req); err != nil {
		return err
	}
	if err := s.KeyChains.Update(c.UserContext(), principal(c).TenantID, chainID(c), req); err != nil {
		return err
	}
	return s.noContent(c, legacyUpdateStatus)
}

func (s *Server) kcDelete(c *fiber.Ctx) error {
	if err := s.KeyChains.Delete(c.UserContext(), principal(c).TenantID, chainID(c)); err != nil {
		return err
	}
	return s.noContent(c, legacyDeleteStatus)
}

func (s *Server) kcRotate(c *fiber.Ctx) error {
	if err := s.KeyChains.Rotate(c.UserContext(), principal(c).TenantID, chainID(c), "manual"); err != nil {
		return err
	}
	return s.noContent(c, legacyRotateStatus)
}

func (s *Server) kcExport(c *fiber.Ctx) error {
	res, err := s.KeyChains.Export(c.UserContext(), principal(c).TenantID, chainID(c))
	if err != nil {
		return err
	}
	// Private keys: never cache.
	c.Set(fiber.HeaderCacheControl, "no-store")
	return c.JSON(res)
}

type kcSignBody struct {
	Data   *string `json:"data,omitempty"`
	Digest *string `json:"digest,omitempty"`
	Alg    string  `json:"alg,omitempty"`
}

func (s *Server) kcSign(c *fiber.Ctx) error {
	var b kcSignBody
	if err := kcDecode(c, &b); err != nil {
		return err
	}
	if (b.Data == nil) == (b.Digest == nil) {
		return &apiError{status: fiber.StatusBadRequest, code: "validation_failed", msg: "send exactly one of data and digest (base64)",
			path: []any{}, issue: keychain.IssueCustom}
	}
	req := keychain.SignRequest{Alg: b.Alg}
	var err error
	if b.Data != nil {
		if req.Data, err = decodeB64("data", []byte(*b.Data)); err != nil {
			return placeAt(err, keychain.IssueInvalidFormat, "data")
		}
		if req.Data == nil {
			req.Data = []byte{}
		}
	} else if req.Digest, err = decodeB64("digest", []byte(*b.Digest)); err != nil {
		return placeAt(err, keychain.IssueInvalidFormat, "digest")
	} else if req.Digest == nil {
		req.Digest = []byte{}
	}
	res, err := s.KeyChains.Sign(c.UserContext(), principal(c).TenantID, chainID(c), req)
	if err != nil {
		return err
	}
	return c.JSON(fiber.Map{"signature": base64.RawURLEncoding.EncodeToString(res.Signature), "kid": res.KID})
}

type kcJWSBody struct {
	Payload json.RawMessage `json:"payload"`
	Header  map[string]any  `json:"header,omitempty"`
	X5C     string          `json:"x5c,omitempty"`
}

func (s *Server) kcJWS(c *fiber.Ctx) error {
	var b kcJWSBody
	if err := kcDecode(c, &b); err != nil {
		return err
	}
	if len(b.Payload) == 0 {
		return &apiError{status: fiber.StatusBadRequest, code: "validation_failed", msg: "payload is required",
			path: []any{"payload"}, issue: keychain.IssueInvalidType}
	}
	res, err := s.KeyChains.JWS(c.UserContext(), principal(c).TenantID, chainID(c),
		keychain.JWSRequest{Payload: b.Payload, Header: b.Header, X5C: b.X5C})
	if err != nil {
		return err
	}
	return c.JSON(res)
}

func (s *Server) kcJWKS(c *fiber.Ctx) error {
	res, err := s.KeyChains.ChainJWKS(c.UserContext(), principal(c).TenantID, chainID(c))
	if err != nil {
		return err
	}
	return c.JSON(res)
}
