package appliance

import (
	"github.com/kmsgate/kmsgate/appliance/config"
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

// providerType is one provider type the binary implements: how to build it and which of its
// config fields are secret.
type providerType struct {
	factory func(a *Appliance) providers.Factory
	secrets func() []string
}

// providerTypes is the one table of provider types: the factories, the known-type check of
// kms.json and the redaction of `config check` are all derived from it, so a new provider is one
// package plus one line here. Built on each call (no global registration), so tests can run several
// appliances in one process.
func providerTypes() map[string]providerType {
	noSecrets := func() []string { return nil }
	return map[string]providerType{
		providers.TypeDB: {func(a *Appliance) providers.Factory {
			return a.trackDB(db.Factory(a.sealer, dbAAD, store.SealedKeys{St: a.store}, a.log))
		}, noSecrets},
		providers.TypePKCS11: {func(a *Appliance) providers.Factory { return providers.FactoryFor(pkcs11.New, a.log) }, pkcs11.SecretFields},
		providers.TypeVault:  {func(a *Appliance) providers.Factory { return providers.FactoryFor(vault.New, a.log) }, vault.SecretFields},
		providers.TypeAWSKMS: {func(a *Appliance) providers.Factory { return providers.FactoryFor(awskms.New, a.log) }, awskms.SecretFields},
		providers.TypeHTTP:   {func(a *Appliance) providers.Factory { return providers.FactoryFor(httpkms.New, a.log) }, httpkms.SecretFields},
	}
}

// ProviderCatalog describes the provider types for loading and redacting kms.json.
func ProviderCatalog() config.Catalog {
	c := config.Catalog{}
	for typ, t := range providerTypes() {
		c[typ] = t.secrets()
	}
	return c
}

// factories maps every provider type to its constructor, for this appliance.
func (a *Appliance) factories() map[string]providers.Factory {
	out := map[string]providers.Factory{}
	for typ, t := range providerTypes() {
		out[typ] = t.factory(a)
	}
	return out
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
