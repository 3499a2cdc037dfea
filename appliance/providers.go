package appliance

import (
	"github.com/kmsgate/kmsgate/appliance/seal"
	"github.com/kmsgate/kmsgate/appliance/store"
	"github.com/kmsgate/kmsgate/hsm"
	"github.com/kmsgate/kmsgate/providers"
	"github.com/kmsgate/kmsgate/providers/awskms"
	"github.com/kmsgate/kmsgate/providers/db"
	"github.com/kmsgate/kmsgate/providers/httpkms"
	"github.com/kmsgate/kmsgate/providers/pkcs11"
	"github.com/kmsgate/kmsgate/providers/vault"
)

// factories maps every provider type to its constructor. Built per appliance (no global
// registration), so tests can run several appliances in one process.
func (a *Appliance) factories() map[string]providers.Factory {
	return map[string]providers.Factory{
		providers.TypeDB:     db.Factory(a.sealer, dbAAD, store.SealedKeys{St: a.store}, a.log),
		providers.TypePKCS11: providers.FactoryFor(pkcs11.New, a.log),
		providers.TypeVault:  providers.FactoryFor(vault.New, a.log),
		providers.TypeAWSKMS: providers.FactoryFor(awskms.New, a.log),
		providers.TypeHTTP:   providers.FactoryFor(httpkms.New, a.log),
	}
}

// dbAAD binds a db key's sealed material to its tenant and kid.
func dbAAD(tenant, kid string) []byte { return seal.AAD("db-key", tenant, kid) }

// poolStatser is implemented by providers with a PKCS#11 session pool.
type poolStatser interface{ Stats() hsm.Stats }

// registerProviderMetrics adds collectors for provider-specific state. The PKCS#11 collector reads
// counters only, so a scrape never touches a token.
func (a *Appliance) registerProviderMetrics() {
	pools := map[string]poolStatser{}
	for _, p := range a.registry.All() {
		// Providers with their own counters (aws-kms throttling) export them directly.
		if c, ok := providers.As[providers.MetricsCollector](p); ok {
			a.metrics.Registry.MustRegister(c)
		}
		if s, ok := providers.As[poolStatser](p); ok {
			pools[p.ID()] = s
		}
	}
	if len(pools) == 0 {
		return
	}
	a.metrics.Registry.MustRegister(pkcs11.NewCollector(func() map[string]hsm.Stats {
		out := make(map[string]hsm.Stats, len(pools))
		for id, p := range pools {
			out[id] = p.Stats()
		}
		return out
	}))
}
