// Package extauth accepts bearer tokens issued by external OAuth2/OIDC issuers listed in
// <config-dir>/auth.json: it verifies a JWT against the issuer's published JWKS and turns it into a
// tenant principal. kms.json stays EUDIPLO-shaped, so trusted issuers live in their own file.
package extauth

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/kmsgate/kmsgate/appliance/config"
	"github.com/kmsgate/kmsgate/appliance/tenants"
)

// FileName is the external-issuer configuration file inside the config directory.
const FileName = "auth.json"

// Issuer is one trusted external token issuer.
type Issuer struct {
	// Issuer is compared exactly with a token's iss claim.
	Issuer string `json:"issuer"`
	// JWKSURL is where the issuer publishes its public keys.
	JWKSURL string `json:"jwksUrl"`
	// Audience must be one of a token's aud values.
	Audience string `json:"audience"`
	// Algorithms are the JWS algorithms accepted from this issuer (asymmetric only).
	Algorithms []string `json:"algorithms"`
	// TenantClaim names the claim that holds the tenant id; RolesClaim the claim that holds roles
	// or scopes (a space-separated string or an array). A name is looked up as a top-level claim
	// first, then as a dotted path into nested objects (Keycloak's "realm_access.roles").
	TenantClaim string `json:"tenantClaim"`
	RolesClaim  string `json:"rolesClaim"`
	// RoleMap maps the issuer's role names to kmsgate roles, on top of the built-in mapping.
	RoleMap map[string][]string `json:"roleMap,omitempty"`
}

type fileShape struct {
	Issuers []json.RawMessage `json:"issuers"`
}

// allowedAlgs are the asymmetric JWS algorithms an issuer may be configured with. "none" and the
// HS* family are deliberately absent: HMAC verified with a public key lets anyone who has the
// (public) JWKS forge tokens.
var allowedAlgs = []string{"ES256", "ES384", "ES512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "EdDSA"}

// Load reads <dir>/auth.json. A missing file (or no config dir) means no external issuers.
func Load(dir string, lookup config.LookupFunc) ([]Issuer, error) {
	if dir == "" {
		return nil, nil
	}
	path := filepath.Join(dir, FileName)
	data, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", path, err)
	}
	iss, err := Parse(data, lookup)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return iss, nil
}

// Parse parses and validates auth.json content. Unknown fields are refused so that a typo (say
// "audiance") stops the appliance at start-up instead of silently disabling a check.
func Parse(data []byte, lookup config.LookupFunc) ([]Issuer, error) {
	var f fileShape
	if err := decodeStrict(data, &f); err != nil {
		return nil, fmt.Errorf("invalid auth.json: %w", err)
	}
	seen := map[string]bool{}
	out := make([]Issuer, 0, len(f.Issuers))
	for i, raw := range f.Issuers {
		var tree any
		if err := json.Unmarshal(raw, &tree); err != nil {
			return nil, fmt.Errorf("issuers[%d]: %w", i, err)
		}
		if _, ok := tree.(map[string]any); !ok {
			return nil, fmt.Errorf("issuers[%d]: must be an object", i)
		}
		expanded, err := config.ExpandTree(tree, lookup)
		if err != nil {
			return nil, fmt.Errorf("issuers[%d]: field %w", i, err)
		}
		b, err := json.Marshal(expanded)
		if err != nil {
			return nil, fmt.Errorf("issuers[%d]: %w", i, err)
		}
		var is Issuer
		if err := decodeStrict(b, &is); err != nil {
			return nil, fmt.Errorf("issuers[%d]: %w", i, err)
		}
		if err := is.validate(); err != nil {
			return nil, fmt.Errorf("issuers[%d]: %w", i, err)
		}
		if seen[is.Issuer] {
			return nil, fmt.Errorf("issuers[%d]: field \"issuer\": duplicate issuer %q", i, is.Issuer)
		}
		seen[is.Issuer] = true
		out = append(out, is)
	}
	return out, nil
}

func decodeStrict(data []byte, v any) error {
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return err
	}
	if dec.More() {
		return errors.New("trailing data after the top-level object")
	}
	return nil
}

func (is *Issuer) validate() error {
	if strings.TrimSpace(is.Issuer) == "" {
		return errors.New(`field "issuer" is required and must be a non-empty string`)
	}
	if err := checkJWKSURL(is.JWKSURL); err != nil {
		return fmt.Errorf("issuer %q: field \"jwksUrl\": %w", is.Issuer, err)
	}
	if is.Audience == "" {
		return fmt.Errorf("issuer %q: field \"audience\" is required: without it a token minted for any "+
			"other client of the issuer would be accepted", is.Issuer)
	}
	if len(is.Algorithms) == 0 {
		return fmt.Errorf("issuer %q: field \"algorithms\" is required (one or more of %s)", is.Issuer,
			strings.Join(allowedAlgs, ", "))
	}
	for _, a := range is.Algorithms {
		switch {
		case strings.EqualFold(a, "none"):
			return fmt.Errorf("issuer %q: field \"algorithms\": \"none\" is never accepted (unsigned tokens)", is.Issuer)
		case strings.HasPrefix(strings.ToUpper(a), "HS"):
			return fmt.Errorf("issuer %q: field \"algorithms\": %q is never accepted: HMAC checked with a "+
				"published key lets anyone forge tokens", is.Issuer, a)
		case !slices.Contains(allowedAlgs, a):
			return fmt.Errorf("issuer %q: field \"algorithms\": unknown algorithm %q (known: %s)", is.Issuer, a,
				strings.Join(allowedAlgs, ", "))
		}
	}
	if is.TenantClaim == "" {
		return fmt.Errorf("issuer %q: field \"tenantClaim\" is required (the claim naming the tenant)", is.Issuer)
	}
	if is.RolesClaim == "" {
		return fmt.Errorf("issuer %q: field \"rolesClaim\" is required (the claim carrying roles or scopes)", is.Issuer)
	}
	for from, to := range is.RoleMap {
		if from == "" {
			return fmt.Errorf("issuer %q: field \"roleMap\": empty role name", is.Issuer)
		}
		if len(to) == 0 {
			return fmt.Errorf("issuer %q: field \"roleMap\": %q maps to no role", is.Issuer, from)
		}
		if err := tenants.ValidateRoles(to); err != nil {
			return fmt.Errorf("issuer %q: field \"roleMap\": %q: %w", is.Issuer, from, err)
		}
	}
	return nil
}

// checkJWKSURL requires https, except for a loopback host (tests, a sidecar on the same machine):
// keys fetched in clear text over a network could be swapped by anyone on the path.
func checkJWKSURL(s string) error {
	if s == "" {
		return errors.New("is required")
	}
	u, err := url.Parse(s)
	if err != nil {
		return fmt.Errorf("not a URL: %w", err)
	}
	if u.Host == "" {
		return fmt.Errorf("%q has no host", s)
	}
	if u.User != nil {
		return errors.New("must not carry credentials")
	}
	switch u.Scheme {
	case "https":
		return nil
	case "http":
		if isLoopback(u.Hostname()) {
			return nil
		}
		return fmt.Errorf("%q: must be https (http is allowed only for a loopback host)", s)
	default:
		return fmt.Errorf("%q: scheme must be https", s)
	}
}

func isLoopback(host string) bool {
	if strings.EqualFold(host, "localhost") {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}
