package api

import (
	"encoding/base64"
	"net/url"
	"strings"

	"github.com/gofiber/fiber/v2"

	"github.com/kmsgate/kmsgate/appliance/keys"
	"github.com/kmsgate/kmsgate/providers"
	"github.com/kmsgate/kmsgate/providers/keyutil"
)

// kidParam percent-decodes the {kid} path segment (EUDIPLO sends encodeURIComponent(kid)). The
// result is cloned because Fiber's params point into a reused request buffer.
func kidParam(c *fiber.Ctx) (string, error) {
	raw := c.Params("kid")
	kid, err := url.PathUnescape(raw)
	if err != nil {
		return "", problem(fiber.StatusBadRequest, "invalid_kid", "kid is not valid percent-encoding")
	}
	if err := keys.ValidateKID(kid); err != nil {
		return "", err
	}
	return strings.Clone(kid), nil
}

type generateRequest struct {
	KID         string `json:"kid"`
	Alg         string `json:"alg"`
	KMSProvider string `json:"kmsProvider"`
}

type publicKeyResponse struct {
	PublicJWK   keyutil.JWK `json:"publicJwk"`
	KMSProvider string      `json:"kmsProvider,omitempty"`
}

func (s *Server) generate(c *fiber.Ctx) error {
	var req generateRequest
	if err := decodeJSON(c, &req); err != nil {
		return err
	}
	if req.KID == "" {
		return problem(fiber.StatusBadRequest, "missing_field", `field "kid" is required`)
	}
	p := principal(c)
	prov, err := s.Tenants.ProviderFor(c.UserContext(), p, req.KMSProvider, s.Registry)
	if err != nil {
		return err
	}
	ki, err := s.Keys.Generate(c.UserContext(), p.TenantID, req.KID, req.Alg, prov)
	if err != nil {
		return err
	}
	return c.JSON(publicKeyResponse{PublicJWK: ki.PublicJWK, KMSProvider: ki.ProviderID})
}

type importRequest struct {
	PrivateJWK  *keyutil.JWK `json:"privateJwk"`
	Alg         string       `json:"alg"`
	KMSProvider string       `json:"kmsProvider"`
}

func (s *Server) importKey(c *fiber.Ctx) error {
	kid, err := kidParam(c)
	if err != nil {
		return err
	}
	var req importRequest
	if err := decodeJSON(c, &req); err != nil {
		return err
	}
	if req.PrivateJWK == nil {
		return problem(fiber.StatusBadRequest, "missing_field", `field "privateJwk" is required`)
	}
	p := principal(c)
	prov, err := s.Tenants.ProviderFor(c.UserContext(), p, req.KMSProvider, s.Registry)
	if err != nil {
		return err
	}
	// Capability first: a provider that cannot import answers 405 whatever the JWK holds.
	if !prov.Capabilities().CanImport {
		return problem(fiber.StatusMethodNotAllowed, "import_not_supported",
			"provider "+prov.ID()+" ("+prov.Type()+") cannot import keys: generate them in the backend instead")
	}
	if req.Alg != "" && req.Alg != providers.ES256 {
		return problem(fiber.StatusBadRequest, "unsupported_alg", "unsupported alg "+req.Alg+" (supported: ES256)")
	}
	if req.PrivateJWK.Alg != "" && req.PrivateJWK.Alg != providers.ES256 {
		return problem(fiber.StatusUnprocessableEntity, "invalid_jwk", "jwk: alg "+req.PrivateJWK.Alg+" is not ES256")
	}
	priv, err := keyutil.ParsePrivateJWK(*req.PrivateJWK)
	if err != nil {
		return problem(fiber.StatusUnprocessableEntity, "invalid_jwk", err.Error())
	}
	ki, err := s.Keys.Import(c.UserContext(), p.TenantID, kid, req.Alg, prov, priv)
	if err != nil {
		return err
	}
	return c.JSON(publicKeyResponse{PublicJWK: ki.PublicJWK, KMSProvider: ki.ProviderID})
}

func (s *Server) getKey(c *fiber.Ctx) error {
	kid, err := kidParam(c)
	if err != nil {
		return err
	}
	ki, err := s.Keys.Get(c.UserContext(), principal(c).TenantID, kid)
	if err != nil {
		return err
	}
	if c.Accepts(fiber.MIMEApplicationJSON, "application/x-pem-file") == "application/x-pem-file" {
		pub, err := keyutil.ParsePublicJWK(ki.PublicJWK)
		if err != nil {
			return err
		}
		pem, err := keyutil.PublicPEM(pub)
		if err != nil {
			return err
		}
		c.Set(fiber.HeaderContentType, "application/x-pem-file")
		return c.Send(pem)
	}
	return c.JSON(publicKeyResponse{PublicJWK: ki.PublicJWK, KMSProvider: ki.ProviderID})
}

func (s *Server) deleteKey(c *fiber.Ctx) error {
	kid, err := kidParam(c)
	if err != nil {
		return err
	}
	if err := s.Keys.Delete(c.UserContext(), principal(c).TenantID, kid); err != nil {
		return err
	}
	return c.SendStatus(fiber.StatusNoContent)
}

type signRequest struct {
	Data   *string `json:"data"`
	Digest *string `json:"digest"`
	Alg    string  `json:"alg"`
	// SignatureFormat "der" returns standard base64 of the DER ECDSA-Sig-Value (for openssl);
	// the default "raw" returns base64url of r‖s, as the contract requires.
	SignatureFormat string `json:"signatureFormat"`
}

// sign is the hot path: one strict decode, one cached lookup, the provider call, a hand-built
// response.
func (s *Server) sign(c *fiber.Ctx) error {
	kid, err := kidParam(c)
	if err != nil {
		return err
	}
	var req signRequest
	if err := decodeJSON(c, &req); err != nil {
		return err
	}
	var input []byte
	isDigest := false
	switch {
	case req.Data != nil && req.Digest != nil:
		return problem(fiber.StatusBadRequest, "invalid_request", `send either "data" or "digest", not both`)
	case req.Data != nil:
		if input, err = decodeB64("data", *req.Data); err != nil {
			return err
		}
	case req.Digest != nil:
		if input, err = decodeB64("digest", *req.Digest); err != nil {
			return err
		}
		isDigest = true
	default:
		return problem(fiber.StatusBadRequest, "missing_field", `field "data" (base64 message) is required`)
	}
	der := false
	switch req.SignatureFormat {
	case "", "raw":
	case "der":
		der = true
	default:
		return problem(fiber.StatusBadRequest, "invalid_format", `signatureFormat must be "raw" or "der"`)
	}
	sig, err := s.Keys.Sign(c.UserContext(), principal(c).TenantID, kid, req.Alg, input, isDigest)
	if err != nil {
		return err
	}
	enc := base64.RawURLEncoding
	if der {
		if sig, err = keyutil.RawToDER(sig); err != nil {
			return err
		}
		enc = base64.StdEncoding
	}
	out := make([]byte, 0, 16+enc.EncodedLen(len(sig)))
	out = append(out, `{"signature":"`...)
	out = enc.AppendEncode(out, sig)
	out = append(out, `"}`...)
	c.Set(fiber.HeaderContentType, fiber.MIMEApplicationJSON)
	return c.Send(out)
}

type healthResponse struct {
	OK         bool                     `json:"ok"`
	Providers  []providers.HealthReport `json:"providers,omitempty"`
	Extensions []string                 `json:"extensions"`
}

// health answers 200 while the caller's providers are healthy and 503 otherwise. An anonymous
// caller gets the appliance-wide answer without provider details.
func (s *Server) health(c *fiber.Ctx) error {
	p := principal(c)
	var ids []string
	if p != nil && p.TenantID != "" {
		t, err := s.Tenants.Tenant(c.UserContext(), p.TenantID)
		if err != nil {
			return err
		}
		ids = t.AllowedProviders
	}
	reports := s.Health.Check(c.UserContext(), ids)
	ok := true
	for _, r := range reports {
		ok = ok && r.OK
	}
	resp := healthResponse{OK: ok, Extensions: []string{"digest"}}
	if p != nil {
		resp.Providers = reports
	}
	if !ok {
		c.Status(fiber.StatusServiceUnavailable)
	}
	return c.JSON(resp)
}
