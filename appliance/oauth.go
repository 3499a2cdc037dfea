package appliance

import (
	"context"
	"fmt"

	"github.com/kmsgate/kmsgate/api"
	"github.com/kmsgate/kmsgate/appliance/authn"
	"github.com/kmsgate/kmsgate/internal/keyutil"
)

// DefaultPublicURL is the public URL (token issuer) when none is configured, as `serve` defaults it.
const DefaultPublicURL = "http://localhost:8080"

// setupOAuth makes kmsgate an OAuth2 issuer to its own API credentials: the system key (created
// once for all replicas) signs access tokens, which the API accepts as bearer tokens.
func (a *Appliance) setupOAuth(ctx context.Context, deps *api.Deps) error {
	provID := a.opts.SystemKeyProvider
	if provID == "" {
		provID = a.registry.DefaultID()
	}
	if _, err := a.registry.Get(provID); err != nil {
		return fmt.Errorf("--system-key-provider: %w", err)
	}
	a.systemKey = authn.NewSystemKey(authn.SystemKeyConfig{Store: a.store, Registry: a.registry,
		Lifecycle: a.keys.Lifecycle(), ProviderID: provID, Log: a.log})
	if err := a.systemKey.Ensure(ctx); err != nil {
		// A provider that is down at start-up must not keep the API down: the key is created on
		// the first token request instead, and until then tokens are refused.
		a.log.Warn("system key not available yet; access tokens are refused until it is", "provider", provID, "error", err)
	}
	iss := a.opts.PublicURL
	if iss == "" {
		iss = DefaultPublicURL
	}
	tokens, err := authn.NewTokens(authn.TokensConfig{Issuer: iss, TTL: a.opts.TokenTTL,
		Keys: a.systemKey, Credentials: a.tenants})
	if err != nil {
		return err
	}
	a.tokens = tokens
	deps.Tokens, deps.OAuth = a.tokenVerifier(oauthIssuer{tokens}, tokens.Issuer()), oauthIssuer{tokens}
	return nil
}

// oauthIssuer adapts the token service to the API's interfaces.
type oauthIssuer struct{ *authn.Tokens }

func (o oauthIssuer) JWKS() []keyutil.JWK { return o.Keys().JWKS() }

func (o oauthIssuer) RotateSystemKey(ctx context.Context) (string, error) {
	return o.Keys().Rotate(ctx)
}

// Tokens is the access-token issuer and verifier (tests mint tokens with chosen claims).
func (a *Appliance) Tokens() *authn.Tokens { return a.tokens }

// KeyCount is the number of keys a namespace holds in its providers (authn.SystemTenant for the
// system keys), as the lifecycle counts them.
func (a *Appliance) KeyCount(ctx context.Context, tenant string) (int64, error) {
	return a.keys.Lifecycle().KeyCount(ctx, tenant)
}
