package appliance

import (
	"context"

	"github.com/kmsgate/kmsgate/api"
	"github.com/kmsgate/kmsgate/appliance/keychain"
)

// setupKeyChains builds the key-chain service, wires it into the API and the tenant-creation
// hook, and runs the config-folder import. A bad import file is logged and skipped: it must not
// keep the appliance from starting.
func (a *Appliance) setupKeyChains(ctx context.Context, deps *api.Deps) error {
	svc := keychain.New(keychain.Config{Store: a.store, Registry: a.registry, Tenants: a.tenants, Lifecycle: a.keys.Lifecycle(),
		Metrics: a.metrics, Logger: a.log, PublicURL: a.opts.PublicURL, Country: a.opts.CertCountry,
		Grace: a.opts.RotationGrace})
	a.keyChains = svc
	deps.KeyChains = svc
	a.onTenantCreated = svc.Bootstrap
	svc.ImportFolder(ctx, keychain.ImportOptions{Dir: a.opts.ConfigDir, Force: a.opts.ConfigImportForce,
		Lookup: a.opts.Lookup, TenantCreated: svc.Bootstrap})
	a.bootstrapEmptyTenants(ctx, svc)
	return nil
}

// bootstrapEmptyTenants gives every tenant that has no key chain at all its default chains, as
// EUDIPLO promises "on startup" (a tenant created offline by the CLI gets them here). A tenant
// that deleted some of its chains on purpose keeps what it has.
func (a *Appliance) bootstrapEmptyTenants(ctx context.Context, svc *keychain.Service) {
	ts, err := a.tenants.List(ctx)
	if err != nil {
		a.log.Error("start-up bootstrap: list tenants", "err", err)
		return
	}
	for _, t := range ts {
		chains, err := svc.List(ctx, t.ID, "")
		if err != nil || len(chains) > 0 {
			continue
		}
		if err := svc.Bootstrap(ctx, t.ID); err != nil {
			a.log.Error("start-up bootstrap failed", "tenant", t.ID, "err", err)
		}
	}
}

// KeyChains returns the key-chain service the API uses (tests move its clock).
func (a *Appliance) KeyChains() *keychain.Service { return a.keyChains }

// startKeyChainScheduler runs the rotation scheduler until ctx ends.
func (a *Appliance) startKeyChainScheduler(ctx context.Context) {
	a.keyChains.RunScheduler(ctx, a.opts.RotationCheckInterval)
}
