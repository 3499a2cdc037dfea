package appliance

import (
	"github.com/kmsgate/kmsgate/appliance/seal"
	"github.com/kmsgate/kmsgate/providers"
	"github.com/kmsgate/kmsgate/providers/db"
)

// factories maps every provider type to its constructor. Built per appliance (no global
// registration), so tests can run several appliances in one process.
func (a *Appliance) factories() map[string]providers.Factory {
	return map[string]providers.Factory{
		providers.TypeDB: db.Factory(a.sealer, dbAAD, a.log),
	}
}

// dbAAD binds a db key's sealed material to its tenant and kid.
func dbAAD(tenant, kid string) []byte { return seal.AAD("db-key", tenant, kid) }

// registerProviderMetrics adds collectors for provider-specific state (PKCS#11 pools).
func (a *Appliance) registerProviderMetrics() {}
