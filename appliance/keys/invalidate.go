package keys

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"

	"github.com/kmsgate/kmsgate/appliance/store"
)

// Invalidate drops the cached reference of the tenant's key kid, after a write through this or
// another replica changed or deleted its record; the next use reads the record again.
func (s *Service) Invalidate(tenant, kid string) {
	s.mu.Lock()
	delete(s.entries, entryKey{tenant, kid})
	s.gen++
	s.mu.Unlock()
}

// InvalidateAll drops every cached reference (changes may have been missed).
func (s *Service) InvalidateAll() {
	s.mu.Lock()
	clear(s.entries)
	s.gen++
	s.mu.Unlock()
}

// InvalidateRecord drops what a change of the store record key affects: a key record's cached
// reference. It reports whether key was a key record.
func (s *Service) InvalidateRecord(key string) bool {
	tenant, kid, ok := store.ParseKeyRecordKey(key)
	if ok {
		s.Invalidate(tenant, kid)
	}
	return ok
}

func (s *Service) generation() uint64 {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.gen
}

// install caches e unless an invalidation happened since gen was taken, before the record was
// read: the record may then predate a write whose invalidation has already come and gone, and
// caching it would keep a deleted or replaced key usable until the next full refresh.
func (s *Service) install(tenant, kid string, e *entry, gen uint64) {
	s.mu.Lock()
	if s.gen == gen {
		s.entries[entryKey{strings.Clone(tenant), strings.Clone(kid)}] = e
	}
	s.mu.Unlock()
}

// lister is the part of the store Revalidate needs beyond Store.
type lister interface {
	List(ctx context.Context, prefix string, fn func(key string, val []byte) error) error
}

// Revalidate compares every cached reference with the key records in the store (one scan) and
// drops those whose record is gone or now names another backend key: the periodic safety net
// under change notices. References that still match stay cached, so signing keeps costing no
// store read, and when the store cannot be read nothing is dropped: a store outage must not stop
// signing with keys this replica already knows.
func (s *Service) Revalidate(ctx context.Context) error {
	l, ok := s.st.(lister)
	if !ok {
		s.InvalidateAll()
		return nil
	}
	type current struct{ provider, external, alg string }
	stored := map[entryKey]current{}
	err := l.List(ctx, store.KeyRecordsPrefix, func(key string, val []byte) error {
		tenant, kid, ok := store.ParseKeyRecordKey(key)
		if !ok {
			return nil
		}
		var r store.KeyRef
		if err := json.Unmarshal(val, &r); err != nil {
			return fmt.Errorf("decode key record %q: %w", key, err)
		}
		stored[entryKey{tenant, kid}] = current{r.ProviderID, r.ExternalID, r.Alg}
		return nil
	})
	if err != nil {
		return fmt.Errorf("revalidate key references: %w", err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for k, e := range s.entries {
		if c, ok := stored[k]; !ok || c != (current{e.ref.ProviderID, e.ref.ExternalID, e.ref.Alg}) {
			delete(s.entries, k)
			s.gen++
		}
	}
	return nil
}
