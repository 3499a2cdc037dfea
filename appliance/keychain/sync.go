package keychain

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/kmsgate/kmsgate/internal/errs"
)

// chainRef names one chain of one tenant.
type chainRef struct{ tenant, id string }

// signing is what a signature with a chain needs: the chain as loaded (read-only once cached)
// and its active key's signer.
type signing struct {
	c  *Chain
	sg signer
}

// signCache keeps signing state per chain, so a signature costs no store read. Entries exist only
// for chains that loaded, so its size is bounded by the chains stored.
type signCache struct {
	mu  sync.RWMutex
	gen uint64 // bumped under mu by every drop (see put)
	m   map[chainRef]*signing
}

func (sc *signCache) get(tenant, id string) *signing {
	sc.mu.RLock()
	e := sc.m[chainRef{tenant, id}]
	sc.mu.RUnlock()
	return e
}

func (sc *signCache) generation() uint64 {
	sc.mu.RLock()
	defer sc.mu.RUnlock()
	return sc.gen
}

// put caches e unless a drop happened since gen was taken, before the chain was read: the chain
// read may then predate a rotation or deletion whose drop has already passed, and caching it would
// sign with a retired key until the next full refresh.
func (sc *signCache) put(tenant, id string, e *signing, gen uint64) {
	sc.mu.Lock()
	if sc.gen == gen {
		sc.m[chainRef{strings.Clone(tenant), strings.Clone(id)}] = e
	}
	sc.mu.Unlock()
}

func (sc *signCache) drop(tenant, id string) {
	sc.mu.Lock()
	delete(sc.m, chainRef{tenant, id})
	sc.gen++
	sc.mu.Unlock()
}

// parseChainKey splits a chain record's store key; ok is false for any other key.
func parseChainKey(key string) (tenant, id string, ok bool) {
	rest, ok := strings.CutPrefix(key, prefixChain)
	if !ok {
		return "", "", false
	}
	return strings.Cut(rest, "\x00")
}

// RefreshRecord brings the index and the signing cache up to date after the store record key
// was written or deleted by this or another replica. It reports whether key was a chain record.
func (s *Service) RefreshRecord(ctx context.Context, key string) (bool, error) {
	tenant, id, ok := parseChainKey(key)
	if !ok {
		return false, nil
	}
	c, err := s.load(ctx, tenant, id)
	switch {
	case err == nil:
		s.idx.put(c)
	case errs.KindOf(err) == errs.NotFound:
		s.idx.remove(tenant, id)
	default:
		// Unknown state: stop signing from the cached copy; the next use reads the store.
		s.idx.sign.drop(tenant, id)
		return true, err
	}
	return true, nil
}

// Refresh rebuilds the index of every loaded tenant from the store and drops signing-cache
// entries whose chain is gone or now signs with another key: the safety net for changes whose
// notice was lost. Entries that still match stay, and when the store cannot be read nothing
// changes, so a store outage does not stop signing with chains this replica already knows. A write
// that commits while it runs may be missed here; its own notice, handled after Refresh returns,
// puts it right.
func (s *Service) Refresh(ctx context.Context) error {
	byTenant, active, err := s.listAll(ctx)
	if err != nil {
		return err
	}
	ix := s.idx
	ix.sign.retain(func(r chainRef, e *signing) bool {
		a, ok := active[r]
		return ok && a == activeOf(e.c)
	})
	ix.mu.Lock()
	for t := range byTenant {
		if ix.tenants[t] == nil {
			ix.tenants[t] = &tenantIndex{chains: map[string]indexEntry{}}
		}
	}
	all := make(map[string]*tenantIndex, len(ix.tenants))
	for t, ti := range ix.tenants {
		all[t] = ti
	}
	ix.mu.Unlock()
	for t, ti := range all {
		chains := byTenant[t]
		if chains == nil {
			chains = map[string]indexEntry{}
		}
		ti.mu.Lock()
		ti.chains, ti.loaded = chains, true
		ti.mu.Unlock()
	}
	return nil
}

// activeKey is what a signature with a chain depends on: its key and the certificate JWS puts
// in x5c.
type activeKey struct{ usage, provider, kid, externalID, cert string }

func activeOf(c *Chain) activeKey {
	return activeKey{c.Usage, c.Provider, c.Active.KID, c.Active.ExternalID, c.ActiveCertificate}
}

// retain keeps the entries keep accepts.
func (sc *signCache) retain(keep func(chainRef, *signing) bool) {
	sc.mu.Lock()
	for r, e := range sc.m {
		if !keep(r, e) {
			delete(sc.m, r)
			sc.gen++
		}
	}
	sc.mu.Unlock()
}

// listIndex reads every chain record's index fields, by tenant.
func (s *Service) listIndex(ctx context.Context) (map[string]map[string]indexEntry, error) {
	byTenant, _, err := s.listAll(ctx)
	return byTenant, err
}

// listAll reads every chain record's index fields, by tenant, and its active key.
func (s *Service) listAll(ctx context.Context) (map[string]map[string]indexEntry, map[chainRef]activeKey, error) {
	byTenant := map[string]map[string]indexEntry{}
	active := map[chainRef]activeKey{}
	err := s.st.List(ctx, prefixChain, func(key string, val []byte) error {
		var c struct {
			ID        string    `json:"id"`
			Tenant    string    `json:"tenant"`
			UsageType string    `json:"usageType"`
			CreatedAt time.Time `json:"createdAt"`
			Usage     string    `json:"usage"`
			Provider  string    `json:"kmsProvider"`
			Active    struct {
				KID        string `json:"kid"`
				ExternalID string `json:"externalId"`
			} `json:"active"`
			ActiveCertificate string `json:"activeCertificate"`
		}
		if err := json.Unmarshal(val, &c); err != nil {
			return fmt.Errorf("decode key chain %q: %w", key, err)
		}
		if byTenant[c.Tenant] == nil {
			byTenant[c.Tenant] = map[string]indexEntry{}
		}
		byTenant[c.Tenant][c.ID] = newIndexEntry(c.UsageType, c.Usage, c.CreatedAt)
		active[chainRef{c.Tenant, c.ID}] = activeKey{c.Usage, c.Provider, c.Active.KID, c.Active.ExternalID, c.ActiveCertificate}
		return nil
	})
	if err != nil {
		return nil, nil, fmt.Errorf("index key chains: %w", err)
	}
	return byTenant, active, nil
}
