package store

import (
	"context"
	"fmt"
	"os"
	"sync/atomic"
	"time"

	badger "github.com/dgraph-io/badger/v4"
	"github.com/jackc/pgx/v5"
	"golang.org/x/sys/unix"
)

// badgerWriteTimeout bounds one Badger write. A synced write takes milliseconds; one that has not
// finished after this is stalled behind a memtable flush that cannot happen (the directory is gone
// or full), and Badger itself would wait forever.
const badgerWriteTimeout = 5 * time.Second

// badgerMinFree is the free space below which writes are refused: room for one memtable flush
// (8 MiB) and the write-ahead log growing meanwhile. Badger writes both through memory maps, and a
// memory-mapped write into a full file system kills the process with SIGBUS instead of failing.
const badgerMinFree = 16 << 20

// dirGuard checks, before every write and on every health probe, that the data directory is
// still the one Badger opened and can take writes. Badger finds none of these faults itself until a
// memtable flush fails, and then retries that flush forever while writes queue behind it.
type dirGuard struct {
	dir     string
	id      os.FileInfo
	stalled atomic.Int64 // writes abandoned after badgerWriteTimeout and still blocked
}

func newDirGuard(dir string) (*dirGuard, error) {
	fi, err := os.Stat(dir)
	if err != nil {
		return nil, err
	}
	return &dirGuard{dir: dir, id: fi}, nil
}

// check returns nil when the directory can take writes, else an error wrapping errStoreFault.
func (g *dirGuard) check() error {
	if n := g.stalled.Load(); n > 0 {
		return fmt.Errorf("%w: %d write(s) blocked for more than %s", errStoreFault, n, badgerWriteTimeout)
	}
	fi, err := os.Stat(g.dir)
	if err != nil {
		return fmt.Errorf("%w: data directory: %w", errStoreFault, err)
	}
	if !os.SameFile(fi, g.id) {
		return fmt.Errorf("%w: data directory %s was removed or replaced under the running store", errStoreFault, g.dir)
	}
	var st unix.Statfs_t
	if err := unix.Statfs(g.dir, &st); err != nil {
		return fmt.Errorf("%w: data directory: %w", errStoreFault, err)
	}
	if st.Flags&unix.ST_RDONLY != 0 {
		return fmt.Errorf("%w: data directory %s is on a read-only file system", errStoreFault, g.dir)
	}
	if free := st.Bavail * uint64(st.Bsize); free < badgerMinFree {
		return fmt.Errorf("%w: data directory %s has %d bytes free (below %d)", errStoreFault, g.dir, free, badgerMinFree)
	}
	return nil
}

// write runs fn in a Badger read-write transaction after the guard's check, and gives up after
// badgerWriteTimeout. A write given up on may still commit later; the caller got
// store_unavailable, which promises nothing either way, and the guard refuses further writes
// until it finishes.
func (b *badgerBackend) write(_ context.Context, fn func(*badger.Txn) error) error {
	if b.guard == nil {
		return b.db.Update(fn)
	}
	if err := b.guard.check(); err != nil {
		return err
	}
	done := make(chan error, 1)
	fnDone := make(chan struct{})
	go func() {
		done <- b.db.Update(func(txn *badger.Txn) error {
			defer close(fnDone)
			return fn(txn)
		})
	}()
	t := time.NewTimer(badgerWriteTimeout)
	defer t.Stop()
	select {
	case err := <-done:
		return err
	case <-t.C:
	}
	// fn belongs to the caller: never return while it may still touch the caller's variables.
	// Only the commit blocks on a stalled flush, so this wait is short.
	<-fnDone
	select {
	case err := <-done:
		return err
	default:
	}
	b.guard.stalled.Add(1)
	go func() {
		<-done
		b.guard.stalled.Add(-1)
	}()
	return fmt.Errorf("%w: write did not complete within %s", errStoreFault, badgerWriteTimeout)
}

func (b *badgerBackend) probe(context.Context) error {
	if b.guard == nil {
		return nil
	}
	return b.guard.check()
}

// pgSpaceProbe is a sort too big for its work_mem (set to the 64 kB minimum around it), so
// PostgreSQL writes it to a temporary file of about 70 kB on the database's disk: a full disk
// fails it with 53100, as it fails writes, while a ping still succeeds. It writes no WAL and no
// catalog row, and the file is gone when the statement ends.
const pgSpaceProbe = `SELECT count(*) FROM (SELECT g FROM generate_series(1, 5000) g ORDER BY g DESC OFFSET 0) s`

// probe checks that PostgreSQL answers and has disk space for a small temporary file.
func (b *pgBackend) probe(ctx context.Context) error {
	return pgx.BeginFunc(ctx, b.pool, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, "SET LOCAL work_mem = '64kB'"); err != nil {
			return err
		}
		_, err := tx.Exec(ctx, pgSpaceProbe)
		return err
	})
}

// Check probes the store: PostgreSQL answers and can write a temporary file, the Badger directory can take writes. A
// failure is classified like any store error (store_unavailable for an I/O fault).
func (s *Store) Check(ctx context.Context) error {
	err := s.b.probe(ctx)
	if err != nil && !isFault(err) {
		return unavailable(err)
	}
	return classify(err)
}
