package keys_test

import (
	"context"
	"encoding/json"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kmsgate/kmsgate/appliance/keys"
	"github.com/kmsgate/kmsgate/appliance/store"
	"github.com/kmsgate/kmsgate/internal/errs"
	"github.com/kmsgate/kmsgate/providers"
)

type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *clock) add(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

type sweepLog struct {
	mu  sync.Mutex
	got []string
}

func (s *sweepLog) observe(typ, res string) {
	s.mu.Lock()
	s.got = append(s.got, typ+"/"+res)
	s.mu.Unlock()
}

// crashedCreate leaves what a process killed between the backend create and the store write
// leaves: an intent and a backend key, no reference.
func crashedCreate(t *testing.T, e *env, lc *keys.Lifecycle, kid string) providers.KeyRef {
	t.Helper()
	ref, err := lc.Begin().Generate(context.Background(), e.prov, providers.KeySpec{Tenant: "t1", KID: kid})
	if err != nil {
		t.Fatal(err)
	}
	if !e.sealedExists(t, ref.ExternalID) {
		t.Fatal("the backend key was not created")
	}
	return ref
}

// A sweep never touches an intent younger than the maximum age (it may be a create in flight in
// another process); an older one loses its backend key and the intent, and stops counting.
func TestSweepSkipsYoungIntentsAndDeletesStaleOnes(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	clk := &clock{t: time.Now()}
	lc := keys.NewLifecycleWith(keys.LifecycleConfig{Store: e.st, Now: clk.now})
	ref := crashedCreate(t, e, lc, "k1")
	var log sweepLog

	clk.add(time.Minute)
	n, err := lc.Sweep(ctx, e.reg, 2*time.Minute, log.observe)
	if err != nil || n != 0 {
		t.Fatalf("sweep of a young intent handled %d (%v), want 0", n, err)
	}
	if !e.sealedExists(t, ref.ExternalID) || countPrefix(t, e.st, "intent/") != 1 {
		t.Fatal("a young intent or its key was swept")
	}
	if c, _ := lc.KeyCount(ctx, "t1"); c != 1 {
		t.Fatalf("a create in flight counts %d, want 1", c)
	}

	clk.add(90 * time.Second)
	n, err = lc.Sweep(ctx, e.reg, 2*time.Minute, log.observe)
	if err != nil || n != 1 {
		t.Fatalf("sweep of a stale intent handled %d (%v), want 1", n, err)
	}
	if e.sealedExists(t, ref.ExternalID) {
		t.Fatal("the stale intent's backend key is still there")
	}
	if countPrefix(t, e.st, "intent/") != 0 {
		t.Fatal("the stale intent is still there")
	}
	if c, _ := lc.KeyCount(ctx, "t1"); c != 0 {
		t.Fatalf("count after the sweep = %d, want 0", c)
	}
	if len(log.got) != 1 || log.got[0] != "db/deleted" {
		t.Fatalf("observed %v, want [db/deleted]", log.got)
	}
}

// A create that outlives the maximum age and is swept meanwhile must not store a reference to the
// key the sweep deleted: its commit fails and nothing is left.
func TestCommitAfterSweepFails(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	clk := &clock{t: time.Now()}
	lc := keys.NewLifecycleWith(keys.LifecycleConfig{Store: e.st, Now: clk.now})
	b := lc.Begin()
	ref, err := b.Generate(ctx, e.prov, providers.KeySpec{Tenant: "t1", KID: "slow"})
	if err != nil {
		t.Fatal(err)
	}
	clk.add(time.Hour)
	if n, err := lc.Sweep(ctx, e.reg, time.Minute, nil); err != nil || n != 1 {
		t.Fatalf("sweep: %d %v", n, err)
	}
	err = b.CommitTx(ctx, func(tx *store.Txn) error { return tx.Put(store.KeyRecordKey("t1", "slow"), 1) })
	if errs.CodeOf(err) != "key_create_abandoned" {
		t.Fatalf("commit after the sweep: %v, want key_create_abandoned", err)
	}
	var raw any
	if err := e.st.Get(ctx, store.KeyRecordKey("t1", "slow"), &raw); err != store.ErrNotFound {
		t.Fatalf("a reference to the swept key was written: %v", err)
	}
	if e.sealedExists(t, ref.ExternalID) {
		t.Fatal("the key exists again")
	}
}

// Commit without a store transaction (the key-chain face): once the intents are confirmed the
// reference may exist, so a sweep keeps the key and only drops the intent.
func TestSweepKeepsConfirmedKeys(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	clk := &clock{t: time.Now()}
	lc := keys.NewLifecycleWith(keys.LifecycleConfig{Store: e.st, Now: clk.now})
	b := lc.Begin()
	ref, err := b.Generate(ctx, e.prov, providers.KeySpec{Tenant: "t1", KID: "chain-key"})
	if err != nil {
		t.Fatal(err)
	}
	stuck := make(chan struct{})
	t.Cleanup(func() { close(stuck) })
	// The process "dies" inside persist: the sweep runs while the commit has not returned.
	go func() { _ = b.Commit(func() error { <-stuck; return errs.Errorf(errs.Internal, "dead") }) }()
	deadline := time.Now().Add(5 * time.Second)
	for {
		var in keys.Intent
		found := false
		e.st.List(ctx, "intent/", func(_ string, v []byte) error { found = true; return jsonUnmarshal(v, &in) })
		if found && in.State == keys.IntentConfirming {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the intent was never confirmed")
		}
		time.Sleep(5 * time.Millisecond)
	}
	clk.add(time.Hour)
	var log sweepLog
	if n, err := lc.Sweep(ctx, e.reg, time.Minute, log.observe); err != nil || n != 1 {
		t.Fatalf("sweep: %d %v", n, err)
	}
	if !e.sealedExists(t, ref.ExternalID) || len(log.got) != 1 || log.got[0] != "db/kept" {
		t.Fatalf("confirmed key deleted or wrong result %v", log.got)
	}
	if c, _ := lc.KeyCount(ctx, "t1"); c != 1 {
		t.Fatalf("a confirmed key counts %d, want 1", c)
	}
}

// Concurrent creates of one tenant cannot overshoot the quota; another tenant is not affected,
// and deleting a key frees its slot.
func TestKeyQuotaIsRaceSafe(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	const quota = 5
	svc := keys.NewWithLifecycle(e.st, e.reg, keys.NewLifecycleWith(keys.LifecycleConfig{Store: e.st, MaxKeysPerTenant: quota}), nil)
	var ok, refused atomic.Int32
	var wg sync.WaitGroup
	for i := 0; i < 40; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, err := svc.Generate(ctx, "t1", "k"+string(rune('A'+i)), "", e.prov)
			switch {
			case err == nil:
				ok.Add(1)
			case errs.CodeOf(err) == "quota_exceeded" && errs.KindOf(err) == errs.Forbidden:
				refused.Add(1)
			default:
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	if ok.Load() != quota || refused.Load() != 40-quota {
		t.Fatalf("%d created, %d refused; want %d and %d", ok.Load(), refused.Load(), quota, 40-quota)
	}
	if c, _ := svc.Lifecycle().KeyCount(ctx, "t1"); c != quota {
		t.Fatalf("count %d, want %d", c, quota)
	}
	if _, err := svc.Generate(ctx, "t2", "k", "", e.prov); err != nil {
		t.Fatalf("another tenant is limited by t1's keys: %v", err)
	}
	var victim string
	e.st.List(ctx, store.KeyRecordPrefix("t1"), func(k string, _ []byte) error {
		victim = k[len(store.KeyRecordPrefix("t1")):]
		return nil
	})
	if err := svc.Delete(ctx, "t1", victim); err != nil {
		t.Fatal(err)
	}
	if _, err := svc.Generate(ctx, "t1", "after-delete", "", e.prov); err != nil {
		t.Fatalf("a deleted key's slot was not freed: %v", err)
	}
}

func jsonUnmarshal(b []byte, v any) error { return json.Unmarshal(b, v) }

// Key records from before owned records existed count against the quota after the one-time
// backfill, and only once however often it runs.
func TestBackfillCountsOlderKeyRecords(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	if _, err := e.svc.Generate(ctx, "t1", "old", "", e.prov); err != nil {
		t.Fatal(err)
	}
	// Forget the bookkeeping, as a store written by an older version has none.
	for _, p := range []string{"keyown/", "keycount/"} {
		var keys []string
		e.st.List(ctx, p, func(k string, _ []byte) error { keys = append(keys, k); return nil })
		for _, k := range keys {
			e.st.Delete(ctx, k)
		}
	}
	lc := keys.NewLifecycleWith(keys.LifecycleConfig{Store: e.st, MaxKeysPerTenant: 1})
	for i := 0; i < 2; i++ {
		if err := lc.Backfill(ctx); err != nil {
			t.Fatal(err)
		}
	}
	if n, _ := lc.KeyCount(ctx, "t1"); n != 1 {
		t.Fatalf("count after backfill = %d, want 1", n)
	}
	svc := keys.NewWithLifecycle(e.st, e.reg, lc, nil)
	if _, err := svc.Generate(ctx, "t1", "new", "", e.prov); errs.CodeOf(err) != "quota_exceeded" {
		t.Fatalf("an older key was not counted: %v", err)
	}
}
