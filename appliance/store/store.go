// Package store is kmsgate's database: tenants, API credentials, key references and key chains,
// one JSON record per key. Two engines sit behind it: Badger, embedded under the data dir (one
// process), and PostgreSQL, shared by several replicas. Writes are durable before they are
// acknowledged on both, so a record the API confirmed survives a crash.
package store

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
)

// Every error of a read or a write that failed because the engine could not serve (PostgreSQL down,
// the directory gone, full or read-only…) is an errs.Unavailable with the code store_unavailable
// (IsUnavailable); everything else keeps its own meaning.

// ErrNotFound is returned when a record does not exist.
var ErrNotFound = errors.New("record not found")

// ErrExists is returned by Create when the record already exists.
var ErrExists = errors.New("record already exists")

// ErrLocked is returned by Open when another process (usually the running server) holds the
// data directory.
var ErrLocked = errors.New("data directory is locked by another kmsgate process")

// Store is the record store on one of its engines.
type Store struct {
	b backend
	q queryCounts
}

// Options tunes Badger. The zero value is the appliance default.
type Options struct {
	InMemory bool
	Logger   *slog.Logger
	ReadOnly bool
}

// Open opens (creating if needed) the Badger database under dir.
func Open(dir string, o Options) (*Store, error) {
	b, err := openBadger(dir, o)
	if err != nil {
		return nil, err
	}
	return &Store{b: b}, nil
}

// Close flushes and closes the database. On Badger it returns an error without flushing when the
// data directory is faulty (see badgerBackend.close); every acknowledged write is then still in
// the write-ahead log.
func (s *Store) Close() error { return s.b.close() }

// RunGC reclaims space where the engine needs the application to ask (Badger's value log);
// call it periodically.
func (s *Store) RunGC() { s.b.gc() }

// Get decodes the record at key into v.
func (s *Store) Get(ctx context.Context, key string, v any) error {
	s.q.inc(OpGet)
	b, err := s.b.get(ctx, key)
	if err != nil {
		return classify(err)
	}
	return decode(key, b, v)
}

func decode(key string, b []byte, v any) error {
	if err := json.Unmarshal(b, v); err != nil {
		return fmt.Errorf("store decode %q: %w", key, err)
	}
	return nil
}

func encode(v any) ([]byte, error) {
	b, err := json.Marshal(v)
	if err != nil {
		return nil, fmt.Errorf("store encode: %w", err)
	}
	return b, nil
}

// Put writes v at key (insert or replace).
func (s *Store) Put(ctx context.Context, key string, v any) error {
	b, err := encode(v)
	if err != nil {
		return err
	}
	s.q.inc(OpPut)
	return classify(s.b.put(ctx, key, b))
}

// Create writes v at key only if no record exists there.
func (s *Store) Create(ctx context.Context, key string, v any) error {
	b, err := encode(v)
	if err != nil {
		return err
	}
	s.q.inc(OpCreate)
	return classify(s.b.create(ctx, key, b))
}

// Delete removes key; a missing key is not an error.
func (s *Store) Delete(ctx context.Context, key string) error {
	s.q.inc(OpDelete)
	return classify(s.b.del(ctx, key))
}

// List calls fn for every record whose key starts with prefix, in byte order of the keys. fn
// must copy val if it keeps it.
func (s *Store) List(ctx context.Context, prefix string, fn func(key string, val []byte) error) error {
	s.q.inc(OpList)
	return classify(s.b.list(ctx, prefix, fn))
}

// Txn is a read-write transaction for multi-record updates that must land together.
type Txn struct {
	tx backendTxn
	q  *queryCounts
}

// Get decodes key into v; it sees the transaction's own writes.
func (t *Txn) Get(key string, v any) error {
	t.q.inc(OpGet)
	b, err := t.tx.get(key)
	if err != nil {
		return classify(err)
	}
	return decode(key, b, v)
}

// Put writes v at key.
func (t *Txn) Put(key string, v any) error {
	b, err := encode(v)
	if err != nil {
		return err
	}
	t.q.inc(OpPut)
	return classify(t.tx.put(key, b))
}

// Create writes v at key only if no record exists there (ErrExists otherwise).
func (t *Txn) Create(key string, v any) error {
	b, err := encode(v)
	if err != nil {
		return err
	}
	t.q.inc(OpCreate)
	return classify(t.tx.create(key, b))
}

// Delete removes key; a missing key is not an error.
func (t *Txn) Delete(key string) error {
	t.q.inc(OpDelete)
	return classify(t.tx.del(key))
}

// Update runs fn in one serialisable transaction; nothing is written unless fn returns nil.
// A transaction that lost a race with a concurrent one is re-run, so fn may run more than once
// and must not have effects outside tx.
func (s *Store) Update(ctx context.Context, fn func(*Txn) error) error {
	return classify(s.b.update(ctx, func(tx backendTxn) error {
		// Each attempt is a transaction of its own (begin and commit round trips).
		s.q.inc(OpUpdate)
		return fn(&Txn{tx: tx, q: &s.q})
	}))
}
