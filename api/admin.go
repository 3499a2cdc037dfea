package api

import (
	"context"
	"errors"
	"strings"

	"github.com/gofiber/fiber/v2"

	"github.com/kmsgate/kmsgate/appliance/tenants"
)

func (s *Server) mountAdmin(r fiber.Router) {
	r.Post("/tenants", s.adminCreateTenant)
	r.Get("/tenants", s.adminListTenants)
	r.Post("/tenants/:id/keys", s.adminAddKey)
	r.Post("/tenants/:id/certs", s.adminAddCert)
	// The tenants route keeps taking either kind of id (the CLI's plain `tenant revoke ID`), and
	// refuses an id that names both; ?target=tenant and the credentials route say which is meant.
	r.Post("/tenants/:id/revoke", func(c *fiber.Ctx) error {
		target := tenants.RevokeAny
		if c.Query("target") == "tenant" {
			target = tenants.RevokeTenant
		}
		return s.adminRevoke(c, target)
	})
	r.Post("/credentials/:id/revoke", func(c *fiber.Ctx) error { return s.adminRevoke(c, tenants.RevokeCredential) })
	r.Post("/system-key/rotate", s.adminRotateSystemKey)
}

// SystemKeyRotator is the optional ability of the token issuer to rotate the system key.
type SystemKeyRotator interface {
	RotateSystemKey(ctx context.Context) (kid string, err error)
}

// adminRotateSystemKey makes a new system key sign tokens from now on; the old one stays published
// (and its tokens accepted) until the next rotation.
func (s *Server) adminRotateSystemKey(c *fiber.Ctx) error {
	rot, ok := s.OAuth.(SystemKeyRotator)
	if !ok {
		return problem(fiber.StatusNotFound, "not_supported", "this server issues no access tokens")
	}
	kid, err := rot.RotateSystemKey(c.UserContext())
	if err != nil {
		return err
	}
	return c.JSON(fiber.Map{"kid": kid})
}

func (s *Server) adminCreateTenant(c *fiber.Ctx) error {
	var req tenants.CreateTenantRequest
	if err := decodeJSON(c, &req); err != nil {
		return err
	}
	if !tenants.ValidID(req.ID) {
		return problem(fiber.StatusBadRequest, "invalid_tenant_id",
			"tenant id must be 1-64 characters of A-Z a-z 0-9 . _ - starting with a letter or digit")
	}
	if err := tenants.ValidateRoles(req.Roles); err != nil {
		return problem(fiber.StatusBadRequest, "invalid_roles", err.Error())
	}
	create := s.CreateTenant
	if create == nil {
		// No key chains wired (API-only tests): the tenant alone, no bootstrap report.
		create = func(ctx context.Context, req tenants.CreateTenantRequest) (*TenantCreated, error) {
			res, err := s.Tenants.CreateTenant(ctx, req)
			if err != nil {
				return nil, err
			}
			return &TenantCreated{CreateTenantResult: res}, nil
		}
	}
	// 201 with the bootstrap report even when some default key chains could not be made: the
	// tenant and its API key (shown only now) exist; the report says what is missing, and the
	// failed usage types are retried in the background.
	res, err := create(c.UserContext(), req)
	if errors.Is(err, tenants.ErrTenantExists) {
		return problem(fiber.StatusConflict, "tenant_exists", "tenant "+req.ID+" already exists")
	}
	if err != nil {
		return err
	}
	return c.Status(fiber.StatusCreated).JSON(res)
}

func (s *Server) adminListTenants(c *fiber.Ctx) error {
	ts, err := s.Tenants.List(c.UserContext())
	if err != nil {
		return err
	}
	if ts == nil {
		ts = []tenants.TenantInfo{}
	}
	return c.JSON(ts)
}

type addKeyRequest struct {
	Roles []string `json:"roles"`
	Name  string   `json:"name"`
}

func (s *Server) adminAddKey(c *fiber.Ctx) error {
	var req addKeyRequest
	if err := decodeJSON(c, &req); err != nil {
		return err
	}
	if err := tenants.ValidateRoles(req.Roles); err != nil {
		return problem(fiber.StatusBadRequest, "invalid_roles", err.Error())
	}
	res, err := s.Tenants.AddKey(c.UserContext(), strings.Clone(c.Params("id")), req.Roles, req.Name)
	if err != nil {
		return err
	}
	return c.Status(fiber.StatusCreated).JSON(res)
}

type addCertRequest struct {
	Certificate string   `json:"certificate"` // PEM
	Roles       []string `json:"roles"`
	Name        string   `json:"name"`
}

func (s *Server) adminAddCert(c *fiber.Ctx) error {
	var req addCertRequest
	if err := decodeJSON(c, &req); err != nil {
		return err
	}
	if req.Certificate == "" {
		return problem(fiber.StatusBadRequest, "missing_field", `field "certificate" (PEM) is required`)
	}
	if err := tenants.ValidateRoles(req.Roles); err != nil {
		return problem(fiber.StatusBadRequest, "invalid_roles", err.Error())
	}
	res, err := s.Tenants.AddCert(c.UserContext(), strings.Clone(c.Params("id")), []byte(req.Certificate), req.Roles, req.Name)
	if err != nil {
		return err
	}
	return c.Status(fiber.StatusCreated).JSON(res)
}

func (s *Server) adminRevoke(c *fiber.Ctx, target tenants.RevokeTarget) error {
	ids, err := s.Tenants.Revoke(c.UserContext(), strings.Clone(c.Params("id")), target)
	if errors.Is(err, tenants.ErrCredNotFound) {
		return problem(fiber.StatusNotFound, "not_found", err.Error())
	}
	if err != nil {
		return err
	}
	if ids == nil {
		ids = []string{}
	}
	return c.JSON(fiber.Map{"revoked": ids})
}
