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

// mountKeyChains registers the /key-chain routes and the tenant-wide /jwks. Fixed paths
// (providers, providers/health, import, usage/…) are registered before /:id so they win.
func (s *Server) mountKeyChains(app *fiber.App) {
	if s.KeyChains == nil {
		return
	}
	read := s.requireAnyRole(tenants.RoleManage, tenants.RoleSign)
	manage := s.requireRole(tenants.RoleManage)
	sign := s.requireRole(tenants.RoleSign)
	// Export hands out private keys of db chains: only the dedicated export role, not manage.
	export := s.requireRole(tenants.RoleExport)

	kc := app.Group("/key-chain", s.auth)
	kc.Get("/providers", read, s.kcProviders)
	kc.Get("/providers/health", read, s.kcProvidersHealth)
	kc.Post("/import", s.limited(s.createLimit, manage, s.kcImport)...)
	// Sign by usage type: statusList falls back to the tenant's attestation chain.
	kc.Post("/usage/:usage/jws", s.limited(s.signLimit, sign, s.kcUsage(s.kcJWS))...)
	kc.Post("/usage/:usage/sign", s.limited(s.signLimit, sign, s.kcUsage(s.kcSign))...)
	kc.Get("/", read, s.kcList)
	kc.Post("/", s.limited(s.createLimit, manage, s.kcCreate)...)
	kc.Get("/:id", read, s.kcGet)
	kc.Put("/:id", manage, s.kcUpdate)
	kc.Delete("/:id", manage, s.kcDelete)
	kc.Post("/:id/rotate", s.limited(s.createLimit, manage, s.kcRotate)...)
	kc.Get("/:id/export", export, s.kcExport)
	kc.Post("/:id/sign", s.limited(s.signLimit, sign, s.kcSign)...)
	kc.Post("/:id/jws", s.limited(s.signLimit, sign, s.kcJWS)...)
	kc.Get("/:id/jwks", read, s.kcJWKS)

	app.Get("/jwks", s.auth, read, func(c *fiber.Ctx) error {
		set, err := s.KeyChains.TenantJWKS(c.UserContext(), principal(c).TenantID)
		if err != nil {
			return err
		}
		return c.JSON(set)
	})
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
	if err := decodeJSON(c, &req); err != nil {
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
	if err := decodeJSON(c, &req); err != nil {
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
	if err := decodeJSON(c, &req); err != nil {
		return err
	}
	if err := s.KeyChains.Update(c.UserContext(), principal(c).TenantID, chainID(c), req); err != nil {
		return err
	}
	return c.SendStatus(fiber.StatusOK)
}

func (s *Server) kcDelete(c *fiber.Ctx) error {
	if err := s.KeyChains.Delete(c.UserContext(), principal(c).TenantID, chainID(c)); err != nil {
		return err
	}
	return c.SendStatus(fiber.StatusOK)
}

func (s *Server) kcRotate(c *fiber.Ctx) error {
	if err := s.KeyChains.Rotate(c.UserContext(), principal(c).TenantID, chainID(c), "manual"); err != nil {
		return err
	}
	return c.SendStatus(fiber.StatusCreated)
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
	if err := decodeJSON(c, &b); err != nil {
		return err
	}
	if (b.Data == nil) == (b.Digest == nil) {
		return problem(fiber.StatusBadRequest, "validation_failed", "send exactly one of data and digest (base64)")
	}
	req := keychain.SignRequest{Alg: b.Alg}
	var err error
	if b.Data != nil {
		if req.Data, err = decodeB64("data", []byte(*b.Data)); err != nil {
			return err
		}
		if req.Data == nil {
			req.Data = []byte{}
		}
	} else if req.Digest, err = decodeB64("digest", []byte(*b.Digest)); err != nil {
		return err
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
	if err := decodeJSON(c, &b); err != nil {
		return err
	}
	if len(b.Payload) == 0 {
		return problem(fiber.StatusBadRequest, "validation_failed", "payload is required")
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
