package keychain

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"

	"github.com/kmsgate/kmsgate/appliance/keys"
	"github.com/kmsgate/kmsgate/appliance/store"
	"github.com/kmsgate/kmsgate/internal/errs"
	"github.com/kmsgate/kmsgate/internal/keyutil"
	"github.com/kmsgate/kmsgate/providers"
)

// reservedHeaders are set by kmsgate and cannot be overridden by callers: alg and kid must name the
// key that actually signs, x5c its chain, and b64=false/crit would change what the signature covers.
var reservedHeaders = map[string]bool{"alg": true, "kid": true, "x5c": true, "b64": true, "crit": true,
	"jwk": true, "x5u": true, "jku": true}

// signingChain loads a chain that may sign and its provider.
// A known chain is served from the index's signing cache: signing costs no store read.
func (s *Service) signingChain(ctx context.Context, tenant, id string) (*Chain, signer, error) {
	if e := s.idx.sign.get(tenant, id); e != nil {
		return e.c, e.sg, nil
	}
	gen := s.idx.sign.generation()
	c, err := s.load(ctx, tenant, id)
	if err != nil {
		return nil, signer{}, err
	}
	if c.Usage == KeyUseEncrypt {
		return nil, signer{}, badRequest("wrong_usage", "key chain %q is an encrypt chain and cannot sign", id)
	}
	prov, err := s.reg.Get(c.Provider)
	if err != nil {
		return nil, signer{}, err
	}
	ref, err := keys.ProviderRef(c.Active, tenant)
	if err != nil {
		return nil, signer{}, err
	}
	sg := s.signerOf(prov, ref)
	s.idx.sign.put(tenant, id, &signing{c: c, sg: sg}, gen)
	return c, sg, nil
}

// Sign signs a message or a SHA-256 digest with the chain's active key (raw r‖s).
func (s *Service) Sign(ctx context.Context, tenant, id string, req SignRequest) (*SignResult, error) {
	if req.Alg != "" && req.Alg != providers.ES256 {
		return nil, badField(IssueInvalidValue, []any{"alg"}, "unsupported_alg", "alg must be ES256 (got %q)", req.Alg)
	}
	if (req.Data == nil) == (req.Digest == nil) {
		return nil, badRequest("validation_failed", "send exactly one of data and digest")
	}
	_, sg, err := s.signingChain(ctx, tenant, id)
	if err != nil {
		return nil, err
	}
	var sig []byte
	if req.Digest != nil {
		sig, err = s.lc.Sign(ctx, sg.prov, sg.prov.Capabilities(), sg.ref, providers.ES256, req.Digest, true)
	} else {
		sig, err = sg.sign(ctx, req.Data)
	}
	if err != nil {
		return nil, err
	}
	return &SignResult{Signature: sig, KID: sg.ref.KID}, nil
}

// JWS signs a JSON payload as a compact JWS (alg ES256, kid of the active key, x5c per request).
// The signing input is built here and signed through the provider, so the key never leaves it.
func (s *Service) JWS(ctx context.Context, tenant, id string, req JWSRequest) (*JWSResult, error) {
	x5c := req.X5C
	if x5c == "" {
		// Leaf only by default: HAIP wants the trust anchor outside x5c (SD-JWT VC, status lists).
		x5c = X5CLeaf
	}
	if x5c != X5CLeaf && x5c != X5CChain && x5c != X5CNone {
		return nil, badField(IssueInvalidValue, []any{"x5c"}, "validation_failed", "x5c must be leaf, chain or none (got %q)", req.X5C)
	}
	var payload bytes.Buffer
	if err := json.Compact(&payload, req.Payload); err != nil || payload.Len() == 0 {
		return nil, badField(IssueInvalidType, []any{"payload"}, "validation_failed", "payload must be JSON")
	}
	hdr := make(map[string]any, len(req.Header)+3)
	for k, v := range req.Header {
		if reservedHeaders[k] {
			return nil, badField(IssueCustom, []any{"header", k}, "validation_failed", "header %q is set by kmsgate and cannot be given", k)
		}
		hdr[k] = v
	}
	c, sg, err := s.signingChain(ctx, tenant, id)
	if err != nil {
		return nil, err
	}
	hdr["alg"], hdr["kid"] = providers.ES256, c.Active.KID
	if x5c != X5CNone {
		certs, err := parsePEMChain(c.ActiveCertificate)
		if err != nil {
			return nil, fmt.Errorf("stored certificate of chain %s: %w", id, err)
		}
		if x5c == X5CLeaf && len(certs) > 1 {
			certs = certs[:1]
		}
		if len(certs) > 0 {
			list := make([]string, len(certs))
			for i, cert := range certs {
				// x5c is standard base64 DER, not base64url (RFC 7515 §4.1.6).
				list[i] = base64.StdEncoding.EncodeToString(cert.Raw)
			}
			hdr["x5c"] = list
		}
	}
	hj, err := json.Marshal(hdr)
	if err != nil {
		return nil, badRequest("validation_failed", "header cannot be encoded: %v", err)
	}
	input := base64.RawURLEncoding.EncodeToString(hj) + "." + base64.RawURLEncoding.EncodeToString(payload.Bytes())
	sig, err := sg.sign(ctx, []byte(input))
	if err != nil {
		return nil, err
	}
	return &JWSResult{JWS: input + "." + base64.RawURLEncoding.EncodeToString(sig), KID: c.Active.KID}, nil
}

// publishable returns the chain's public signing keys: the active key and every previous key
// still in its grace period. Encrypt chains publish nothing here: their key is not a signature key.
func (s *Service) publishable(c *Chain) []keyutil.JWK {
	if c.Usage == KeyUseEncrypt {
		return nil
	}
	pub := func(k store.KeyRef) keyutil.JWK {
		j := k.PublicJWK.Public()
		j.Kid, j.Alg, j.Use = k.KID, providers.ES256, "sig"
		return j
	}
	out := []keyutil.JWK{pub(c.Active)}
	now := s.now()
	// Newest first: a verifier that stops at the first match finds recent tokens' keys early.
	for i := len(c.PreviousKeys) - 1; i >= 0; i-- {
		if p := c.PreviousKeys[i]; now.Before(p.Expiry) {
			out = append(out, pub(p.Key))
		}
	}
	return out
}

// ChainJWKS is GET /key-chain/{id}/jwks.
func (s *Service) ChainJWKS(ctx context.Context, tenant, id string) (*JWKS, error) {
	c, err := s.load(ctx, tenant, id)
	if err != nil {
		return nil, err
	}
	return &JWKS{Keys: append([]keyutil.JWK{}, s.publishable(c)...)}, nil
}

// TenantJWKS is GET /jwks: every signing chain of the tenant.
func (s *Service) TenantJWKS(ctx context.Context, tenant string) (*JWKS, error) {
	chains, err := s.list(ctx, tenantPrefix(tenant))
	if err != nil {
		return nil, err
	}
	out := &JWKS{Keys: []keyutil.JWK{}}
	for _, c := range chains {
		out.Keys = append(out.Keys, s.publishable(c)...)
	}
	return out, nil
}

// ResolveUsage returns the id of the tenant's chain for a usage type (the oldest one when there
// are several). A statusList request falls back to the attestation chain, as the seed says, so
// status lists stay under the same trust anchor as the credentials.
func (s *Service) ResolveUsage(ctx context.Context, tenant, usage string) (string, error) {
	if err := validateUsage(usage); err != nil {
		return "", err
	}
	// The in-memory index answers: the signing path never lists or decodes the tenant's chains.
	find := func(u string) (string, error) {
		ids, err := s.idx.byUsage(ctx, s, tenant, u)
		if err != nil || len(ids) == 0 {
			return "", err
		}
		return ids[0], nil
	}
	id, err := find(usage)
	if err == nil && id == "" && usage == UsageStatusList {
		id, err = find(UsageAttestation)
	}
	if err != nil {
		return "", err
	}
	if id != "" {
		return id, nil
	}
	return "", errs.Errorf(errs.NotFound, "no signing key chain with usageType %q", usage).WithCode("key_chain_not_found")
}
