package store

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kmsgate/kmsgate/internal/testenv"
)

// engine opens a fresh, empty store for one subtest.
type engine struct {
	name string
	open func(t *testing.T) *Store
}

// engines returns both backends. PostgreSQL runs one server per call and a database per store.
func engines(t *testing.T) []engine {
	badgerEng := engine{"badger", func(t *testing.T) *Store {
		s := open(t, t.TempDir())
		t.Cleanup(func() { s.Close() })
		return s
	}}
	if testing.Short() {
		return []engine{badgerEng}
	}
	start := time.Now()
	pg := testenv.StartPostgres(t)
	t.Logf("PostgreSQL server (initdb + pg_ctl start) up in %v", time.Since(start).Round(time.Millisecond))
	return []engine{badgerEng, {"postgres", func(t *testing.T) *Store {
		s, err := OpenPostgres(context.Background(), pg.NewDatabase(t), PostgresOptions{})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { s.Close() })
		return s
	}}}
}

// TestConformance runs the same behavioural checks on every backend: callers must not be able
// to tell them apart.
func TestConformance(t *testing.T) {
	for _, e := range engines(t) {
		t.Run(e.name, func(t *testing.T) {
			start := time.Now()
			for _, c := range conformanceCases {
				t.Run(c.name, func(t *testing.T) { c.fn(t, e.open(t)) })
			}
			t.Logf("conformance suite on %s: %v", e.name, time.Since(start).Round(time.Millisecond))
		})
	}
}

var conformanceCases = []struct {
	name string
	fn   func(t *testing.T, s *Store)
}{
	{"GetPutCreateDelete", conformGetPutCreateDelete},
	{"ListPrefixWithNUL", conformListPrefix},
	{"ListManyPages", conformListManyPages},
	{"UpdateAtomic", conformUpdateAtomic},
	{"TxnCreateDelete", conformTxnCreateDelete},
	{"ConcurrentUpdatesLoseNothing", conformNoLostUpdates},
	{"ConcurrentCreateOneWinner", conformCreateOneWinner},
}

func conformGetPutCreateDelete(t *testing.T, s *Store) {
	ctx := context.Background()
	var got rec
	if err := s.Get(ctx, "a/1", &got); !errors.Is(err, ErrNotFound) {
		t.Fatalf("get missing: %v, want ErrNotFound", err)
	}
	if err := s.Create(ctx, "a/1", rec{N: 1}); err != nil {
		t.Fatal(err)
	}
	if err := s.Create(ctx, "a/1", rec{N: 2}); !errors.Is(err, ErrExists) {
		t.Fatalf("second create: %v, want ErrExists", err)
	}
	if err := s.Get(ctx, "a/1", &got); err != nil || got.N != 1 {
		t.Fatalf("get after a refused create: %+v %v, want the first record", got, err)
	}
	if err := s.Put(ctx, "a/1", rec{N: 3, S: "x\x00y"}); err != nil {
		t.Fatal(err)
	}
	if err := s.Get(ctx, "a/1", &got); err != nil || got != (rec{N: 3, S: "x\x00y"}) {
		t.Fatalf("get after put: %+v %v", got, err)
	}
	if err := s.Delete(ctx, "a/1"); err != nil {
		t.Fatal(err)
	}
	if err := s.Get(ctx, "a/1", &got); !errors.Is(err, ErrNotFound) {
		t.Fatalf("get after delete: %v, want ErrNotFound", err)
	}
	if err := s.Delete(ctx, "a/1"); err != nil {
		t.Fatalf("deleting a missing key: %v, want nil", err)
	}
	var raw []byte // sealed keys are stored as []byte (base64 in JSON): round trip exactly
	sealed := []byte{0, 1, 2, 0xff, 0}
	if err := (SealedKeys{St: s}).Save(ctx, "id1", sealed); err != nil {
		t.Fatal(err)
	}
	if raw, ok, err := (SealedKeys{St: s}).Load(ctx, "id1"); err != nil || !ok || !bytes.Equal(raw, sealed) {
		t.Fatalf("sealed key round trip: %x %v %v", raw, ok, err)
	}
	if err := (SealedKeys{St: s}).Save(ctx, "id1", sealed); !errors.Is(err, ErrExists) {
		t.Fatalf("saving a sealed key id twice: %v, want ErrExists", err)
	}
	_ = raw
}

// conformListPrefix checks the key layout kmsgate uses: tenant and kid separated by NUL, listed
// per tenant. A tenant whose id is a prefix of another's must not see the other's records, and
// bytes above 0x7f must sort as unsigned bytes on both engines.
func conformListPrefix(t *testing.T, s *Store) {
	ctx := context.Background()
	keys := []string{
		KeyRecordKey("acme", "k2"), KeyRecordKey("acme", "k1"), KeyRecordKey("acme-corp", "k1"),
		KeyRecordKey("acm", "k1"), "key/acme", "key/acme\x01x", "key/acme\x00\xff", "key/acme\x00\x00",
		"t/\xff\xff", "t/\xff", "t0", "t/",
	}
	for _, k := range keys {
		// %q: JSON strings hold only UTF-8, and some of these keys are not.
		if err := s.Put(ctx, k, rec{S: fmt.Sprintf("%q", k)}); err != nil {
			t.Fatal(err)
		}
	}
	list := func(prefix string) string {
		var got []string
		err := s.List(ctx, prefix, func(key string, val []byte) error {
			var r rec
			if err := json.Unmarshal(val, &r); err != nil || r.S != fmt.Sprintf("%q", key) {
				t.Errorf("value of %q: %s %v", key, val, err)
			}
			got = append(got, fmt.Sprintf("%q", key))
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		return strings.Join(got, " ")
	}
	if got, want := list(KeyRecordPrefix("acme")), `"key/acme\x00\x00" "key/acme\x00k1" "key/acme\x00k2" "key/acme\x00\xff"`; got != want {
		t.Errorf("List(acme) = %s\nwant %s", got, want)
	}
	if got, want := list("t/\xff"), `"t/\xff" "t/\xff\xff"`; got != want {
		t.Errorf("List(t/\\xff) = %s, want %s", got, want)
	}
	if got, want := list("t/"), `"t/" "t/\xff" "t/\xff\xff"`; got != want {
		t.Errorf("List(t/) = %s, want %s", got, want)
	}
	if got := list("nothing/"); got != "" {
		t.Errorf("List(nothing/) = %s, want nothing", got)
	}
	if n := len(strings.Fields(list(""))); n != len(keys) {
		t.Errorf("List(\"\") returned %d records, want %d", n, len(keys))
	}
	stop := errors.New("stop")
	n := 0
	if err := s.List(ctx, "key/", func(string, []byte) error { n++; return stop }); !errors.Is(err, stop) || n != 1 {
		t.Fatalf("List did not stop on the callback's error: %v after %d calls", err, n)
	}
}

// conformListManyPages lists more records than one PostgreSQL page, with the store used from
// inside the callback.
func conformListManyPages(t *testing.T, s *Store) {
	ctx := context.Background()
	const n = 2*listPage + 17
	if err := s.Update(ctx, func(tx *Txn) error {
		for i := range n {
			if err := tx.Put(fmt.Sprintf("p/%05d", i), rec{N: i}); err != nil {
				return err
			}
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	i := 0
	err := s.List(ctx, "p/", func(key string, _ []byte) error {
		if want := fmt.Sprintf("p/%05d", i); key != want {
			return fmt.Errorf("record %d is %s, want %s", i, key, want)
		}
		i++
		var r rec
		return s.Get(ctx, key, &r)
	})
	if err != nil || i != n {
		t.Fatalf("listed %d of %d: %v", i, n, err)
	}
}

func conformUpdateAtomic(t *testing.T, s *Store) {
	ctx := context.Background()
	boom := errors.New("boom")
	err := s.Update(ctx, func(tx *Txn) error {
		if err := tx.Put("x/1", rec{N: 1}); err != nil {
			return err
		}
		return boom
	})
	if !errors.Is(err, boom) {
		t.Fatalf("update: %v", err)
	}
	var r rec
	if err := s.Get(ctx, "x/1", &r); !errors.Is(err, ErrNotFound) {
		t.Fatalf("a failed transaction wrote x/1: %v", err)
	}
	if err := s.Update(ctx, func(tx *Txn) error {
		if err := tx.Put("x/1", rec{N: 1}); err != nil {
			return err
		}
		return tx.Get("x/1", &r)
	}); err != nil || r.N != 1 {
		t.Fatalf("read own write in a transaction: %+v %v", r, err)
	}
}

func conformTxnCreateDelete(t *testing.T, s *Store) {
	ctx := context.Background()
	if err := s.Put(ctx, "c/old", rec{N: 1}); err != nil {
		t.Fatal(err)
	}
	err := s.Update(ctx, func(tx *Txn) error {
		if err := tx.Create("c/old", rec{N: 2}); !errors.Is(err, ErrExists) {
			return fmt.Errorf("Txn.Create over an existing record: %v, want ErrExists", err)
		}
		if err := tx.Create("c/new", rec{N: 3}); err != nil {
			return err
		}
		if err := tx.Create("c/new", rec{N: 4}); !errors.Is(err, ErrExists) {
			return fmt.Errorf("Txn.Create over its own write: %v, want ErrExists", err)
		}
		if err := tx.Delete("c/old"); err != nil {
			return err
		}
		if err := tx.Delete("c/missing"); err != nil {
			return fmt.Errorf("Txn.Delete of a missing key: %v", err)
		}
		var r rec
		if err := tx.Get("c/old", &r); !errors.Is(err, ErrNotFound) {
			return fmt.Errorf("Get after Txn.Delete: %v, want ErrNotFound", err)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	var r rec
	if err := s.Get(ctx, "c/old", &r); !errors.Is(err, ErrNotFound) {
		t.Fatalf("c/old after the transaction: %v, want deleted", err)
	}
	if err := s.Get(ctx, "c/new", &r); err != nil || r.N != 3 {
		t.Fatalf("c/new after the transaction: %+v %v", r, err)
	}
	// A failed transaction leaves neither its creates nor its deletes behind.
	boom := errors.New("boom")
	err = s.Update(ctx, func(tx *Txn) error {
		if err := tx.Delete("c/new"); err != nil {
			return err
		}
		if err := tx.Create("c/other", rec{}); err != nil {
			return err
		}
		return boom
	})
	if !errors.Is(err, boom) {
		t.Fatal(err)
	}
	if err := s.Get(ctx, "c/new", &r); err != nil {
		t.Fatalf("rolled-back delete removed c/new: %v", err)
	}
	if err := s.Get(ctx, "c/other", &r); !errors.Is(err, ErrNotFound) {
		t.Fatalf("rolled-back create left c/other: %v", err)
	}
}

// conformNoLostUpdates increments counters from many goroutines in read-modify-write
// transactions; every increment must land and no caller may see a conflict.
func conformNoLostUpdates(t *testing.T, s *Store) {
	ctx := context.Background()
	const workers, each = 16, 25
	for _, k := range []string{"n/a", "n/b"} {
		if err := s.Put(ctx, k, rec{}); err != nil {
			t.Fatal(err)
		}
	}
	var wg sync.WaitGroup
	errc := make(chan error, workers*each)
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range each {
				// Each transaction moves one unit between two counters too, so a torn
				// transaction would show up as a sum that is off.
				errc <- s.Update(ctx, func(tx *Txn) error {
					var a, b rec
					if err := tx.Get("n/a", &a); err != nil {
						return err
					}
					if err := tx.Get("n/b", &b); err != nil {
						return err
					}
					a.N++
					if w%2 == 0 {
						b.N += 2
					} else {
						b.N--
					}
					if err := tx.Put("n/a", a); err != nil {
						return err
					}
					return tx.Put("n/b", b)
				})
			}
		}()
	}
	wg.Wait()
	close(errc)
	for err := range errc {
		if err != nil {
			t.Fatalf("concurrent update failed: %v", err)
		}
	}
	var a, b rec
	if err := s.Get(ctx, "n/a", &a); err != nil {
		t.Fatal(err)
	}
	if err := s.Get(ctx, "n/b", &b); err != nil {
		t.Fatal(err)
	}
	if a.N != workers*each {
		t.Fatalf("counter = %d after %d increments: updates were lost", a.N, workers*each)
	}
	if want := (workers/2)*each*2 - (workers/2)*each; b.N != want {
		t.Fatalf("second counter = %d, want %d", b.N, want)
	}
}

// conformCreateOneWinner races Create of one key, directly and inside transactions: exactly one
// caller wins, the others get ErrExists, never another error.
func conformCreateOneWinner(t *testing.T, s *Store) {
	ctx := context.Background()
	for round := range 5 {
		key := fmt.Sprintf("race/%d", round)
		const racers = 12
		var wg sync.WaitGroup
		errs := make([]error, racers)
		for i := range racers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				if i%2 == 0 {
					errs[i] = s.Create(ctx, key, rec{N: i})
					return
				}
				errs[i] = s.Update(ctx, func(tx *Txn) error { return tx.Create(key, rec{N: i}) })
			}()
		}
		wg.Wait()
		won := 0
		for i, err := range errs {
			switch {
			case err == nil:
				won++
			case !errors.Is(err, ErrExists):
				t.Fatalf("racer %d: %v, want nil or ErrExists", i, err)
			}
		}
		if won != 1 {
			t.Fatalf("round %d: %d creators won, want exactly 1", round, won)
		}
	}
}

func TestPrefixEnd(t *testing.T) {
	for in, want := range map[string]string{"a/": "a0", "a\xff": "b", "\xff\xff": "", "": "", "a\x00": "a\x01"} {
		got := prefixEnd([]byte(in))
		if string(got) != want || (want == "" && got != nil) {
			t.Errorf("prefixEnd(%q) = %q, want %q", in, got, want)
		}
	}
}
