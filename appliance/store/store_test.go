package store

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"strings"
	"testing"
)

type rec struct {
	N int    `json:"n"`
	S string `json:"s"`
}

func open(t *testing.T, dir string) *Store {
	t.Helper()
	s, err := Open(dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func TestCreateGetPutDelete(t *testing.T) {
	ctx := context.Background()
	s := open(t, t.TempDir())
	defer s.Close()

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
	if err := s.Put(ctx, "a/1", rec{N: 3, S: "x"}); err != nil {
		t.Fatal(err)
	}
	if err := s.Get(ctx, "a/1", &got); err != nil || got != (rec{N: 3, S: "x"}) {
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
}

func TestListPrefixInKeyOrder(t *testing.T) {
	ctx := context.Background()
	s := open(t, t.TempDir())
	defer s.Close()
	for _, k := range []string{"t/b", "t/a", "u/a", "t", "t/c"} {
		if err := s.Put(ctx, k, rec{S: k}); err != nil {
			t.Fatal(err)
		}
	}
	var keys []string
	err := s.List(ctx, "t/", func(key string, val []byte) error {
		var r rec
		if err := json.Unmarshal(val, &r); err != nil || r.S != key {
			t.Errorf("value of %s: %s %v", key, val, err)
		}
		keys = append(keys, key)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if strings.Join(keys, ",") != "t/a,t/b,t/c" {
		t.Fatalf("List(t/) = %v, want [t/a t/b t/c]", keys)
	}
	stop := errors.New("stop")
	n := 0
	if err := s.List(ctx, "t/", func(string, []byte) error { n++; return stop }); !errors.Is(err, stop) || n != 1 {
		t.Fatalf("List did not stop on the callback's error: %v after %d calls", err, n)
	}
}

func TestUpdateIsAtomic(t *testing.T) {
	ctx := context.Background()
	s := open(t, t.TempDir())
	defer s.Close()
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

func TestReopenPersistsAndLocks(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	s := open(t, dir)
	if err := s.Create(ctx, TenantKey("acme"), Tenant{ID: "acme", Name: "ACME"}); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(dir, Options{Logger: slog.New(slog.NewJSONHandler(io.Discard, nil))}); !errors.Is(err, ErrLocked) {
		t.Fatalf("second open of a held data dir: %v, want ErrLocked", err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s = open(t, dir)
	defer s.Close()
	var ten Tenant
	if err := s.Get(ctx, TenantKey("acme"), &ten); err != nil || ten.Name != "ACME" {
		t.Fatalf("after reopen: %+v %v", ten, err)
	}
}
