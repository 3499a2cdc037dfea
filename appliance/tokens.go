package appliance

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"strings"

	"github.com/kmsgate/kmsgate/api"
	"github.com/kmsgate/kmsgate/appliance/extauth"
	"github.com/kmsgate/kmsgate/appliance/tenants"
)

// tokenVerifier is what the API asks about a bearer value that is not a kmsgate API key: the
// verifier Options injected (tests), else kmsgate's own access tokens and those of the external
// issuers in auth.json, told apart by the token's issuer.
func (a *Appliance) tokenVerifier(own api.TokenVerifier, ownIssuer string) api.TokenVerifier {
	if a.opts.Tokens != nil {
		return a.opts.Tokens
	}
	return tokenRouter{own: own, ownIssuer: ownIssuer, ext: a.extTokens}
}

// tokenRouter sends a token to the one verifier its `iss` names. The claim is read unverified
// only to choose; the chosen verifier checks the signature, the issuer and everything else.
type tokenRouter struct {
	own       api.TokenVerifier
	ownIssuer string
	ext       *extauth.Verifier
}

func (r tokenRouter) VerifyToken(ctx context.Context, raw string) (*tenants.Principal, error) {
	if r.ext != nil && unverifiedIssuer(raw) != r.ownIssuer {
		return r.ext.VerifyToken(ctx, raw)
	}
	if r.own == nil {
		return nil, tenants.ErrUnauthenticated
	}
	return r.own.VerifyToken(ctx, raw)
}

// unverifiedIssuer is the `iss` claim of a compact JWS, "" when it has none or is not one.
func unverifiedIssuer(raw string) string {
	parts := strings.Split(raw, ".")
	if len(parts) != 3 {
		return ""
	}
	payload, err := base64.RawURLEncoding.DecodeString(parts[1])
	if err != nil {
		return ""
	}
	var c struct {
		Iss string `json:"iss"`
	}
	if json.Unmarshal(payload, &c) != nil {
		return ""
	}
	return c.Iss
}
