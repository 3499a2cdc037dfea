package appliance

import (
	"context"

	"github.com/kmsgate/kmsgate/appliance/extauth"
)

// loadExternalIssuers reads <config-dir>/auth.json before anything is opened, so a bad file stops
// start-up at once. A missing file means no external issuers.
func (a *Appliance) loadExternalIssuers() error {
	iss, err := extauth.Load(a.opts.ConfigDir, a.opts.Lookup)
	if err != nil {
		return err
	}
	a.extIssuers = iss
	return nil
}

// setupExternalTokens builds the verifier for external issuers' tokens over the tenants service.
// The API consults it (api.Deps.Tokens) for a bearer value that is not a kmsgate API key; with no
// issuers configured it refuses every token.
func (a *Appliance) setupExternalTokens(_ context.Context) error {
	v, err := extauth.New(a.extIssuers, a.tenants, extauth.WithLogger(a.log))
	if err != nil {
		return err
	}
	if names := v.Issuers(); len(names) > 0 {
		a.log.Info("external token issuers trusted", "issuers", names)
	}
	a.extTokens = v
	return nil
}

// ExternalTokens is the verifier for external issuers' tokens (never nil once Open succeeded).
func (a *Appliance) ExternalTokens() *extauth.Verifier { return a.extTokens }
