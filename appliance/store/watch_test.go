package store

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/kmsgate/kmsgate/internal/testenv"
)

// watcher collects what Watch reports on one store.
type watcher struct {
	ch   chan Change
	stop context.CancelFunc
	done chan struct{}
}

func watch(t *testing.T, s *Store) *watcher {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	w := &watcher{ch: make(chan Change, 100), stop: cancel, done: make(chan struct{})}
	go func() {
		defer close(w.done)
		if err := s.Watch(ctx, func(c Change) { w.ch <- c }); err != nil {
			t.Errorf("watch: %v", err)
		}
	}()
	t.Cleanup(func() { cancel(); <-w.done })
	return w
}

func (w *watcher) next(t *testing.T) Change {
	t.Helper()
	select {
	case c := <-w.ch:
		return c
	case <-time.After(5 * time.Second):
		t.Fatal("no change reported within 5s")
		return Change{}
	}
}

func (w *watcher) none(t *testing.T) {
	t.Helper()
	select {
	case c := <-w.ch:
		t.Fatalf("unexpected change %+v", c)
	case <-time.After(300 * time.Millisecond):
	}
}

// TestPostgresWatch: a second store on the same database (another replica) hears of every
// committed write with its key, of nothing rolled back or unchanged, and after its listening
// connection is terminated it reconnects, reports a Reset and keeps reporting writes.
func TestPostgresWatch(t *testing.T) {
	testenv.NeedsBackend(t, "postgres")
	ctx := context.Background()
	pg := testenv.StartPostgres(t)
	dsn := pg.NewDatabase(t)
	writer, err := OpenPostgres(ctx, dsn, PostgresOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer writer.Close()
	reader, err := OpenPostgres(ctx, dsn, PostgresOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer reader.Close()
	if !reader.Shared() {
		t.Fatal("a PostgreSQL store must report itself shared")
	}
	w := watch(t, reader)
	if c := w.next(t); !c.Reset {
		t.Fatalf("first report %+v, want a Reset once listening", c)
	}
	key := KeyRecordKey("t1", "k1") // contains NUL: must survive the notice payload
	want := func(k string) {
		t.Helper()
		if c := w.next(t); c.Reset || c.Key != k {
			t.Fatalf("got %+v, want a change of %q", c, k)
		}
	}
	if err := writer.Create(ctx, key, rec{N: 1}); err != nil {
		t.Fatal(err)
	}
	want(key)
	if err := writer.Create(ctx, key, rec{N: 2}); !errors.Is(err, ErrExists) {
		t.Fatalf("second create: %v, want ErrExists", err)
	}
	w.none(t) // a refused create changed nothing
	if err := writer.Put(ctx, key, rec{N: 3}); err != nil {
		t.Fatal(err)
	}
	want(key)
	boom := errors.New("boom")
	if err := writer.Update(ctx, func(tx *Txn) error {
		if err := tx.Put("a/rolled-back", rec{}); err != nil {
			return err
		}
		return boom
	}); !errors.Is(err, boom) {
		t.Fatal(err)
	}
	w.none(t) // rolled back: never announced
	if err := writer.Update(ctx, func(tx *Txn) error { return tx.Put("a/committed", rec{}) }); err != nil {
		t.Fatal(err)
	}
	want("a/committed")
	if err := writer.Delete(ctx, key); err != nil {
		t.Fatal(err)
	}
	want(key)
	if err := writer.Delete(ctx, key); err != nil {
		t.Fatal(err)
	}
	w.none(t) // deleting a missing key changed nothing
	if err := reader.Put(ctx, "a/own-write", rec{}); err != nil {
		t.Fatal(err)
	}
	w.none(t) // the listening process's own write: it updated its caches when it wrote

	pg.Exec(t, "postgres", "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
		ListenerApplicationName)
	start := time.Now()
	if c := w.next(t); !c.Reset {
		t.Fatalf("after the listener was terminated: %+v, want a Reset on reconnect", c)
	}
	t.Logf("listener reconnected and reported a Reset %v after pg_terminate_backend", time.Since(start))
	if err := writer.Put(ctx, "a/after", rec{}); err != nil {
		t.Fatal(err)
	}
	want("a/after")
}

// TestQueriesCounter: every store operation counts under its kind, on Badger too.
func TestQueriesCounter(t *testing.T) {
	ctx := context.Background()
	s := open(t, t.TempDir())
	defer s.Close()
	before := map[string]uint64{}
	for _, op := range Ops {
		before[op] = s.Queries(op)
	}
	_ = s.Put(ctx, "a/1", rec{})
	_ = s.Create(ctx, "a/2", rec{})
	var r rec
	_ = s.Get(ctx, "a/1", &r)
	_ = s.List(ctx, "a/", func(string, []byte) error { return nil })
	_ = s.Update(ctx, func(tx *Txn) error { return tx.Delete("a/1") })
	_ = s.Delete(ctx, "a/2")
	want := map[string]uint64{OpPut: 1, OpCreate: 1, OpGet: 1, OpList: 1, OpUpdate: 1, OpDelete: 2}
	for _, op := range Ops {
		if got := s.Queries(op) - before[op]; got != want[op] {
			t.Errorf("op %s moved by %d, want %d", op, got, want[op])
		}
	}
	if s.Queries("nonsense") != 0 {
		t.Error("an unknown op must read 0")
	}
	if s.Shared() {
		t.Error("Badger must not report itself shared")
	}
}
