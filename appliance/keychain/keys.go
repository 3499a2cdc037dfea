package keychain

import (
	"context"
	"fmt"

	"github.com/kmsgate/kmsgate/appliance/keys"
	"github.com/kmsgate/kmsgate/appliance/store"
	"github.com/kmsgate/kmsgate/providers"
)

func (s *Service) deleteKey(ctx context.Context, tenant string, k store.KeyRef) error {
	prov, err := s.reg.Get(k.ProviderID)
	if err != nil {
		return fmt.Errorf("provider of key %s: %w", k.KID, err)
	}
	ref, err := keys.ProviderRef(k, tenant)
	if err != nil {
		return err
	}
	if err := s.lc.Delete(ctx, prov, ref); err != nil {
		return fmt.Errorf("delete key %s: %w", k.KID, err)
	}
	return nil
}

func sameKey(a, b store.KeyRef) bool {
	return a.ProviderID == b.ProviderID && a.KID == b.KID && a.ExternalID == b.ExternalID
}

// jwkAlg is the alg published for a chain's keys: a chain whose key is used for encryption
// holds an ECDH-ES key.
func jwkAlg(use string) string {
	if use == KeyUseEncrypt {
		return "ECDH-ES"
	}
	return providers.ES256
}
