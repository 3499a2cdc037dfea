package keychain

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/x509"
	"errors"
	"fmt"
	"strconv"
	"strings"

	"github.com/google/uuid"

	"github.com/kmsgate/kmsgate/appliance/keys"
	"github.com/kmsgate/kmsgate/appliance/store"
	"github.com/kmsgate/kmsgate/appliance/tenants"
	"github.com/kmsgate/kmsgate/internal/errs"
	"github.com/kmsgate/kmsgate/internal/keyutil"
	"github.com/kmsgate/kmsgate/providers"
)

// parseImportKey checks a private JWK of an import request; ecdh admits an ECDH-ES alg (the
// tenant's encrypt key).
func parseImportKey(field string, j *keyutil.JWK, ecdh bool, exportable *bool) (*ecdsa.PrivateKey, error) {
	if j == nil {
		return nil, badField(IssueInvalidType, []any{field}, "validation_failed", "%s is required", field)
	}
	if j.D == "" {
		msg := "%s must be a private JWK (\"d\" is missing): an import needs the private key"
		if exportable != nil && !*exportable {
			msg += "; this file was exported from an external provider, whose keys cannot leave the backend"
		}
		return nil, badField(IssueCustom, []any{field, "d"}, "invalid_key", msg, field)
	}
	switch {
	case j.Alg == "", j.Alg == providers.ES256:
	case ecdh && isECDH(j.Alg):
	default:
		return nil, badField(IssueInvalidValue, []any{field, "alg"}, "invalid_key", "%s.alg must be ES256 (got %q)", field, j.Alg)
	}
	priv, err := keyutil.ParsePrivateJWK(*j)
	if err != nil {
		return nil, badField(IssueCustom, []any{field}, "invalid_key", "%s: %v", field, err)
	}
	return priv, nil
}

func isECDH(alg string) bool { return strings.HasPrefix(alg, "ECDH-ES") }

// Import stores a chain from an imported private key (POST /key-chain/import and config files)
// and returns its id. An existing id is replaced (upsert). It has three modes, as EUDIPLO's import:
//
//  1. rotation off, crt given: the key is the active key, crt (validated) is its chain;
//  2. rotation off, no crt: the key is the active key with a fresh self-signed leaf;
//  3. rotation on (or activeKey given, the internal-chain export form): the key is the root CA,
//     its certificate is the last crt entry (validated: CA, key match) or generated, and a fresh
//     leaf key is generated and certified by it — or activeKey/activeCrt are imported as the leaf.
//
// Like create, an import makes a signing chain whatever its usage type, encrypt included (as
// EUDIPLO). The one exception is an ECDH-ES key under usageType encrypt: that is the tenant's
// encrypt chain coming back (its export, or a config file), and it stays an encrypt chain.
func (s *Service) Import(ctx context.Context, p *tenants.Principal, req ImportRequest) (string, error) {
	if err := validateUsage(req.UsageType); err != nil {
		return "", err
	}
	if err := validateDescription(req.Description); err != nil {
		return "", err
	}
	if err := validatePolicy(req.RotationPolicy, true); err != nil {
		return "", err
	}
	if req.ID != "" && !idRe.MatchString(req.ID) {
		return "", badField(IssueInvalidFormat, []any{"id"}, "validation_failed", "id must be 1-128 characters of A-Z a-z 0-9 . _ - starting with a letter or digit")
	}
	encryptKey := req.UsageType == UsageEncrypt && req.Key != nil && isECDH(req.Key.Alg)
	priv, err := parseImportKey("key", req.Key, encryptKey, req.PrivateKeyExportable)
	if err != nil {
		return "", err
	}
	rootMode := (req.RotationPolicy != nil && *req.RotationPolicy.Enabled) || req.ActiveKey != nil
	if encryptKey && (len(req.Crt) > 0 || rootMode) {
		return "", badField(IssueCustom, []any{"key", "alg"}, "validation_failed", "an ECDH-ES key makes an encrypt key chain, which carries no certificate and does not rotate through a CA: drop crt, activeKey and rotationPolicy.enabled, or import an ES256 key")
	}
	if req.ActiveKey == nil && len(req.ActiveCrt) > 0 {
		return "", badField(IssueCustom, []any{"activeCrt"}, "validation_failed", "activeCrt needs activeKey")
	}
	prov, err := s.ten.ProviderFor(ctx, p, req.KMSProvider, s.reg)
	if err != nil {
		return "", at(err, IssueInvalidValue, "kmsProvider")
	}
	caps := prov.Capabilities()
	if !caps.CanImport {
		return "", errs.Errorf(errs.NotSupported,
			"provider %q (type %s) cannot import keys: create the key chain with POST /key-chain instead, or import into a provider that can (e.g. db)",
			prov.ID(), prov.Type()).WithCode("import_not_supported")
	}
	if rootMode && req.ActiveKey == nil && !caps.CanCreate {
		return "", cannotCreate(prov)
	}
	id := req.ID
	if id == "" {
		id = uuid.NewString()
	}
	tenant := p.TenantID
	name, err := s.tenantName(ctx, tenant)
	if err != nil {
		return "", err
	}
	defer s.lock(tenant, id)()
	var existing *Chain
	if c, err := s.load(ctx, tenant, id); err == nil {
		existing = c
	} else if errs.KindOf(err) != errs.NotFound {
		return "", err
	}
	if existing == nil {
		// A replacement keeps the count; only a new chain takes one of the tenant's quota.
		release, err := s.idx.reserve(ctx, s, tenant)
		if err != nil {
			return "", err
		}
		defer release()
	}
	now := s.now()
	c := &Chain{ID: id, Tenant: tenant, UsageType: req.UsageType, Usage: KeyUseSign, Provider: prov.ID(),
		CreatedAt: now, UpdatedAt: now}
	if encryptKey {
		c.Usage = KeyUseEncrypt
	}
	if req.Description != nil {
		c.Description = *req.Description
	}
	if existing != nil {
		// The replacement is written only if the record is still the one read here.
		c.CreatedAt, c.base = existing.CreatedAt, existing.base
	}
	req.RotationPolicy.apply(&c.Rotation)
	// On a replacement in an external backend the old key still exists under the plain kid until
	// the new record is written; a suffix keeps the two apart (db keys live in the record).
	suffix := ""
	if existing != nil && prov.Type() != providers.TypeDB {
		suffix = "-import-" + strconv.FormatInt(now.UnixMilli(), 10)
	}
	ks := s.lc.Begin()
	if rootMode {
		err = s.importRootMode(ctx, c, prov, req, priv, name, suffix, ks)
	} else {
		err = s.importLeafMode(ctx, c, prov, req, priv, name, suffix, ks)
	}
	if err != nil {
		ks.Rollback()
		return "", err
	}
	if err := s.commitChain(ctx, ks, c, false); err != nil {
		if errors.Is(err, errStale) {
			return "", errConflict(id) // another replica wrote the same id meanwhile
		}
		return "", err
	}
	if existing != nil {
		for _, old := range existing.keys() {
			if containsKey(c.keys(), old) {
				continue
			}
			if err := s.deleteKey(ctx, tenant, old); err != nil {
				s.log.Warn("import: could not delete a replaced key", "chain", id, "kid", old.KID, "error", err)
			}
		}
	}
	return id, nil
}

func containsKey(keys []store.KeyRef, k store.KeyRef) bool {
	for _, x := range keys {
		if sameKey(x, k) {
			return true
		}
	}
	return false
}

// importLeafMode is modes 1 and 2.
func (s *Service) importLeafMode(ctx context.Context, c *Chain, prov providers.Provider, req ImportRequest,
	priv *ecdsa.PrivateKey, name, suffix string, ks *keys.Batch) error {
	var certs []*x509.Certificate
	if len(req.Crt) > 0 {
		var err error
		if certs, err = validateChain("crt", req.Crt, s.now()); err != nil {
			return err
		}
		if err := requireKeyMatch("crt", 0, len(certs), certs[0], &priv.PublicKey, "imported key"); err != nil {
			return err
		}
	}
	k, ref, err := s.importKey(ctx, c, prov, c.ID+"-active"+suffix, priv, ks)
	if err != nil {
		return err
	}
	c.Active = k
	switch {
	case c.Usage == KeyUseEncrypt:
	case len(certs) > 0:
		c.ActiveCertificate = pemChain(certs)
	default:
		leaf, err := s.prof.issue(ctx, certSpec{commonName: name, days: c.certValidityDays(), subjectPub: ref.Public,
			now: s.now()}, s.signerOf(prov, ref))
		if err != nil {
			return fmt.Errorf("leaf certificate: %w", err)
		}
		c.ActiveCertificate = pemOf(leaf)
	}
	return nil
}

// importRootMode is mode 3.
func (s *Service) importRootMode(ctx context.Context, c *Chain, prov providers.Provider, req ImportRequest,
	priv *ecdsa.PrivateKey, name, suffix string, ks *keys.Batch) error {
	if c.Rotation.Enabled {
		if c.Rotation.IntervalDays == 0 {
			c.Rotation.IntervalDays = importDefaultIntervalDays
		}
		if c.Rotation.CertValidityDays == 0 {
			c.Rotation.CertValidityDays = DefaultCertValidityDays
		}
	}
	var root *x509.Certificate
	if len(req.Crt) > 0 {
		certs, err := validateChain("crt", req.Crt, s.now())
		if err != nil {
			return err
		}
		n := len(certs)
		root = certs[n-1]
		if err := requireCA("crt", n-1, n, root); err != nil {
			return err
		}
		if err := requireKeyMatch("crt", n-1, n, root, &priv.PublicKey, "imported (root CA) key"); err != nil {
			return err
		}
	}
	var leafPriv *ecdsa.PrivateKey
	var leafCerts []*x509.Certificate
	if req.ActiveKey != nil {
		var err error
		if leafPriv, err = parseImportKey("activeKey", req.ActiveKey, false, req.PrivateKeyExportable); err != nil {
			return err
		}
		if len(req.ActiveCrt) == 0 {
			return badField(IssueInvalidType, []any{"activeCrt"}, "validation_failed", "activeCrt is required with activeKey")
		}
		if root == nil {
			return badField(IssueCustom, []any{"crt"}, "validation_failed", "activeKey needs the root certificate in crt")
		}
		if leafCerts, err = validateChain("activeCrt", req.ActiveCrt, s.now()); err != nil {
			return err
		}
		n := len(leafCerts)
		if err := requireKeyMatch("activeCrt", 0, n, leafCerts[0], &leafPriv.PublicKey, "activeKey"); err != nil {
			return err
		}
		if last := leafCerts[n-1]; !bytes.Equal(last.Raw, root.Raw) {
			if err := last.CheckSignatureFrom(root); err != nil {
				return badEntry("activeCrt", n-1, "%s is not issued by the root certificate (last crt entry): %v", label("activeCrt", n-1, n), err)
			}
			leafCerts = append(leafCerts, root)
			if err := checkChainSize("activeCrt", leafCerts); err != nil {
				return err
			}
		}
	}
	rk, rref, err := s.importKey(ctx, c, prov, c.ID+"-root"+suffix, priv, ks)
	if err != nil {
		return err
	}
	if root == nil {
		if root, err = s.prof.issue(ctx, certSpec{commonName: name + " Root CA", ca: true, days: RootValidityDays,
			subjectPub: rref.Public, now: s.now()}, s.signerOf(prov, rref)); err != nil {
			return fmt.Errorf("root certificate: %w", err)
		}
	}
	c.Root, c.RootCertificate = &rk, pemOf(root)
	if leafPriv != nil {
		kid := c.ID + "-active"
		// Keep the exported leaf's kid when it is one of this chain's, so tokens signed before an
		// export/restore still name a published key.
		if j := req.ActiveKey.Kid; strings.HasPrefix(j, c.ID+"-") && idRe.MatchString(j) && j != rk.KID {
			kid = j
		}
		ak, _, err := s.importKey(ctx, c, prov, kid+suffix, leafPriv, ks)
		if err != nil {
			return err
		}
		c.Active, c.ActiveCertificate = ak, pemChain(leafCerts)
		return nil
	}
	ak, aref, err := s.newKey(ctx, c, prov, c.ID+"-active"+suffix, ks)
	if err != nil {
		return err
	}
	leaf, err := s.prof.issue(ctx, certSpec{commonName: name, days: c.certValidityDays(), subjectPub: aref.Public,
		issuer: root, now: s.now()}, s.signerOf(prov, rref))
	if err != nil {
		return fmt.Errorf("leaf certificate: %w", err)
	}
	c.Active, c.ActiveCertificate = ak, joinPEM(pemOf(leaf), c.RootCertificate)
	return nil
}

// exists reports whether the tenant has a chain with id (config import skips existing chains).
func (s *Service) exists(ctx context.Context, tenant, id string) (bool, error) {
	var c Chain
	err := s.st.Get(ctx, chainKey(tenant, id), &c)
	if errors.Is(err, store.ErrNotFound) {
		return false, nil
	}
	return err == nil, err
}
