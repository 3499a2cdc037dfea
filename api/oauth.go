package api

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"net/url"
	"strings"

	"github.com/gofiber/fiber/v2"

	"github.com/kmsgate/kmsgate/appliance/authn"
	"github.com/kmsgate/kmsgate/appliance/tenants"
	"github.com/kmsgate/kmsgate/internal/keyutil"
)

// OAuthIssuer is kmsgate as an OAuth2 issuer of access tokens to its API credentials.
type OAuthIssuer interface {
	ClientCredentials(ctx context.Context, r authn.TokenRequest) (*authn.TokenResponse, error)
	// Issuer is the tokens' iss and the base of the endpoints' URLs.
	Issuer() string
	// JWKS is the published system key set.
	JWKS() []keyutil.JWK
}

// mountOAuth serves the token endpoint at the RFC path (200) and at EUDIPLO's own path (201, as
// EUDIPLO's endpoint answers), and the discovery documents.
func (s *Server) mountOAuth(app *fiber.App) {
	if s.OAuth == nil {
		return
	}
	app.Post("/oauth2/token", s.tokenEndpoint(fiber.StatusOK))
	app.Post("/api/oauth2/token", s.tokenEndpoint(fiber.StatusCreated))
	app.Get("/.well-known/jwks.json", s.jwks)
	app.Get("/.well-known/oauth-authorization-server", s.oauthMetadata)
}

func (s *Server) jwks(c *fiber.Ctx) error {
	c.Set(fiber.HeaderCacheControl, "public, max-age=60")
	keys := s.OAuth.JWKS()
	if keys == nil {
		keys = []keyutil.JWK{}
	}
	return c.JSON(fiber.Map{"keys": keys})
}

func (s *Server) oauthMetadata(c *fiber.Ctx) error {
	iss := s.OAuth.Issuer()
	return c.JSON(fiber.Map{
		"issuer":                                iss,
		"token_endpoint":                        iss + "/oauth2/token",
		"jwks_uri":                              iss + "/.well-known/jwks.json",
		"grant_types_supported":                 []string{"client_credentials"},
		"token_endpoint_auth_methods_supported": []string{"client_secret_basic", "client_secret_post"},
		"response_types_supported":              []string{},
		"scopes_supported":                      []string{tenants.RoleManage, tenants.RoleSign, tenants.RoleExport},
	})
}

// oauthError answers with RFC 6749's error body, not the API's problem body: OAuth clients parse
// {error, error_description}.
func oauthError(c *fiber.Ctx, e *authn.OAuthError) error {
	if e.Status == fiber.StatusUnauthorized {
		c.Set(fiber.HeaderWWWAuthenticate, `Basic realm="kmsgate"`)
	}
	c.Set(fiber.HeaderCacheControl, "no-store")
	return c.Status(e.Status).JSON(e)
}

func (s *Server) tokenEndpoint(okStatus int) fiber.Handler {
	return func(c *fiber.Ctx) error {
		req, oerr := parseTokenRequest(c)
		if oerr != nil {
			return oauthError(c, oerr)
		}
		res, err := s.OAuth.ClientCredentials(c.UserContext(), req)
		var oe *authn.OAuthError
		switch {
		case errors.As(err, &oe):
			return oauthError(c, oe)
		case err != nil:
			s.log.Error("access token not issued", "error", err)
			return oauthError(c, &authn.OAuthError{Status: fiber.StatusServiceUnavailable, Code: "temporarily_unavailable",
				Description: "the token signing key is not available; retry later"})
		}
		c.Set(fiber.HeaderCacheControl, "no-store")
		c.Set(fiber.HeaderPragma, "no-cache")
		return c.Status(okStatus).JSON(res)
	}
}

// parseTokenRequest reads a token request from a form or JSON body, with the client's credentials
// in HTTP Basic or in the body (not both). Every value is copied: Fiber reuses request buffers.
func parseTokenRequest(c *fiber.Ctx) (authn.TokenRequest, *authn.OAuthError) {
	var r authn.TokenRequest
	bad := func(desc string) *authn.OAuthError {
		return &authn.OAuthError{Status: fiber.StatusBadRequest, Code: "invalid_request", Description: desc}
	}
	if strings.HasPrefix(strings.ToLower(c.Get(fiber.HeaderContentType)), fiber.MIMEApplicationJSON) {
		var body map[string]any
		if err := json.Unmarshal(c.Body(), &body); err != nil {
			return r, bad("the body is not a JSON object")
		}
		get := func(name string) (string, bool) {
			v, ok := body[name]
			if !ok || v == nil {
				return "", true
			}
			s, isStr := v.(string)
			return s, isStr
		}
		for _, f := range []struct {
			name string
			dst  *string
		}{{"grant_type", &r.GrantType}, {"client_id", &r.ClientID}, {"client_secret", &r.ClientSecret}, {"scope", &r.Scope}} {
			v, ok := get(f.name)
			if !ok {
				return r, bad(f.name + " must be a string")
			}
			*f.dst = v
		}
	} else {
		args := c.Request().PostArgs()
		r.GrantType = string(args.Peek("grant_type"))
		r.ClientID = string(args.Peek("client_id"))
		r.ClientSecret = string(args.Peek("client_secret"))
		r.Scope = string(args.Peek("scope"))
	}
	if h := c.Get(fiber.HeaderAuthorization); h != "" {
		scheme, cred, _ := strings.Cut(h, " ")
		if !strings.EqualFold(scheme, "basic") {
			return r, &authn.OAuthError{Status: fiber.StatusUnauthorized, Code: "invalid_client",
				Description: "client authentication must use HTTP Basic or the request body"}
		}
		id, secret, err := basicCredentials(strings.TrimSpace(cred))
		if err != nil {
			return r, authn.ErrInvalidClient
		}
		if r.ClientSecret != "" || (r.ClientID != "" && r.ClientID != id) {
			return r, bad("send the client's credentials in HTTP Basic or in the body, not both")
		}
		r.ClientID, r.ClientSecret = id, secret
	}
	// EUDIPLO's own endpoint takes a missing grant_type as client_credentials; so does this one.
	if r.GrantType == "" {
		r.GrantType = "client_credentials"
	}
	return r, nil
}

// basicCredentials decodes RFC 6749 §2.3.1 Basic credentials: both halves are form-encoded before
// base64.
func basicCredentials(b64 string) (id, secret string, err error) {
	raw, err := base64.StdEncoding.DecodeString(b64)
	if err != nil {
		return "", "", err
	}
	rawID, rawSecret, ok := strings.Cut(string(raw), ":")
	if !ok {
		return "", "", errors.New("no colon")
	}
	if id, err = url.QueryUnescape(rawID); err != nil {
		return "", "", err
	}
	if secret, err = url.QueryUnescape(rawSecret); err != nil {
		return "", "", err
	}
	return id, secret, nil
}
