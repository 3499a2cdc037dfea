package authn

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"

	"github.com/kmsgate/kmsgate/appliance/tenants"
)

// Token lifetimes. EUDIPLO refetches a token 30 s before it expires, so a lifetime of a minute or
// less would make it fetch one for almost every request.
const (
	DefaultTokenTTL = 5 * time.Minute
	MinTokenTTL     = 61 * time.Second
	// Leeway is the clock skew tolerated between replicas (and their clients) on exp, nbf and iat.
	Leeway = 30 * time.Second
)

// Credentials is what the issuer needs from the tenant service.
type Credentials interface {
	// Authenticate verifies a whole API key.
	Authenticate(key string) (*tenants.Principal, error)
	// Credential returns an active credential by id (false when unknown or revoked).
	Credential(id string) (*tenants.Principal, bool)
}

// TokensConfig configures Tokens.
type TokensConfig struct {
	// Issuer is the tokens' iss: the public URL every replica shares.
	Issuer string
	// Audience is the tokens' aud (default: Issuer): tokens are for kmsgate's own API only.
	Audience    string
	TTL         time.Duration
	Keys        *SystemKey
	Credentials Credentials
	Now         func() time.Time
}

// Tokens issues access tokens to API credentials (OAuth2 client credentials) and verifies them.
type Tokens struct {
	cfg TokensConfig
}

// NewTokens builds the issuer and verifier; a TTL of a minute or less is refused.
func NewTokens(c TokensConfig) (*Tokens, error) {
	if c.TTL == 0 {
		c.TTL = DefaultTokenTTL
	}
	if c.TTL < MinTokenTTL {
		return nil, fmt.Errorf("token TTL %s is too short: it must be more than 60s (clients refetch 30s before expiry)", c.TTL)
	}
	c.Issuer = strings.TrimRight(c.Issuer, "/")
	if c.Issuer == "" {
		return nil, errors.New("the token issuer (public URL) must not be empty")
	}
	if c.Audience == "" {
		c.Audience = c.Issuer
	}
	if c.Now == nil {
		c.Now = time.Now
	}
	return &Tokens{cfg: c}, nil
}

// Issuer is the tokens' iss.
func (t *Tokens) Issuer() string { return t.cfg.Issuer }

// Keys is the system key the tokens are signed with.
func (t *Tokens) Keys() *SystemKey { return t.cfg.Keys }

// Claims are the claims of a kmsgate access token.
type Claims struct {
	Issuer    string   `json:"iss"`
	Subject   string   `json:"sub"`
	Audience  string   `json:"aud"`
	Expiry    int64    `json:"exp"`
	IssuedAt  int64    `json:"iat"`
	NotBefore int64    `json:"nbf"`
	ID        string   `json:"jti"`
	Tenant    string   `json:"tenant"`
	Roles     []string `json:"roles"`
	Scope     string   `json:"scope,omitempty"`
}

// OAuthError is an RFC 6749 §5.2 error answer.
type OAuthError struct {
	Status      int    `json:"-"`
	Code        string `json:"error"`
	Description string `json:"error_description,omitempty"`
}

func (e *OAuthError) Error() string { return e.Code + ": " + e.Description }

func oauthErr(status int, code, desc string) *OAuthError {
	return &OAuthError{Status: status, Code: code, Description: desc}
}

// ErrInvalidClient answers a token request whose client cannot be authenticated.
var ErrInvalidClient = oauthErr(401, "invalid_client", "unknown client or wrong client secret")

// TokenRequest is a parsed client-credentials token request.
type TokenRequest struct {
	GrantType    string
	ClientID     string
	ClientSecret string
	Scope        string
}

// TokenResponse is RFC 6749 §5.1's successful answer.
type TokenResponse struct {
	AccessToken string `json:"access_token"`
	TokenType   string `json:"token_type"`
	ExpiresIn   int64  `json:"expires_in"`
	Scope       string `json:"scope,omitempty"`
}

// ClientCredentials answers a client-credentials grant: client_id is the credential id and
// client_secret the whole API key. Errors are *OAuthError; any other error is an internal failure
// (the system key's provider is down).
func (t *Tokens) ClientCredentials(ctx context.Context, r TokenRequest) (*TokenResponse, error) {
	if r.GrantType != "client_credentials" {
		return nil, oauthErr(400, "unsupported_grant_type", "only grant_type=client_credentials is supported")
	}
	if r.ClientID == "" || r.ClientSecret == "" {
		return nil, ErrInvalidClient
	}
	p, err := t.cfg.Credentials.Authenticate(r.ClientSecret)
	if err != nil || p.CredentialID != r.ClientID {
		return nil, ErrInvalidClient
	}
	if p.TenantID == "" {
		return nil, oauthErr(400, "unauthorized_client", "admin credentials cannot obtain access tokens")
	}
	roles, err := narrow(p.Roles, r.Scope)
	if err != nil {
		return nil, err
	}
	now := t.cfg.Now()
	c := t.claims(p, roles, now, now.Add(t.cfg.TTL))
	if r.Scope != "" {
		c.Scope = strings.Join(roles, " ")
	}
	tok, err := t.Mint(ctx, c)
	if err != nil {
		return nil, err
	}
	return &TokenResponse{AccessToken: tok, TokenType: "Bearer", ExpiresIn: int64(t.cfg.TTL / time.Second), Scope: c.Scope}, nil
}

// narrow returns the roles a scope asks for, which must all be among have; an empty scope keeps
// have. A scope can narrow a credential's roles, never widen them.
func narrow(have []string, scope string) ([]string, error) {
	if strings.TrimSpace(scope) == "" {
		return slices.Clone(have), nil
	}
	var out []string
	for _, s := range strings.Fields(scope) {
		if !slices.Contains(have, s) {
			return nil, oauthErr(400, "invalid_scope", fmt.Sprintf("scope %q is not among the client's roles %s",
				s, strings.Join(have, " ")))
		}
		if !slices.Contains(out, s) {
			out = append(out, s)
		}
	}
	return out, nil
}

func (t *Tokens) claims(p *tenants.Principal, roles []string, iat, exp time.Time) Claims {
	var b [16]byte
	_, _ = rand.Read(b[:]) // crypto/rand never fails on supported platforms
	return Claims{Issuer: t.cfg.Issuer, Subject: p.CredentialID, Audience: t.cfg.Audience, IssuedAt: iat.Unix(),
		NotBefore: iat.Unix(), Expiry: exp.Unix(), ID: hex.EncodeToString(b[:]), Tenant: p.TenantID, Roles: roles}
}

// Mint signs c with the active system key, in its provider. It takes the claims as given (tests
// mint tokens with chosen times through it).
func (t *Tokens) Mint(ctx context.Context, c Claims) (string, error) {
	payload, err := json.Marshal(c)
	if err != nil {
		return "", err
	}
	input, sig, err := t.cfg.Keys.Sign(ctx, func(kid string) ([]byte, error) {
		header, err := json.Marshal(map[string]string{"alg": "ES256", "typ": "JWT", "kid": kid})
		if err != nil {
			return nil, err
		}
		return []byte(base64.RawURLEncoding.EncodeToString(header) + "." + base64.RawURLEncoding.EncodeToString(payload)), nil
	})
	if err != nil {
		return "", fmt.Errorf("sign the access token: %w", err)
	}
	return string(input) + "." + base64.RawURLEncoding.EncodeToString(sig), nil
}

// ErrInvalidToken is the error of every refused token; the wrapped reason is for logs only.
var ErrInvalidToken = errors.New("invalid access token")

func invalid(format string, a ...any) error {
	return fmt.Errorf("%w: %s", ErrInvalidToken, fmt.Sprintf(format, a...))
}

// VerifyToken checks a kmsgate access token: ES256 only, signed by a published system key, issued
// by this issuer for this audience, within its validity (with Leeway), and for a credential that
// is still active. The principal carries the token's roles, never more than the credential has
// now.
func (t *Tokens) VerifyToken(ctx context.Context, raw string) (*tenants.Principal, error) {
	tok, err := jwt.ParseSigned(raw, []jose.SignatureAlgorithm{jose.ES256})
	if err != nil {
		return nil, invalid("parse: %v", err)
	}
	if len(tok.Headers) != 1 {
		return nil, invalid("expected one signature")
	}
	pub, ok := t.cfg.Keys.PublicKey(ctx, tok.Headers[0].KeyID)
	if !ok {
		return nil, invalid("unknown kid %q", tok.Headers[0].KeyID)
	}
	var std jwt.Claims
	var c Claims
	if err := tok.Claims(pub, &std, &c); err != nil {
		return nil, invalid("signature: %v", err)
	}
	if std.Expiry == nil || std.IssuedAt == nil || std.Subject == "" || c.Tenant == "" {
		return nil, invalid("missing exp, iat, sub or tenant")
	}
	err = std.ValidateWithLeeway(jwt.Expected{Issuer: t.cfg.Issuer, AnyAudience: jwt.Audience{t.cfg.Audience},
		Time: t.cfg.Now()}, Leeway)
	if err != nil {
		return nil, invalid("claims: %v", err)
	}
	cred, ok := t.cfg.Credentials.Credential(std.Subject)
	if !ok {
		return nil, invalid("credential %s is unknown or revoked", std.Subject)
	}
	if cred.TenantID != c.Tenant {
		return nil, invalid("credential %s does not belong to tenant %s", std.Subject, c.Tenant)
	}
	roles := make([]string, 0, len(c.Roles))
	for _, r := range c.Roles {
		if cred.Has(r) && !slices.Contains(roles, r) {
			roles = append(roles, r)
		}
	}
	return &tenants.Principal{CredentialID: cred.CredentialID, TenantID: cred.TenantID, Roles: roles,
		DefaultProvider: cred.DefaultProvider}, nil
}
