package keychain

import (
	"context"
	"crypto/ecdsa"
	"crypto/x509"
	"fmt"

	"github.com/google/uuid"

	"github.com/kmsgate/kmsgate/appliance/keys"
	"github.com/kmsgate/kmsgate/appliance/store"
	"github.com/kmsgate/kmsgate/appliance/tenants"
	"github.com/kmsgate/kmsgate/internal/errs"
	"github.com/kmsgate/kmsgate/providers"
)

// Create generates a chain (POST /key-chain) and returns its id. Every chain it makes is a
// signing chain with a certificate, usageType encrypt included: that is what EUDIPLO does (it
// has no special case), and the tenant's ECDH encrypt chain is made only by the bootstrap.
func (s *Service) Create(ctx context.Context, p *tenants.Principal, req CreateRequest) (string, error) {
	if err := validateUsage(req.UsageType); err != nil {
		return "", err
	}
	if req.Type != TypeStandalone && req.Type != TypeInternalChain {
		return "", badField(IssueInvalidValue, []any{"type"}, "validation_failed", "type must be standalone or internalChain (got %q)", req.Type)
	}
	if err := validateDescription(req.Description); err != nil {
		return "", err
	}
	if err := validatePolicy(req.RotationPolicy, true); err != nil {
		return "", err
	}
	prov, err := s.ten.ProviderFor(ctx, p, req.KMSProvider, s.reg)
	if err != nil {
		return "", at(err, IssueInvalidValue, "kmsProvider")
	}
	var pol Policy
	req.RotationPolicy.apply(&pol)
	desc := ""
	if req.Description != nil {
		desc = *req.Description
	}
	return s.create(ctx, p.TenantID, prov, req.UsageType, KeyUseSign, req.Type, desc, pol)
}

func cannotCreate(prov providers.Provider) error {
	return errs.Errorf(errs.NotSupported, "provider %q (type %s) cannot create keys", prov.ID(), prov.Type()).
		WithCode("create_not_supported")
}

// create makes a chain of usage type usage whose key is used as use (KeyUseSign or
// KeyUseEncrypt).
func (s *Service) create(ctx context.Context, tenant string, prov providers.Provider, usage, use, typ, desc string, pol Policy) (string, error) {
	if !prov.Capabilities().CanCreate {
		return "", cannotCreate(prov)
	}
	name, err := s.tenantName(ctx, tenant)
	if err != nil {
		return "", err
	}
	release, err := s.idx.reserve(ctx, s, tenant)
	if err != nil {
		return "", err
	}
	defer release()
	now := s.now()
	c := &Chain{ID: uuid.NewString(), Tenant: tenant, Description: desc, UsageType: usage, Usage: use,
		Provider: prov.ID(), Rotation: pol, CreatedAt: now, UpdatedAt: now}
	ks := s.lc.Begin()
	if err := s.generateChain(ctx, c, prov, typ, name, ks); err != nil {
		ks.Rollback()
		return "", err
	}
	if err := s.commitChain(ctx, ks, c, true); err != nil {
		return "", err
	}
	return c.ID, nil
}

// generateChain fills c with freshly generated keys and certificates.
func (s *Service) generateChain(ctx context.Context, c *Chain, prov providers.Provider, typ, name string, ks *keys.Batch) error {
	if c.Usage == KeyUseEncrypt {
		// The encrypt chain is an ECDH key: no certificate, never signs (EUDIPLO usage=encrypt).
		k, _, err := s.newKey(ctx, c, prov, c.ID+"-active", ks)
		if err != nil {
			return err
		}
		c.Active = k
		return nil
	}
	var issuer *x509.Certificate
	var issuerSigner signer
	var rootPEM string
	if typ == TypeInternalChain {
		rk, rref, err := s.newKey(ctx, c, prov, c.ID+"-root", ks)
		if err != nil {
			return err
		}
		rootSigner := s.signerOf(prov, rref)
		root, err := s.prof.issue(ctx, certSpec{commonName: name + " Root CA", ca: true, days: RootValidityDays,
			subjectPub: rref.Public, now: s.now()}, rootSigner)
		if err != nil {
			return fmt.Errorf("root certificate: %w", err)
		}
		c.Root, c.RootCertificate = &rk, pemOf(root)
		issuer, issuerSigner, rootPEM = root, rootSigner, c.RootCertificate
	}
	ak, aref, err := s.newKey(ctx, c, prov, c.ID+"-active", ks)
	if err != nil {
		return err
	}
	if issuer == nil {
		issuerSigner = s.signerOf(prov, aref)
	}
	leaf, err := s.prof.issue(ctx, certSpec{commonName: name, days: c.certValidityDays(), subjectPub: aref.Public,
		issuer: issuer, now: s.now()}, issuerSigner)
	if err != nil {
		return fmt.Errorf("leaf certificate: %w", err)
	}
	c.Active, c.ActiveCertificate = ak, joinPEM(pemOf(leaf), rootPEM)
	return nil
}

func (s *Service) newKey(ctx context.Context, c *Chain, prov providers.Provider, kid string, ks *keys.Batch) (store.KeyRef, providers.KeyRef, error) {
	ref, err := ks.Generate(ctx, prov, providers.KeySpec{Tenant: c.Tenant, KID: kid, Alg: providers.ES256})
	if err != nil {
		return store.KeyRef{}, ref, fmt.Errorf("generate key %s: %w", kid, err)
	}
	k, err := storedKey(ref, jwkAlg(c.Usage))
	return k, ref, err
}

func (s *Service) importKey(ctx context.Context, c *Chain, prov providers.Provider, kid string, priv *ecdsa.PrivateKey, ks *keys.Batch) (store.KeyRef, providers.KeyRef, error) {
	ref, err := ks.Import(ctx, prov, providers.KeySpec{Tenant: c.Tenant, KID: kid, Alg: providers.ES256}, priv)
	if err != nil {
		return store.KeyRef{}, ref, fmt.Errorf("import key %s: %w", kid, err)
	}
	k, err := storedKey(ref, jwkAlg(c.Usage))
	return k, ref, err
}
