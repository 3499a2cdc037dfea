// Package store is kmsgate's embedded database: tenants, API credentials, key references and key
// chains in Badger, one JSON record per key. Writes are synced before they are acknowledged, so a
// record the API confirmed survives a crash.
package store

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"time"

	badger "github.com/dgraph-io/badger/v4"
)

// ErrNotFound is returned when a record does not exist.
var ErrNotFound = errors.New("record not found")

// ErrExists is returned by Create when the record already exists.
var ErrExists = errors.New("record already exists")

// ErrLocked is returned by Open when another process (usually the running server) holds the
// data directory.
var ErrLocked = errors.New("data directory is locked by another kmsgate process")

// Store wraps a Badger database.
type Store struct {
	db *badger.DB
}

// Options tunes Badger. The zero value is the appliance default.
type Options struct {
	InMemory bool
	Logger   *slog.Logger
	ReadOnly bool
}

// Open opens (creating if needed) the database under dir.
//
// Badger's defaults target large servers (64 MiB memtables ×5, 256 MiB block cache). kmsgate stores
// at most a few hundred thousand small records and reads hot ones from its own caches, so smaller
// memtables and caches keep the appliance's RSS in the tens of MiB without slowing it down.
func Open(dir string, o Options) (*Store, error) {
	opts := badger.DefaultOptions(dir).
		WithSyncWrites(true).
		WithMemTableSize(8 << 20).
		WithNumMemtables(2).
		WithNumLevelZeroTables(2).
		WithNumLevelZeroTablesStall(8).
		WithBlockCacheSize(8 << 20).
		WithIndexCacheSize(4 << 20).
		WithValueLogFileSize(64 << 20).
		WithValueThreshold(1 << 10).
		WithNumCompactors(2).
		WithCompactL0OnClose(true).
		WithMetricsEnabled(false).
		WithReadOnly(o.ReadOnly).
		WithLogger(badgerLogger{l: o.Logger})
	if o.InMemory {
		opts = opts.WithInMemory(true).WithDir("").WithValueDir("")
	}
	db, err := badger.Open(opts)
	if err != nil {
		if isLockErr(err) {
			return nil, fmt.Errorf("%w (%s): %v", ErrLocked, dir, err)
		}
		return nil, fmt.Errorf("open store %s: %w", dir, err)
	}
	return &Store{db: db}, nil
}

// Badger reports a held directory lock only as text.
func isLockErr(err error) bool {
	s := err.Error()
	return strings.Contains(s, "Cannot acquire directory lock") || strings.Contains(s, "resource temporarily unavailable")
}

// Close flushes and closes the database.
func (s *Store) Close() error { return s.db.Close() }

// RunGC reclaims value-log space; call it periodically.
func (s *Store) RunGC() {
	for s.db.RunValueLogGC(0.5) == nil {
	}
}

// Get decodes the record at key into v.
func (s *Store) Get(_ context.Context, key string, v any) error {
	return s.db.View(func(txn *badger.Txn) error { return getTxn(txn, key, v) })
}

func getTxn(txn *badger.Txn, key string, v any) error {
	item, err := txn.Get([]byte(key))
	if errors.Is(err, badger.ErrKeyNotFound) {
		return ErrNotFound
	}
	if err != nil {
		return fmt.Errorf("store get: %w", err)
	}
	return item.Value(func(b []byte) error {
		if err := json.Unmarshal(b, v); err != nil {
			return fmt.Errorf("store decode %q: %w", key, err)
		}
		return nil
	})
}

// Put writes v at key (insert or replace).
func (s *Store) Put(_ context.Context, key string, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return fmt.Errorf("store encode: %w", err)
	}
	return s.db.Update(func(txn *badger.Txn) error { return txn.Set([]byte(key), b) })
}

// Create writes v at key only if no record exists there.
func (s *Store) Create(_ context.Context, key string, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return fmt.Errorf("store encode: %w", err)
	}
	return s.db.Update(func(txn *badger.Txn) error {
		if _, err := txn.Get([]byte(key)); err == nil {
			return ErrExists
		} else if !errors.Is(err, badger.ErrKeyNotFound) {
			return fmt.Errorf("store create: %w", err)
		}
		return txn.Set([]byte(key), b)
	})
}

// Delete removes key; a missing key is not an error.
func (s *Store) Delete(_ context.Context, key string) error {
	return s.db.Update(func(txn *badger.Txn) error { return txn.Delete([]byte(key)) })
}

// List calls fn for every record whose key starts with prefix, in key order. fn must copy val if
// it keeps it.
func (s *Store) List(_ context.Context, prefix string, fn func(key string, val []byte) error) error {
	return s.db.View(func(txn *badger.Txn) error {
		it := txn.NewIterator(badger.IteratorOptions{PrefetchValues: true, PrefetchSize: 64, Prefix: []byte(prefix)})
		defer it.Close()
		for it.Rewind(); it.Valid(); it.Next() {
			item := it.Item()
			if err := item.Value(func(b []byte) error { return fn(string(item.Key()), b) }); err != nil {
				return err
			}
		}
		return nil
	})
}

// Txn is a read-write transaction for multi-record updates that must land together.
type Txn struct{ txn *badger.Txn }

// Get decodes key into v.
func (t *Txn) Get(key string, v any) error { return getTxn(t.txn, key, v) }

// Put writes v at key.
func (t *Txn) Put(key string, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return fmt.Errorf("store encode: %w", err)
	}
	return t.txn.Set([]byte(key), b)
}

// Create writes v at key only if no record exists there (ErrExists otherwise).
func (t *Txn) Create(key string, v any) error {
	if _, err := t.txn.Get([]byte(key)); err == nil {
		return ErrExists
	} else if !errors.Is(err, badger.ErrKeyNotFound) {
		return fmt.Errorf("store create: %w", err)
	}
	return t.Put(key, v)
}

// Delete removes key; a missing key is not an error.
func (t *Txn) Delete(key string) error { return t.txn.Delete([]byte(key)) }

// Update runs fn in one transaction; nothing is written unless fn returns nil. Conflicting
// concurrent transactions are retried a few times.
func (s *Store) Update(_ context.Context, fn func(*Txn) error) error {
	var err error
	for i := 0; i < 5; i++ {
		err = s.db.Update(func(txn *badger.Txn) error { return fn(&Txn{txn: txn}) })
		if !errors.Is(err, badger.ErrConflict) {
			return err
		}
		time.Sleep(time.Duration(i+1) * time.Millisecond)
	}
	return err
}

// badgerLogger hands Badger's warnings and errors to slog. Badger's text is the log message and
// component=badger marks its origin: a "msg" attribute would duplicate the record's own "msg" key,
// which most JSON log pipelines reject or silently collapse.
type badgerLogger struct{ l *slog.Logger }

func (b badgerLogger) Errorf(f string, a ...any) {
	if b.l != nil {
		b.l.Error(strings.TrimSpace(fmt.Sprintf(f, a...)), "component", "badger")
	}
}
func (b badgerLogger) Warningf(f string, a ...any) {
	if b.l != nil {
		b.l.Warn(strings.TrimSpace(fmt.Sprintf(f, a...)), "component", "badger")
	}
}
func (b badgerLogger) Infof(string, ...any)  {}
func (b badgerLogger) Debugf(string, ...any) {}
