package store

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"strings"
	"time"

	badger "github.com/dgraph-io/badger/v4"
)

// badgerBackend is the embedded engine: one directory, one process.
type badgerBackend struct {
	db    *badger.DB
	guard *dirGuard // nil in memory
}

// openBadger opens (creating if needed) the database under dir.
//
// Badger's defaults target large servers (64 MiB memtables ×5, 256 MiB block cache). kmsgate stores
// at most a few hundred thousand small records and reads hot ones from its own caches, so smaller
// memtables and caches keep the appliance's RSS in the tens of MiB without slowing it down.
func openBadger(dir string, o Options) (*badgerBackend, error) {
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
	b := &badgerBackend{db: db}
	if !o.InMemory && !o.ReadOnly {
		if b.guard, err = newDirGuard(dir); err != nil {
			db.Close()
			return nil, fmt.Errorf("open store %s: %w", dir, err)
		}
	}
	return b, nil
}

// Badger reports a held directory lock only as text.
func isLockErr(err error) bool {
	s := err.Error()
	return strings.Contains(s, "Cannot acquire directory lock") || strings.Contains(s, "resource temporarily unavailable")
}

// close flushes and closes Badger, unless the directory is known to be faulty: Badger would then
// retry its memtable flush forever (or, on a full file system, fault on a memory-mapped write),
// and every acknowledged write is already in its synced write-ahead log, which the next start
// replays. The error tells the caller that the store was not flushed.
func (b *badgerBackend) close() error {
	if b.guard != nil {
		if err := b.guard.check(); err != nil {
			return fmt.Errorf("store not flushed (the next start replays its write-ahead log): %w", err)
		}
	}
	return b.db.Close()
}

// Badger's directory lock admits one process: every write goes through this one's services,
// which keep their caches current themselves, so there is nothing to watch.
func (b *badgerBackend) shared() bool { return false }

func (b *badgerBackend) watch(ctx context.Context, _ func(Change)) error {
	<-ctx.Done()
	return nil
}

func (b *badgerBackend) gc() {
	for b.db.RunValueLogGC(0.5) == nil {
	}
}

func (b *badgerBackend) get(_ context.Context, key string) ([]byte, error) {
	var v []byte
	err := b.db.View(func(txn *badger.Txn) error {
		var err error
		v, err = (badgerTxn{txn}).get(key)
		return err
	})
	return v, err
}

// put and del are blind writes: Badger checks conflicts only on keys a transaction read, so they
// never conflict themselves.
func (b *badgerBackend) put(ctx context.Context, key string, val []byte) error {
	return b.write(ctx, func(txn *badger.Txn) error { return txn.Set([]byte(key), val) })
}

func (b *badgerBackend) del(ctx context.Context, key string) error {
	return b.write(ctx, func(txn *badger.Txn) error { return txn.Delete([]byte(key)) })
}

func (b *badgerBackend) create(ctx context.Context, key string, val []byte) error {
	return b.update(ctx, func(tx backendTxn) error { return tx.create(key, val) })
}

func (b *badgerBackend) list(_ context.Context, prefix string, fn func(key string, val []byte) error) error {
	return b.db.View(func(txn *badger.Txn) error {
		it := txn.NewIterator(badger.IteratorOptions{PrefetchValues: true, PrefetchSize: 64, Prefix: []byte(prefix)})
		defer it.Close()
		for it.Rewind(); it.Valid(); it.Next() {
			item := it.Item()
			if err := item.Value(func(v []byte) error { return fn(string(item.Key()), v) }); err != nil {
				return err
			}
		}
		return nil
	})
}

// maxConflictRetries bounds the retries of a read-write transaction. Every round of conflicting
// transactions commits one of them, so this is far beyond what contention on one key produces; it
// only stops a livelock from spinning forever.
const maxConflictRetries = 1000

// update retries transactions that lost an optimistic-concurrency race (badger.ErrConflict): the
// conflict is an artefact of Badger's concurrency control, not something a caller can act on.
// The jittered, growing pause keeps the retries of many writers of one key from colliding again.
func (b *badgerBackend) update(ctx context.Context, fn func(tx backendTxn) error) error {
	for i := 0; ; i++ {
		err := b.write(ctx, func(txn *badger.Txn) error { return fn(badgerTxn{txn}) })
		if !errors.Is(err, badger.ErrConflict) || i >= maxConflictRetries {
			return err
		}
		if err := sleepCtx(ctx, retryPause(i)); err != nil {
			return err
		}
	}
}

// retryPause is a random pause up to 100µs·2^i, capped at 20ms.
func retryPause(i int) time.Duration {
	ceil := 100 * time.Microsecond << min(i, 8)
	ceil = min(ceil, 20*time.Millisecond)
	return time.Duration(rand.Int64N(int64(ceil)) + 1)
}

func sleepCtx(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

type badgerTxn struct{ txn *badger.Txn }

func (t badgerTxn) get(key string) ([]byte, error) {
	item, err := t.txn.Get([]byte(key))
	if errors.Is(err, badger.ErrKeyNotFound) {
		return nil, ErrNotFound
	}
	if err != nil {
		return nil, fmt.Errorf("store get: %w", err)
	}
	return item.ValueCopy(nil)
}

func (t badgerTxn) put(key string, val []byte) error { return t.txn.Set([]byte(key), val) }

func (t badgerTxn) create(key string, val []byte) error {
	if _, err := t.txn.Get([]byte(key)); err == nil {
		return ErrExists
	} else if !errors.Is(err, badger.ErrKeyNotFound) {
		return fmt.Errorf("store create: %w", err)
	}
	return t.txn.Set([]byte(key), val)
}

func (t badgerTxn) del(key string) error { return t.txn.Delete([]byte(key)) }

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
