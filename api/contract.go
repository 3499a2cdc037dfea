package api

import (
	"encoding/base64"
	"net/url"
	"slices"
	"strings"

	"github.com/gofiber/fiber/v2"

	"github.com/kmsgate/kmsgate/appliance/keys"
	"github.com/kmsgate/kmsgate/appliance/store"
	"github.com/kmsgate/kmsgate/internal/keyutil"
	"github.com/kmsgate/kmsgate/providers"
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

// signFields is a decoded sign request. The byte slices may point into the request body, which
// stays valid for the handler's lifetime.
type signFields struct {
	data, digest, alg, format []byte
	hasData, hasDigest        bool
}

// parseSignFast decodes the common shape {"data":"…","alg":"ES256"} (any order, optional
// "digest"/"signatureFormat", whitespace allowed) without reflection or allocation. Anything
// else — escapes, other types, unknown or duplicate fields, malformed JSON — returns false and the
// caller falls back to the strict decoder, which owns every error message.
func parseSignFast(b []byte, f *signFields) bool {
	i := skipWS(b, 0)
	if i >= len(b) || b[i] != '{' {
		return false
	}
	i++
	for n := 0; ; n++ {
		i = skipWS(b, i)
		if n == 0 && i < len(b) && b[i] == '}' {
			i++
			break
		}
		key, j, ok := jsonPlainString(b, i)
		if !ok {
			return false
		}
		i = skipWS(b, j)
		if i >= len(b) || b[i] != ':' {
			return false
		}
		val, j, ok := jsonPlainString(b, skipWS(b, i+1))
		if !ok {
			return false
		}
		var dst *[]byte
		switch string(key) {
		case "data":
			dst, f.hasData = &f.data, true
		case "digest":
			dst, f.hasDigest = &f.digest, true
		case "alg":
			dst = &f.alg
		case "signatureFormat":
			dst = &f.format
		default:
			return false
		}
		if *dst != nil {
			return false // duplicate field
		}
		*dst = val
		i = skipWS(b, j)
		if i < len(b) && b[i] == ',' {
			i++
			continue
		}
		if i < len(b) && b[i] == '}' {
			i++
			break
		}
		return false
	}
	return skipWS(b, i) == len(b)
}

func skipWS(b []byte, i int) int {
	for i < len(b) && (b[i] == ' ' || b[i] == '\t' || b[i] == '\n' || b[i] == '\r') {
		i++
	}
	return i
}

// jsonPlainString reads a JSON string of printable ASCII without escapes starting at b[i]
// (encoding/json would rewrite invalid UTF-8, so non-ASCII goes to the strict decoder).
// The returned value is never nil, so an empty string still counts as present.
func jsonPlainString(b []byte, i int) ([]byte, int, bool) {
	if i >= len(b) || b[i] != '"' {
		return nil, i, false
	}
	for j := i + 1; j < len(b); j++ {
		switch c := b[j]; {
		case c == '"':
			return b[i+1 : j : j], j + 1, true
		case c == '\\' || c < 0x20 || c >= 0x80:
			return nil, i, false
		}
	}
	return nil, i, false
}

func (s *Server) decodeSign(c *fiber.Ctx, f *signFields) error {
	if err := requireJSON(c); err != nil {
		return err
	}
	if parseSignFast(c.Body(), f) {
		return nil
	}
	*f = signFields{}
	var req signRequest
	if err := decodeJSON(c, &req); err != nil {
		return err
	}
	if req.Data != nil {
		f.data, f.hasData = []byte(*req.Data), true
	}
	if req.Digest != nil {
		f.digest, f.hasDigest = []byte(*req.Digest), true
	}
	f.alg, f.format = []byte(req.Alg), []byte(req.SignatureFormat)
	return nil
}

// sign is the hot path: a reflection-free decode, one cached lookup, the provider call, a
// hand-built response.
func (s *Server) sign(c *fiber.Ctx) error {
	kid, err := kidParam(c)
	if err != nil {
		return err
	}
	var f signFields
	if err := s.decodeSign(c, &f); err != nil {
		return err
	}
	var input []byte
	isDigest := false
	switch {
	case f.hasData && f.hasDigest:
		return problem(fiber.StatusBadRequest, "invalid_request", `send either "data" or "digest", not both`)
	case f.hasData:
		if input, err = decodeB64("data", f.data); err != nil {
			return err
		}
	case f.hasDigest:
		if input, err = decodeB64("digest", f.digest); err != nil {
			return err
		}
		isDigest = true
	default:
		return problem(fiber.StatusBadRequest, "missing_field", `field "data" (base64 message) is required`)
	}
	der := false
	switch string(f.format) {
	case "", "raw":
	case "der":
		der = true
	default:
		return problem(fiber.StatusBadRequest, "invalid_format", `signatureFormat must be "raw" or "der"`)
	}
	sig, err := s.Keys.Sign(c.UserContext(), principal(c).TenantID, kid, string(f.alg), input, isDigest)
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
	OK         bool             `json:"ok"`
	Store      StoreHealth      `json:"store"`
	Providers  []ProviderHealth `json:"providers,omitempty"`
	Extensions []string         `json:"extensions"`
}

// health answers 200 while the caller's providers are healthy and 503 otherwise. A caller with a
// credential is judged by the provider its requests use by default (the credential's default, else
// the tenant's, else the gateway's): the other providers it may use are listed but do not turn the
// answer red, since a client such as EUDIPLO takes a 503 to mean it cannot sign at all. An
// anonymous caller gets the appliance-wide answer without provider details.
func (s *Server) health(c *fiber.Ctx) error {
	p := principal(c)
	var ids []string
	deciding := "" // "": every listed provider decides
	if p != nil && p.TenantID != "" {
		t, err := s.Tenants.Tenant(c.UserContext(), p.TenantID)
		switch {
		case store.IsUnavailable(err):
			// The tenant's provider list is in the store: without it, report the store alone
			// rather than fail the health check of a gateway that may well still sign.
			p = nil
		case err != nil:
			return err
		default:
			ids = t.AllowedProviders
			deciding = firstNonEmpty(p.DefaultProvider, t.DefaultProvider, s.Registry.DefaultID())
			if len(ids) > 0 && !slices.Contains(ids, deciding) {
				ids = append(slices.Clone(ids), deciding)
			}
		}
	}
	var reports []ProviderHealth
	if p != nil {
		reports = s.Health.Check(c.UserContext(), ids)
	} else {
		reports = s.Health.Last(c.UserContext(), ids)
	}
	st := s.Health.Store()
	ok := st.OK
	for _, r := range reports {
		if deciding == "" || r.ProviderID == deciding {
			ok = ok && r.OK
		}
	}
	resp := healthResponse{OK: ok, Store: st, Extensions: []string{"digest"}}
	if p != nil {
		resp.Providers = reports
	}
	if !ok {
		c.Status(fiber.StatusServiceUnavailable)
	}
	return c.JSON(resp)
}

func firstNonEmpty(v ...string) string {
	for _, s := range v {
		if s != "" {
			return s
		}
	}
	return ""
}
