package store

import "context"

// Change is one committed write that Watch reports.
type Change struct {
	// Key is the record written or deleted ("" when Reset is set).
	Key string
	// Reset says that changes may have been missed (the listener connected or reconnected):
	// every cache built from the store must be rebuilt.
	Reset bool
}

// Shared reports whether other processes may write this store (PostgreSQL), so that caches built
// from it must follow Watch. A Badger store belongs to one process, whose services update their
// own caches on every write.
func (s *Store) Shared() bool { return s.b.shared() }

// Watch calls fn, from one goroutine and in commit order per writer, for every record that any
// process writes or deletes in a shared store, after the write committed (a rolled-back
// transaction reports nothing), until ctx ends. Once it is listening, and again after every
// reconnect, it reports a Reset first. On Badger it reports nothing and returns when ctx ends.
// fn may use the store.
func (s *Store) Watch(ctx context.Context, fn func(Change)) error { return s.b.watch(ctx, fn) }
