// Package jwkcache is the public-key cache shared by the external providers (vault, aws-kms,
// http). It is best effort: a miss simply means the provider asks its backend again, so the cache
// only saves round trips (AWS GetPublicKey is rate-limited to a few calls per second) and never
// decides correctness. Entries expire after a TTL, are dropped on delete, and the cache is bounded:
// the least recently used entry is evicted first.
package jwkcache

import (
	"container/list"
	"context"
	"crypto/ecdsa"
	"sync"
	"time"
)

// Defaults follow the EUDIPLO adapters (5-minute TTL); the size bound keeps a long-running
// gateway with many short-lived keys from growing without limit.
const (
	DefaultTTL        = 5 * time.Minute
	DefaultMaxEntries = 10000
)

// Cache maps an external key id to its public key. One cache serves every tenant of a provider,
// so the key must be the backend's own name for the key, which the provider has already scoped by
// tenant (never a tenant's raw kid). The zero value is not usable; use New.
type Cache struct {
	ttl time.Duration
	max int
	now func() time.Time

	mu    sync.Mutex
	ll    *list.List // front = most recently used
	items map[string]*list.Element
}

type entry struct {
	key     string
	pub     *ecdsa.PublicKey
	expires time.Time
}

// Option configures a Cache.
type Option func(*Cache)

// WithTTL sets how long an entry stays valid (values <= 0 keep the default).
func WithTTL(d time.Duration) Option {
	return func(c *Cache) {
		if d > 0 {
			c.ttl = d
		}
	}
}

// WithMaxEntries bounds the number of entries (values <= 0 keep the default).
func WithMaxEntries(n int) Option {
	return func(c *Cache) {
		if n > 0 {
			c.max = n
		}
	}
}

// WithClock injects the time source, so tests can expire entries without sleeping.
func WithClock(now func() time.Time) Option {
	return func(c *Cache) {
		if now != nil {
			c.now = now
		}
	}
}

// New returns an empty cache.
func New(opts ...Option) *Cache {
	c := &Cache{ttl: DefaultTTL, max: DefaultMaxEntries, now: time.Now, ll: list.New(),
		items: make(map[string]*list.Element)}
	for _, o := range opts {
		o(c)
	}
	return c
}

// Get returns the cached key, or false when it is absent or expired (an expired entry is removed).
func (c *Cache) Get(key string) (*ecdsa.PublicKey, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	el, ok := c.items[key]
	if !ok {
		return nil, false
	}
	e := el.Value.(*entry)
	if !c.now().Before(e.expires) {
		c.removeElement(el)
		return nil, false
	}
	c.ll.MoveToFront(el)
	return e.pub, true
}

// Put stores pub under key, replacing any previous entry and restarting its TTL.
func (c *Cache) Put(key string, pub *ecdsa.PublicKey) {
	if pub == nil {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	exp := c.now().Add(c.ttl)
	if el, ok := c.items[key]; ok {
		e := el.Value.(*entry)
		e.pub, e.expires = pub, exp
		c.ll.MoveToFront(el)
		return
	}
	c.items[key] = c.ll.PushFront(&entry{key: key, pub: pub, expires: exp})
	for c.ll.Len() > c.max {
		c.removeElement(c.ll.Back())
	}
}

// Delete drops key; the providers call it when the key is deleted in the backend.
func (c *Cache) Delete(key string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if el, ok := c.items[key]; ok {
		c.removeElement(el)
	}
}

// Len reports the number of entries, expired ones included until they are read or evicted.
func (c *Cache) Len() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.ll.Len()
}

// GetOrFetch returns the cached key or calls fetch and caches its result. Concurrent misses for
// the same key may each call fetch; that is acceptable for a best-effort cache and avoids holding
// a lock across a network call.
func (c *Cache) GetOrFetch(ctx context.Context, key string,
	fetch func(context.Context) (*ecdsa.PublicKey, error)) (*ecdsa.PublicKey, error) {
	if pub, ok := c.Get(key); ok {
		return pub, nil
	}
	pub, err := fetch(ctx)
	if err != nil {
		return nil, err
	}
	c.Put(key, pub)
	return pub, nil
}

func (c *Cache) removeElement(el *list.Element) {
	c.ll.Remove(el)
	delete(c.items, el.Value.(*entry).key)
}
