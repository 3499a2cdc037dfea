package appliance

import (
	"context"

	"github.com/kmsgate/kmsgate/api"
	"github.com/kmsgate/kmsgate/appliance/keychain"
)

// serviceProbe is a context key that asks the tenant hook for the key-chain service instead of
// running a bootstrap. Appliance (app.go, owned elsewhere) has no field for the service, and the
// scheduler and tests need the very instance the API uses (it holds the per-chain locks and the
// clock), so the hook closure — the one place setupKeyChains may store it — also hands it out.
// TODO: replace with a keyChains field on Appliance.
type serviceProbe struct{}

// setupKeyChains builds the key-chain service, wires it into the API and the tenant-creation
// hook, and runs the config-folder import. A bad import file is logged and skipped: it must not
// keep the appliance from starting.
func (a *Appliance) setupKeyChains(ctx context.Context, deps *api.Deps) error {
	svc := keychain.New(keychain.Config{Store: a.store, Registry: a.registry, Tenants: a.tenants,
		Metrics: a.metrics, Logger: a.log, PublicURL: a.opts.PublicURL, Country: a.opts.CertCountry,
		Grace: a.opts.RotationGrace})
	deps.KeyChains = svc
	a.onTenantCreated = func(ctx context.Context, tenant string) error {
		if p, ok := ctx.Value(serviceProbe{}).(**keychain.Service); ok {
			*p = svc
			return nil
		}
		return svc.Bootstrap(ctx, tenant)
	}
	svc.ImportFolder(ctx, keychain.ImportOptions{Dir: a.opts.ConfigDir, Force: a.opts.ConfigImportForce,
		Lookup: a.opts.Lookup, TenantCreated: svc.Bootstrap})
	return nil
}

// KeyChains returns the key-chain service the API uses (tests move its clock).
func (a *Appliance) KeyChains() *keychain.Service {
	var svc *keychain.Service
	if a.onTenantCreated != nil {
		_ = a.onTenantCreated(context.WithValue(context.Background(), serviceProbe{}, &svc), "")
	}
	return svc
}

// startKeyChainScheduler runs the rotation scheduler until ctx ends.
func (a *Appliance) startKeyChainScheduler(ctx context.Context) {
	if svc := a.KeyChains(); svc != nil {
		svc.RunScheduler(ctx, a.opts.RotationCheckInterval)
	}
}
