package appliance

import (
	"context"

	"github.com/kmsgate/kmsgate/api"
)

// setupKeyChains builds the key-chain service, fills deps.KeyChains and a.onTenantCreated, and runs
// the config-folder import. Replaced by the key-chain implementation.
func (a *Appliance) setupKeyChains(ctx context.Context, deps *api.Deps) error { return nil }

// startBackground starts key-chain background work (the rotation scheduler) until ctx ends.
func (a *Appliance) startKeyChainScheduler(ctx context.Context) {}
