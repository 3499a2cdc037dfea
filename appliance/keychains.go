package appliance

import (
	"context"
	"fmt"

	"github.com/kmsgate/kmsgate/api"
	"github.com/kmsgate/kmsgate/appliance/keychain"
	"github.com/kmsgate/kmsgate/appliance/tenants"
)

// DefaultMaxChainsPerTenant is the default key-chain quota of a tenant: far above what an issuer
// uses (a handful per usage type), low enough that one tenant cannot fill the store.
const DefaultMaxChainsPerTenant = 10000

// setupKeyChains builds the key-chain service, wires it into the API, indexes the stored chains,
// runs the config-folder import and bootstraps tenants that need it. A bad import file is logged
// and skipped: it must not keep the appliance from starting.
func (a *Appliance) setupKeyChains(ctx context.Context, deps *api.Deps) error {
	svc := keychain.New(keychain.Config{Store: a.store, Registry: a.registry, Tenants: a.tenants, Lifecycle: a.keys.Lifecycle(),
		Metrics: a.metrics, Logger: a.log, PublicURL: a.opts.PublicURL, Country: a.opts.CertCountry,
		Grace: a.opts.RotationGrace, MaxChainsPerTenant: orDefault(a.opts.MaxChainsPerTenant, DefaultMaxChainsPerTenant)})
	if err := svc.Warm(ctx); err != nil {
		return err
	}
	a.keyChains = svc
	deps.KeyChains = svc
	svc.ImportFolder(ctx, keychain.ImportOptions{Dir: a.opts.ConfigDir, Force: a.opts.ConfigImportForce,
		Lookup: a.opts.Lookup, TenantCreated: func(ctx context.Context, tenant string) error {
			return bootstrapErr(tenant, a.bootstrapTenant(ctx, tenant))
		}})
	a.bootstrapEmptyTenants(ctx)
	svc.RetryBootstraps(ctx)
	return nil
}

// bootstrapTenant is the one place a tenant's default key chains are made: after the admin API,
// the CLI, dev mode or the config folder created a tenant, and at start-up for tenants with none.
// Failures are in the report (and retried by the service); they never undo the tenant.
func (a *Appliance) bootstrapTenant(ctx context.Context, tenant string) *keychain.BootstrapReport {
	if a.keyChains == nil {
		return nil
	}
	rep, err := a.keyChains.Bootstrap(ctx, tenant)
	if err != nil {
		a.log.Error("tenant bootstrap failed", "tenant", tenant, "error", err)
	}
	return rep
}

func bootstrapErr(tenant string, rep *keychain.BootstrapReport) error {
	if f := rep.Failed(); len(f) > 0 {
		return fmt.Errorf("tenant %s: %d default key chain(s) not created yet (first: %s: %s)", tenant, len(f),
			f[0].UsageType, f[0].Reason)
	}
	return nil
}

// CreateTenant creates a tenant with its first API key and bootstraps its default key chains.
// The tenant exists once this returns without error, whatever the bootstrap report says.
func (a *Appliance) CreateTenant(ctx context.Context, req tenants.CreateTenantRequest) (*api.TenantCreated, error) {
	res, err := a.tenants.CreateTenant(ctx, req)
	if err != nil {
		return nil, err
	}
	return &api.TenantCreated{CreateTenantResult: res, Bootstrap: a.bootstrapTenant(ctx, res.ID)}, nil
}

// bootstrapEmptyTenants gives every tenant that has no key chain at all its default chains, as
// EUDIPLO promises "on startup" (a tenant created offline by the CLI gets them here). A tenant
// that deleted some of its chains on purpose keeps what it has; usage types whose bootstrap
// failed are retried from their record instead.
func (a *Appliance) bootstrapEmptyTenants(ctx context.Context) {
	ts, err := a.tenants.List(ctx)
	if err != nil {
		a.log.Error("start-up bootstrap: list tenants", "error", err)
		return
	}
	for _, t := range ts {
		if t.ID == "" {
			continue
		}
		n, err := a.keyChains.Count(ctx, t.ID)
		if err != nil || n > 0 {
			continue
		}
		a.bootstrapTenant(ctx, t.ID)
	}
}

// KeyChains returns the key-chain service the API uses (tests move its clock).
func (a *Appliance) KeyChains() *keychain.Service { return a.keyChains }

// startKeyChainScheduler runs the rotation scheduler until ctx ends.
func (a *Appliance) startKeyChainScheduler(ctx context.Context) {
	a.keyChains.RunScheduler(ctx, a.opts.RotationCheckInterval)
}
