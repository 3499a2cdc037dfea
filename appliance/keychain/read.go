package keychain

import (
	"context"
	"errors"
	"fmt"
	"slices"

	"github.com/kmsgate/kmsgate/appliance/store"
	"github.com/kmsgate/kmsgate/appliance/tenants"
	"github.com/kmsgate/kmsgate/internal/errs"
)

// Get returns one chain's response DTO.
func (s *Service) Get(ctx context.Context, tenant, id string) (*Response, error) {
	c, err := s.load(ctx, tenant, id)
	if err != nil {
		return nil, err
	}
	return s.response(c), nil
}

// List returns the tenant's signing chains, optionally filtered by usage type. The tenant's ECDH
// encrypt chain (usage=encrypt) is left out, as EUDIPLO lists only usage=sign rows; Get still
// reads it by id.
func (s *Service) List(ctx context.Context, tenant, usageType string) ([]Response, error) {
	if usageType != "" {
		if err := validateUsage(usageType); err != nil {
			return nil, err
		}
	}
	chains, err := s.list(ctx, tenantPrefix(tenant))
	if err != nil {
		return nil, err
	}
	out := make([]Response, 0, len(chains))
	for _, c := range chains {
		if c.Usage != KeyUseEncrypt && (usageType == "" || c.UsageType == usageType) {
			out = append(out, *s.response(c))
		}
	}
	return out, nil
}

func pubInfo(k store.KeyRef) PublicKeyInfo {
	return PublicKeyInfo{Kty: k.PublicJWK.Kty, Alg: k.PublicJWK.Alg, Kid: k.KID, Crv: k.PublicJWK.Crv}
}

func intPtr(v int) *int {
	if v == 0 {
		return nil
	}
	return &v
}

func (s *Service) response(c *Chain) *Response {
	r := &Response{ID: c.ID, UsageType: c.UsageType, Type: c.Type(), Description: c.Description,
		KMSProvider: c.Provider, ActivePublicKey: pubInfo(c.Active), ActiveCertificate: certInfo(c.ActiveCertificate),
		RotationPolicy: PolicyInfo{Enabled: c.Rotation.Enabled, IntervalDays: intPtr(c.Rotation.IntervalDays),
			CertValidityDays: intPtr(c.Rotation.CertValidityDays)},
		LastRotatedAt: c.LastRotatedAt, CreatedAt: c.CreatedAt, UpdatedAt: c.UpdatedAt}
	if c.Type() == TypeInternalChain {
		r.RootCertificate = certInfo(c.RootCertificate)
	}
	if p := c.latestPrevious(); p != nil {
		pk, exp := pubInfo(p.Key), p.Expiry
		r.PreviousPublicKey, r.PreviousCertificate, r.PreviousKeyExpiry = &pk, certInfo(p.Certificate), &exp
	}
	if next, ok := c.nextRotation(); ok {
		r.RotationPolicy.NextRotationAt = &next
	}
	return r
}

// ---- update / delete ----

// Update patches description, rotation policy and/or the active certificate chain.
func (s *Service) Update(ctx context.Context, tenant, id string, req UpdateRequest) error {
	if err := validateDescription(req.Description); err != nil {
		return err
	}
	if err := validatePolicy(req.RotationPolicy, false); err != nil {
		return err
	}
	// A patch that lost against another replica's write is applied once more to the new state.
	return s.retryStale(ctx, tenant, id, func(c *Chain) error {
		if req.ActiveCertificate != nil {
			if c.Usage == KeyUseEncrypt {
				return badField(IssueCustom, []any{fieldActiveCertificate}, "validation_failed", "encrypt key chains carry no certificate")
			}
			// Unlike EUDIPLO the replacement is validated: a chain whose leaf does not hold the active
			// key would make every signature unverifiable.
			entries, err := pemEntries(*req.ActiveCertificate)
			if err != nil {
				return err
			}
			certs, err := validateChain(fieldActiveCertificate, entries, s.now())
			if err != nil {
				return err
			}
			pub, err := publicOf(c.Active)
			if err != nil {
				return err
			}
			if err := requireKeyMatch(fieldActiveCertificate, 0, len(certs), certs[0], pub, "chain's active key"); err != nil {
				return err
			}
			c.ActiveCertificate = pemChain(certs)
		}
		if req.Description != nil {
			c.Description = *req.Description
		}
		req.RotationPolicy.apply(&c.Rotation)
		c.UpdatedAt = s.now()
		return s.save(ctx, c)
	})
}

// pemEntries splits a PEM string into one PEM per certificate.
func pemEntries(s string) ([]string, error) {
	out := splitPEMStrict(s)
	if len(out) == 0 {
		return nil, at(badCert("activeCertificate holds no PEM CERTIFICATE block"), IssueCustom, fieldActiveCertificate)
	}
	return out, nil
}

// Delete removes the chain and all its keys (active, previous, root) from their backends.
func (s *Service) Delete(ctx context.Context, tenant, id string) error {
	// A replica that rotated the chain meanwhile added a key this pass has not deleted: the
	// conditional delete of the record then fails and the next pass deletes the new state's keys.
	return s.retryStale(ctx, tenant, id, func(c *Chain) error {
		for _, k := range c.keys() {
			if err := s.deleteKey(ctx, tenant, k); err != nil {
				kind := errs.KindOf(err)
				if kind == errs.Unavailable || kind == errs.Throttled {
					// Transient: keep the chain so a retry deletes the remaining keys.
					return err
				}
				s.log.Warn("key chain delete: key could not be deleted in its backend", "chain", id, "kid", k.KID, "error", err)
			}
		}
		if err := s.casDelete(ctx, c); err != nil {
			if errors.Is(err, errStale) {
				return err
			}
			return fmt.Errorf("delete key chain %s: %w", id, err)
		}
		s.idx.remove(tenant, id)
		return nil
	})
}

// ---- providers ----

// Providers lists the providers the caller's tenant may use and its effective default.
func (s *Service) Providers(ctx context.Context, p *tenants.Principal) (*ProvidersResponse, error) {
	t, err := s.ten.Tenant(ctx, p.TenantID)
	if err != nil {
		return nil, err
	}
	out := &ProvidersResponse{Providers: []ProviderInfo{}, Default: s.reg.DefaultID()}
	for _, prov := range s.reg.All() {
		if len(t.AllowedProviders) > 0 && !slices.Contains(t.AllowedProviders, prov.ID()) {
			continue
		}
		out.Providers = append(out.Providers, ProviderInfo{Name: prov.ID(), Type: prov.Type(),
			Description: prov.Description(), Capabilities: prov.Capabilities()})
	}
	if def, err := s.ten.ProviderFor(ctx, p, "", s.reg); err == nil {
		out.Default = def.ID()
	}
	return out, nil
}
