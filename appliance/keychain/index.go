package keychain

import (
	"context"
	"encoding/json"
	"fmt"
	"sort"
	"sync"
	"time"
)

// index is the in-memory view of which chains each tenant has and of which usage type, so the
// usage-type signing path and the quota check never list and decode a tenant's chain records.
// Each tenant's entry is filled from the store on first use (and for every tenant at start-up by
// Warm); from then on every write of the service keeps it current.
type index struct {
	mu      sync.Mutex
	tenants map[string]*tenantIndex
	// sign caches what signing with a chain needs; every write of a chain drops its entry.
	sign signCache
}

type tenantIndex struct {
	mu     sync.Mutex
	loaded bool
	// touched records a write while the entry was not loaded: a start-up pass that listed the
	// store before that write must not install its older picture.
	touched bool
	chains  map[string]indexEntry // chain id -> entry
	// pending counts creations that passed the quota check and have not finished yet, so
	// concurrent creators cannot overshoot the quota between check and write.
	pending int
}

type indexEntry struct {
	usageType string
	createdAt time.Time
	// encrypt marks the tenant's ECDH encrypt chain (usage=encrypt): it never signs, so signing
	// by usage type passes over it.
	encrypt bool
}

func newIndexEntry(usageType, use string, createdAt time.Time) indexEntry {
	return indexEntry{usageType: usageType, createdAt: createdAt, encrypt: use == KeyUseEncrypt}
}

func newIndex() *index {
	return &index{tenants: map[string]*tenantIndex{}, sign: signCache{m: map[chainRef]*signing{}}}
}

// tenant returns the tenant's entry, loaded, with its lock held; the caller unlocks it.
func (ix *index) tenant(ctx context.Context, s *Service, tenant string) (*tenantIndex, error) {
	ti := ix.entry(tenant)
	ti.mu.Lock()
	if ti.loaded {
		return ti, nil
	}
	err := s.st.List(ctx, tenantPrefix(tenant), func(key string, val []byte) error {
		var c struct {
			ID        string    `json:"id"`
			UsageType string    `json:"usageType"`
			Usage     string    `json:"usage"`
			CreatedAt time.Time `json:"createdAt"`
		}
		if err := json.Unmarshal(val, &c); err != nil {
			return fmt.Errorf("decode key chain %q: %w", key, err)
		}
		ti.chains[c.ID] = newIndexEntry(c.UsageType, c.Usage, c.CreatedAt)
		return nil
	})
	if err != nil {
		clear(ti.chains)
		ti.mu.Unlock()
		return nil, fmt.Errorf("index key chains of tenant %s: %w", tenant, err)
	}
	ti.loaded = true
	return ti, nil
}

func (ix *index) entry(tenant string) *tenantIndex {
	ix.mu.Lock()
	defer ix.mu.Unlock()
	ti := ix.tenants[tenant]
	if ti == nil {
		ti = &tenantIndex{chains: map[string]indexEntry{}}
		ix.tenants[tenant] = ti
	}
	return ti
}

// loadedTenant returns the tenant's entry with its lock held when it is loaded, else nil (an
// unloaded entry is read from the store on first use, which sees every completed write).
func (ix *index) loadedTenant(tenant string) *tenantIndex {
	ti := ix.entry(tenant)
	ti.mu.Lock()
	if !ti.loaded {
		ti.touched = true
		ti.mu.Unlock()
		return nil
	}
	return ti
}

func (ix *index) put(c *Chain) {
	ix.sign.drop(c.Tenant, c.ID)
	if ti := ix.loadedTenant(c.Tenant); ti != nil {
		ti.chains[c.ID] = newIndexEntry(c.UsageType, c.Usage, c.CreatedAt)
		ti.mu.Unlock()
	}
}

func (ix *index) remove(tenant, id string) {
	ix.sign.drop(tenant, id)
	if ti := ix.loadedTenant(tenant); ti != nil {
		delete(ti.chains, id)
		ti.mu.Unlock()
	}
}

func (ix *index) has(ctx context.Context, s *Service, tenant, id string) (bool, error) {
	ti, err := ix.tenant(ctx, s, tenant)
	if err != nil {
		return false, err
	}
	defer ti.mu.Unlock()
	_, ok := ti.chains[id]
	return ok, nil
}

// byUsage returns the ids of the tenant's signing chains of a usage type, oldest first.
func (ix *index) byUsage(ctx context.Context, s *Service, tenant, usage string) ([]string, error) {
	ti, err := ix.tenant(ctx, s, tenant)
	if err != nil {
		return nil, err
	}
	type hit struct {
		id string
		at time.Time
	}
	var hits []hit
	for id, e := range ti.chains {
		if e.usageType == usage && !e.encrypt {
			hits = append(hits, hit{id, e.createdAt})
		}
	}
	ti.mu.Unlock()
	sort.Slice(hits, func(i, j int) bool {
		if !hits[i].at.Equal(hits[j].at) {
			return hits[i].at.Before(hits[j].at)
		}
		return hits[i].id < hits[j].id
	})
	out := make([]string, len(hits))
	for i, h := range hits {
		out[i] = h.id
	}
	return out, nil
}

// usages returns the usage types the tenant has at least one chain of, as the bootstrap counts
// them: encrypt means the ECDH encrypt chain, not a signing chain whose usage type is encrypt.
func (ix *index) usages(ctx context.Context, s *Service, tenant string) (map[string]bool, error) {
	ti, err := ix.tenant(ctx, s, tenant)
	if err != nil {
		return nil, err
	}
	defer ti.mu.Unlock()
	have := map[string]bool{}
	for _, e := range ti.chains {
		switch {
		case e.encrypt:
			have[UsageEncrypt] = true
		case e.usageType != UsageEncrypt:
			have[e.usageType] = true
		}
	}
	return have, nil
}

// reserve claims one chain of the tenant's quota before a new chain is written; release gives the
// claim back (after the write, successful or not: a written chain is counted by the index).
func (ix *index) reserve(ctx context.Context, s *Service, tenant string) (release func(), err error) {
	ti, err := ix.tenant(ctx, s, tenant)
	if err != nil {
		return nil, err
	}
	defer ti.mu.Unlock()
	if s.maxChains > 0 && len(ti.chains)+ti.pending >= s.maxChains {
		return nil, errQuota(tenant, s.maxChains)
	}
	ti.pending++
	var once sync.Once
	return func() {
		once.Do(func() {
			ti.mu.Lock()
			ti.pending--
			ti.mu.Unlock()
		})
	}, nil
}

// Warm fills the index of every tenant that has chains in one pass over the store (at
// start-up), so no signing request pays for reading its tenant's chains.
func (s *Service) Warm(ctx context.Context) error {
	byTenant, err := s.listIndex(ctx)
	if err != nil {
		return err
	}
	ix := s.idx
	for tenant, chains := range byTenant {
		ti := ix.entry(tenant)
		ti.mu.Lock()
		if !ti.loaded && !ti.touched {
			ti.chains, ti.loaded = chains, true
		}
		ti.mu.Unlock()
	}
	return nil
}

// Count returns how many key chains the tenant has (from the index: no store read once warm).
func (s *Service) Count(ctx context.Context, tenant string) (int, error) {
	ti, err := s.idx.tenant(ctx, s, tenant)
	if err != nil {
		return 0, err
	}
	defer ti.mu.Unlock()
	return len(ti.chains), nil
}
