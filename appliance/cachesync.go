package appliance

import (
	"context"
	"errors"
	"sync"
	"time"

	"github.com/kmsgate/kmsgate/appliance/authn"
	"github.com/kmsgate/kmsgate/appliance/store"
	"github.com/kmsgate/kmsgate/providers"
	"github.com/kmsgate/kmsgate/providers/db"
)

// DefaultCacheRefreshInterval is how often a replica on a shared store rebuilds its caches even
// without a change notice: the bound on staleness should a notice ever be lost unnoticed.
const DefaultCacheRefreshInterval = 30 * time.Second

// trackDB remembers every db provider the factory builds, so that a sealed key deleted through
// another replica can be evicted from its cache.
func (a *Appliance) trackDB(f providers.Factory) providers.Factory {
	return func(ctx context.Context, cfg providers.Config) (providers.Provider, error) {
		p, err := f(ctx, cfg)
		if dp, ok := p.(*db.Provider); ok && err == nil {
			a.mu.Lock()
			a.dbProvs = append(a.dbProvs, dp)
			a.mu.Unlock()
		}
		return p, err
	}
}

// syncCaches keeps this replica's caches (credentials, key references, key chains, unsealed db
// keys) in step with writes made through every replica of a shared store: each change notice
// refreshes the records it names, a Reset (the listener connected or reconnected, so notices may
// be lost) and the periodic timer rebuild them all. Notices and rebuilds run one at a time, so a
// notice for a write that committed during a rebuild is applied after it, never overwritten by
// the rebuild's older picture.
func (a *Appliance) syncCaches(ctx context.Context) {
	var mu sync.Mutex
	every := a.opts.CacheRefreshInterval
	if every == 0 {
		every = DefaultCacheRefreshInterval
	}
	if every > 0 {
		go func() {
			t := time.NewTicker(every)
			defer t.Stop()
			for {
				select {
				case <-ctx.Done():
					return
				case <-t.C:
					mu.Lock()
					a.refreshCaches(ctx, "periodic")
					mu.Unlock()
				}
			}
		}()
	}
	_ = a.store.Watch(ctx, func(c store.Change) {
		mu.Lock()
		defer mu.Unlock()
		if c.Reset {
			a.refreshCaches(ctx, "listener connected")
			return
		}
		a.applyChange(ctx, c.Key)
	})
}

// applyChange refreshes what the record key feeds. Records no cache holds (tenants, metadata,
// bootstrap state) are read from the store on use and need nothing.
func (a *Appliance) applyChange(ctx context.Context, key string) {
	if key == authn.RecordKey {
		if err := a.systemKey.Reload(ctx); err != nil {
			a.log.Warn("cache refresh: system key", "error", err)
		}
		return
	}
	if a.keys.InvalidateRecord(key) {
		return
	}
	if ok, err := a.tenants.RefreshRecord(ctx, key); ok {
		if err != nil {
			a.log.Warn("cache refresh: credential", "error", err)
		}
		return
	}
	if ok, err := a.keyChains.RefreshRecord(ctx, key); ok {
		if err != nil {
			a.log.Warn("cache refresh: key chain", "error", err)
		}
		return
	}
	if id, ok := store.ParseDBKeyKey(key); ok {
		// Only a deletion matters: ids are never reused, so a cached key is never stale otherwise.
		if _, found, err := (store.SealedKeys{St: a.store}).Load(ctx, id); err == nil && !found {
			a.mu.Lock()
			provs := a.dbProvs
			a.mu.Unlock()
			for _, p := range provs {
				p.Evict(id)
			}
		}
	}
}

// refreshCaches rebuilds every cache from the store.
func (a *Appliance) refreshCaches(ctx context.Context, why string) {
	start := time.Now()
	if err := a.keys.Revalidate(ctx); err != nil {
		a.log.Warn("cache refresh: key references", "reason", why, "error", err)
	}
	if err := a.tenants.Reload(ctx); err != nil {
		a.log.Warn("cache refresh: credentials", "reason", why, "error", err)
	}
	if err := a.systemKey.Reload(ctx); err != nil && !errors.Is(err, authn.ErrNoSystemKey) {
		a.log.Warn("cache refresh: system key", "reason", why, "error", err)
	}
	if err := a.keyChains.Refresh(ctx); err != nil {
		a.log.Warn("cache refresh: key chains", "reason", why, "error", err)
	}
	a.log.Debug("caches refreshed from the store", "reason", why, "duration", time.Since(start).String())
}
