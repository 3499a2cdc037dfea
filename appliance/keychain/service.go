package keychain

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"hash/maphash"
	"log/slog"
	"regexp"
	"sort"
	"sync"
	"time"

	"github.com/kmsgate/kmsgate/appliance/keys"
	"github.com/kmsgate/kmsgate/appliance/store"
	"github.com/kmsgate/kmsgate/appliance/tenants"
	"github.com/kmsgate/kmsgate/internal/errs"
	"github.com/kmsgate/kmsgate/metrics"
	"github.com/kmsgate/kmsgate/providers"
)

// prefixChain namespaces chain records in the shared store: chain/<tenant>\x00<id>. The NUL
// separator cannot occur in tenant ids, so one tenant's prefix never matches another's.
const prefixChain = "chain/"

func chainKey(tenant, id string) string { return prefixChain + tenant + "\x00" + id }
func tenantPrefix(tenant string) string { return prefixChain + tenant + "\x00" }

// idRe bounds chain ids: they become part of provider kids and store keys.
var idRe = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$`)

// dbProviderID is the provider the encrypt chain always uses (EUDIPLO: encryption uses the DB),
// and the fallback for bootstrap when the default provider cannot create keys.
const dbProviderID = "db"

// Store is what the service needs from the record store.
type Store interface {
	Get(ctx context.Context, key string, v any) error
	Put(ctx context.Context, key string, v any) error
	Create(ctx context.Context, key string, v any) error
	Delete(ctx context.Context, key string) error
	List(ctx context.Context, prefix string, fn func(key string, val []byte) error) error
}

// Registry is what the service needs from the provider registry.
type Registry interface {
	Get(id string) (providers.Provider, error)
	All() []providers.Provider
	DefaultID() string
}

// Tenants is what the service needs from the tenant service.
type Tenants interface {
	Tenant(ctx context.Context, id string) (*store.Tenant, error)
	EnsureTenant(ctx context.Context, id, name string) (created bool, err error)
	ProviderFor(ctx context.Context, p *tenants.Principal, requested string, reg tenants.ProviderSource) (providers.Provider, error)
}

// Config wires the service.
type Config struct {
	Store    Store
	Registry Registry
	Tenants  Tenants
	Metrics  *metrics.Metrics // optional
	Logger   *slog.Logger
	// Lifecycle creates, deletes and signs with keys (default: a lifecycle of its own); the
	// contract face's key service shares its lifecycle.
	Lifecycle *keys.Lifecycle
	// PublicURL's host becomes the certificates' dNSName SAN.
	PublicURL string
	// Country is the C= of certificate subjects (default DE).
	Country string
	// Grace is how long a rotated-out key stays published (default 30 days).
	Grace time.Duration
	// Now is the clock (default time.Now); tests move it to trigger rotation and expiry.
	Now func() time.Time
	// MaxChainsPerTenant caps how many key chains one tenant may hold (0 or negative: no cap).
	MaxChainsPerTenant int
	// Instance names this replica in rotation leases (default: a random id).
	Instance string
	// RotationWorkers bounds the chains the scheduler rotates at once (default 4).
	RotationWorkers int
	// RotationLease is how long a claimed rotation lease lasts (default 5 min).
	RotationLease time.Duration
}

// Service manages key chains. It is safe for concurrent use; mutations of one chain are
// serialised in-process (Badger's directory lock guarantees a single process per data dir).
type Service struct {
	st    Store
	reg   Registry
	ten   Tenants
	lc    *keys.Lifecycle
	m     *metrics.Metrics
	log   *slog.Logger
	prof  certProfile
	grace time.Duration

	clockMu sync.RWMutex
	clock   func() time.Time

	// locks serialise mutations of one chain. A fixed set of stripes chosen by a hash of
	// tenant+id: its size never grows with the ids callers send (a map of per-chain mutexes
	// did, and any manage key could exhaust memory with random ids).
	locks    [lockStripes]sync.Mutex
	lockSeed maphash.Seed

	idx       *index
	maxChains int

	rot rotationConfig
}

// lockStripes is the number of chain-lock stripes: enough that unrelated chains rarely wait on
// each other, fixed so the lock table costs the same whatever is requested.
const lockStripes = 256

// New builds the service.
func New(c Config) *Service {
	s := &Service{st: c.Store, reg: c.Registry, ten: c.Tenants, m: c.Metrics, log: c.Logger,
		prof: newCertProfile(c.PublicURL, c.Country), grace: c.Grace, clock: c.Now,
		lockSeed: maphash.MakeSeed(), idx: newIndex(), maxChains: c.MaxChainsPerTenant}
	if s.grace <= 0 {
		s.grace = DefaultGrace
	}
	s.rot = newRotationConfig(c)
	if s.clock == nil {
		s.clock = time.Now
	}
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	s.lc = c.Lifecycle
	if s.lc == nil {
		lcfg := keys.LifecycleConfig{Log: s.log}
		if ts, ok := c.Store.(keys.TxStore); ok {
			lcfg.Store = ts
		}
		s.lc = keys.NewLifecycleWith(lcfg)
	}
	return s
}

// SetClock replaces the clock (tests move time to trigger the scheduler).
func (s *Service) SetClock(now func() time.Time) {
	s.clockMu.Lock()
	s.clock = now
	s.clockMu.Unlock()
}

func (s *Service) now() time.Time {
	s.clockMu.RLock()
	defer s.clockMu.RUnlock()
	return s.clock().UTC()
}

// lock takes the stripe of tenant+id. Callers validate the id and look the chain up first, so
// unknown ids never wait on (or contend for) a stripe. No caller holds two stripes at once.
func (s *Service) lock(tenant, id string) func() {
	var h maphash.Hash
	h.SetSeed(s.lockSeed)
	h.WriteString(tenant)
	h.WriteByte(0)
	h.WriteString(id)
	mu := &s.locks[h.Sum64()%lockStripes]
	mu.Lock()
	return mu.Unlock
}

// lockExisting validates id, checks in the index that the tenant has such a chain, and only then
// takes its lock and loads it. An unknown or malformed id answers 404 without locking anything.
func (s *Service) lockExisting(ctx context.Context, tenant, id string) (*Chain, func(), error) {
	if !idRe.MatchString(id) {
		return nil, nil, errNotFound(id)
	}
	ok, err := s.idx.has(ctx, s, tenant, id)
	if err != nil {
		return nil, nil, err
	}
	if !ok {
		// Another replica sharing the store may have created it since this index was filled.
		c, err := s.load(ctx, tenant, id)
		if err != nil {
			return nil, nil, err
		}
		s.idx.put(c)
	}
	unlock := s.lock(tenant, id)
	c, err := s.load(ctx, tenant, id)
	if err != nil {
		if errs.KindOf(err) == errs.NotFound {
			s.idx.remove(tenant, id) // deleted by another replica
		}
		unlock()
		return nil, nil, err
	}
	return c, unlock, nil
}

func errNotFound(id string) error {
	return errs.Errorf(errs.NotFound, "key chain %q not found", id).WithCode("key_chain_not_found")
}

func (s *Service) load(ctx context.Context, tenant, id string) (*Chain, error) {
	if !idRe.MatchString(id) {
		return nil, errNotFound(id)
	}
	var c Chain
	if err := s.st.Get(ctx, chainKey(tenant, id), &c); err != nil {
		if errors.Is(err, store.ErrNotFound) {
			return nil, errNotFound(id)
		}
		return nil, fmt.Errorf("load key chain %s: %w", id, err)
	}
	c.migrate()
	c.markLoaded()
	return &c, nil
}

// commitChain writes c together with the bookkeeping of the keys ks created for it. With a
// transactional lifecycle the chain record, the keys' owned records and the removal of their
// intents are one store transaction, so a crash leaves either the chain or an intent the sweep
// resolves — never a key that counts against the quota while nothing uses it. The write is a
// compare-and-swap against the state c was read in (occ.go): when another replica changed the
// chain meanwhile, the keys of ks are rolled back and errStale is returned.
func (s *Service) commitChain(ctx context.Context, ks *keys.Batch, c *Chain, create bool) error {
	key := chainKey(c.Tenant, c.ID)
	c.prepareWrite()
	if !ks.Transactional() {
		return ks.Commit(func() error {
			if create {
				if err := s.st.Create(ctx, key, c); err != nil {
					return fmt.Errorf("store key chain: %w", err)
				}
				c.markLoaded()
				s.idx.put(c)
				return nil
			}
			return s.save(ctx, c)
		})
	}
	base, err := s.countBase(ctx, c.Tenant)
	if err != nil {
		ks.Rollback()
		return err
	}
	err = ks.CommitTx(ctx, func(tx *store.Txn) error {
		if create {
			if err := tx.Create(key, c); err != nil {
				return err
			}
			return s.addChainCount(tx, c.Tenant, base, 1)
		}
		isNew, err := writeChainTx(tx, c)
		if err != nil || !isNew {
			return err
		}
		return s.addChainCount(tx, c.Tenant, base, 1)
	})
	if err != nil {
		return wrapStore(c.ID, err)
	}
	c.markLoaded()
	s.idx.put(c)
	return nil
}

// save writes c if the record is still as c was read (errStale otherwise).
func (s *Service) save(ctx context.Context, c *Chain) error {
	c.prepareWrite()
	if err := s.casWrite(ctx, c); err != nil {
		return wrapStore(c.ID, err)
	}
	c.markLoaded()
	s.idx.put(c)
	return nil
}

func (s *Service) list(ctx context.Context, prefix string) ([]*Chain, error) {
	var out []*Chain
	err := s.st.List(ctx, prefix, func(key string, val []byte) error {
		var c Chain
		if err := json.Unmarshal(val, &c); err != nil {
			return fmt.Errorf("decode key chain %q: %w", key, err)
		}
		c.migrate()
		c.markLoaded()
		out = append(out, &c)
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("list key chains: %w", err)
	}
	// Oldest first: deterministic, and usage lookups pick the longest-lived chain.
	sort.SliceStable(out, func(i, j int) bool { return out[i].CreatedAt.Before(out[j].CreatedAt) })
	return out, nil
}

func (s *Service) tenantName(ctx context.Context, tenant string) (string, error) {
	t, err := s.ten.Tenant(ctx, tenant)
	if err != nil {
		return "", fmt.Errorf("tenant %s: %w", tenant, err)
	}
	return t.Name, nil
}
