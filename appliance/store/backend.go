package store

import "context"

// backend is one storage engine under Store: raw bytes under byte-ordered string keys. Store adds
// the JSON encoding and the error kinds on top, so both engines behave the same to callers.
type backend interface {
	get(ctx context.Context, key string) ([]byte, error) // ErrNotFound when absent
	put(ctx context.Context, key string, val []byte) error
	create(ctx context.Context, key string, val []byte) error // ErrExists when present
	del(ctx context.Context, key string) error                // a missing key is not an error
	// list calls fn in key order for every key starting with prefix. fn must copy val to keep it.
	list(ctx context.Context, prefix string, fn func(key string, val []byte) error) error
	// update runs fn in one serialisable transaction, re-running it when a concurrent transaction
	// conflicted, so callers never see a conflict; fn must therefore have no side effects beyond tx.
	update(ctx context.Context, fn func(tx backendTxn) error) error
	// shared reports whether other processes write the same store; watch reports their writes.
	shared() bool
	watch(ctx context.Context, fn func(Change)) error
	gc()
	// probe reports whether the engine can serve writes now (for health checks).
	probe(ctx context.Context) error
	close() error
}

// backendTxn is the raw view of one read-write transaction.
type backendTxn interface {
	get(key string) ([]byte, error)
	put(key string, val []byte) error
	create(key string, val []byte) error
	del(key string) error
}
