package keychain

import (
	"context"
	"fmt"
	"strconv"

	"github.com/kmsgate/kmsgate/appliance/keys"
	"github.com/kmsgate/kmsgate/appliance/store"
	"github.com/kmsgate/kmsgate/internal/keyutil"
	"github.com/kmsgate/kmsgate/providers"
)

// Export returns the chain in the import-file format (GET /export).
func (s *Service) Export(ctx context.Context, tenant, id string) (*Export, error) {
	c, err := s.load(ctx, tenant, id)
	if err != nil {
		return nil, err
	}
	ex, _ := s.exporter(c.Provider)
	exportable := ex != nil
	jwkOf := func(k store.KeyRef) (keyutil.JWK, error) {
		if ex == nil {
			return k.PublicJWK, nil
		}
		ref, err := keys.ProviderRef(k, tenant)
		if err != nil {
			return keyutil.JWK{}, err
		}
		priv, err := ex.ExportPrivate(ref)
		if err != nil {
			return keyutil.JWK{}, fmt.Errorf("export key %s: %w", k.KID, err)
		}
		return keyutil.PrivateJWK(priv, k.KID, k.PublicJWK.Alg)
	}
	out := &Export{ID: c.ID, Description: c.Description, UsageType: c.UsageType, KMSProvider: c.Provider,
		PrivateKeyExportable: exportable}
	if c.Rotation.Enabled {
		out.RotationPolicy = &ExportPolicy{Enabled: true, IntervalDays: intPtr(c.Rotation.IntervalDays),
			CertValidityDays: intPtr(c.Rotation.CertValidityDays)}
	}
	if c.Type() == TypeInternalChain {
		if out.Key, err = jwkOf(*c.Root); err != nil {
			return nil, err
		}
		out.Crt = splitPEM(c.RootCertificate)
		ak, err := jwkOf(c.Active)
		if err != nil {
			return nil, err
		}
		out.ActiveKey, out.ActiveCrt = &ak, splitPEM(c.ActiveCertificate)
		return out, nil
	}
	if out.Key, err = jwkOf(c.Active); err != nil {
		return nil, err
	}
	out.Crt = splitPEM(c.ActiveCertificate)
	return out, nil
}

func (s *Service) exporter(providerID string) (providers.PrivateExporter, error) {
	prov, err := s.reg.Get(providerID)
	if err != nil {
		return nil, err
	}
	ex, _ := providers.As[providers.PrivateExporter](prov)
	return ex, nil
}

// KeyRefs returns the provider references of a chain's keys (active, previous = the most recent
// previous key, previous.N = the N-th previous key oldest first, root; absent ones omitted), for
// diagnostics and tests that check a backend directly.
func (s *Service) KeyRefs(ctx context.Context, tenant, id string) (map[string]providers.KeyRef, error) {
	c, err := s.load(ctx, tenant, id)
	if err != nil {
		return nil, err
	}
	out := map[string]providers.KeyRef{}
	add := func(name string, k *store.KeyRef) error {
		if k == nil {
			return nil
		}
		r, err := keys.ProviderRef(*k, tenant)
		if err != nil {
			return err
		}
		out[name] = r
		return nil
	}
	named := map[string]*store.KeyRef{"active": &c.Active, "root": c.Root}
	if p := c.latestPrevious(); p != nil {
		named["previous"] = &p.Key
	}
	for i := range c.PreviousKeys {
		named["previous."+strconv.Itoa(i)] = &c.PreviousKeys[i].Key
	}
	for name, k := range named {
		if err := add(name, k); err != nil {
			return nil, err
		}
	}
	return out, nil
}
