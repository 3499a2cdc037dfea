package appliance

import "github.com/kmsgate/kmsgate/api"

// tokenVerifier is what the API asks about a bearer value that is not a kmsgate API key: the
// verifier Options injected (tests), else the external issuers' from auth.json.
func (a *Appliance) tokenVerifier() api.TokenVerifier {
	if a.opts.Tokens != nil {
		return a.opts.Tokens
	}
	return a.extTokens
}
