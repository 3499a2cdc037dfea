package hsm

import (
	"context"
	"crypto/ecdsa"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kmsgate/kmsgate/internal/keyutil"
	"github.com/kmsgate/kmsgate/internal/testenv"
)

// TestRecoveryUnderLoad makes the "HSM" fail while several goroutines sign, brings it back, and
// checks the slot heals itself: it goes down (fail fast, no hang), rebuilds in the background,
// and every answered request was either a verified signature or an error — never a wrong one.
//
// The failure comes from a fault-injecting shim around SoftHSM2 (internal/testenv): it exists
// only because SoftHSM2 cannot produce a device failure on demand. Everything else is SoftHSM2.
func TestRecoveryUnderLoad(t *testing.T) {
	env := testenv.NewSoftHSM(t, 1)
	shim := testenv.BuildFaultShim(t, env.Library)
	s := openSlot(t, Config{Library: shim.Library, Slot: env.Tokens[0].Label, PIN: env.Tokens[0].PIN, PoolSize: 4,
		AcquireTimeout: 500 * time.Millisecond, MinBackoff: 20 * time.Millisecond, MaxBackoff: 200 * time.Millisecond,
		Logger: testLogger(t)})
	mustUp(t, s)
	ctx := context.Background()
	k, pub, err := s.Generate(ctx, "recover-me")
	if err != nil {
		t.Fatal(err)
	}

	var ok, failed, wrong atomic.Int64
	var slowestFail atomic.Int64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for w := 0; w < 6; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				d := digest(fmt.Sprintf("load %d %d", w, i))
				rctx, cancel := context.WithTimeout(ctx, 2*time.Second)
				start := time.Now()
				sig, err := s.Sign(rctx, k, d)
				cancel()
				switch {
				case err != nil:
					failed.Add(1)
					if el := int64(time.Since(start)); el > slowestFail.Load() {
						slowestFail.Store(el)
					}
					time.Sleep(time.Millisecond)
				case keyutil.VerifyRawDigest(pub, d, sig):
					ok.Add(1)
				default:
					wrong.Add(1)
				}
			}
		}()
	}

	time.Sleep(300 * time.Millisecond)
	okBefore := ok.Load()
	shim.Fail(t)
	waitFor(t, 3*time.Second, "slot to go down", func() bool { return !s.Up() })
	if h := s.Health(ctx); h.OK {
		t.Error("health ok while the token fails")
	}
	time.Sleep(500 * time.Millisecond) // outage: rebuild attempts fail and back off
	okDuring := ok.Load()
	shim.Recover(t)
	back := time.Now()
	waitFor(t, 10*time.Second, "slot to recover", func() bool { return s.Up() && s.Health(ctx).OK })
	ttr := time.Since(back)
	time.Sleep(300 * time.Millisecond)
	close(stop)
	wg.Wait()

	st := s.Stats()
	t.Logf("time to recover after the token came back: %v (slot down for %v in total); signs ok=%d failed=%d wrong=%d; slowest failure %v; rebuilds=%d; errors=%v",
		ttr, st.LastRecovery, ok.Load(), failed.Load(), wrong.Load(), time.Duration(slowestFail.Load()), st.Rebuilds, nonZero(st.Errors))
	if wrong.Load() != 0 {
		t.Fatalf("%d wrong signatures", wrong.Load())
	}
	if okBefore == 0 || ok.Load() <= okDuring {
		t.Fatalf("no successful signatures before (%d) or after recovery (%d → %d)", okBefore, okDuring, ok.Load())
	}
	if failed.Load() == 0 {
		t.Fatal("no request failed during the outage: the fault was not injected")
	}
	if time.Duration(slowestFail.Load()) > time.Second {
		t.Errorf("a request hung for %v during the outage; it must fail fast", time.Duration(slowestFail.Load()))
	}
	if st.Rebuilds < 1 || !st.Up || st.Errors["CKR_DEVICE_ERROR"] == 0 {
		t.Errorf("stats after recovery: %+v", st)
	}
	if ttr > 2*time.Second {
		t.Errorf("recovery took %v after the token came back (backoff is capped at 200ms)", ttr)
	}
	// After recovery the hot path is steady again: no opens, logins or searches per sign.
	before := s.Stats()
	for i := 0; i < 100; i++ {
		d := digest(fmt.Sprint("after ", i))
		sig, err := s.Sign(ctx, k, d)
		if err != nil || !keyutil.VerifyRawDigest(pub, d, sig) {
			t.Fatalf("sign after recovery: %v", err)
		}
	}
	after := s.Stats()
	if after.SessionsOpened != before.SessionsOpened || after.Logins != before.Logins || after.ObjectSearches != before.ObjectSearches {
		t.Errorf("hot path after recovery is not steady: before %+v after %+v", before, after)
	}
}

func waitFor(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", d, what)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

func nonZero(m map[string]uint64) map[string]uint64 {
	out := map[string]uint64{}
	for k, v := range m {
		if v != 0 {
			out[k] = v
		}
	}
	return out
}

// TestPeriodicCanaryDetectsOutage: with no traffic at all, the periodic canary notices the token
// failing (the slot goes down) and the rebuild brings it back.
func TestPeriodicCanaryDetectsOutage(t *testing.T) {
	env := testenv.NewSoftHSM(t, 1)
	shim := testenv.BuildFaultShim(t, env.Library)
	s := openSlot(t, Config{Library: shim.Library, Slot: "0", PIN: env.Tokens[0].PIN, PoolSize: 1,
		CanaryInterval: 20 * time.Millisecond, MinBackoff: 10 * time.Millisecond, MaxBackoff: 50 * time.Millisecond, Logger: testLogger(t)})
	mustUp(t, s)
	shim.Fail(t)
	waitFor(t, 3*time.Second, "the canary to take the slot down", func() bool { return !s.Up() })
	shim.Recover(t)
	waitFor(t, 5*time.Second, "the slot to come back", s.Up)
	if err := s.Canary(context.Background()); err != nil {
		t.Fatalf("canary after recovery: %v", err)
	}
	if h := s.Health(context.Background()); !h.OK {
		t.Fatalf("health after recovery: %+v", h)
	}
}

// TestRecoveryTwoSlotsShareLibrary: two slots on one library (one C_Initialize) both fail, both
// heal — including the library re-initialisation one of them triggers under the other — and
// closing one slot leaves the library initialised for the other.
func TestRecoveryTwoSlotsShareLibrary(t *testing.T) {
	env := testenv.NewSoftHSM(t, 2)
	shim := testenv.BuildFaultShim(t, env.Library)
	var slots []*Slot
	var keys []Key
	var pubs []*ecdsa.PublicKey
	for i, tok := range env.Tokens {
		s, err := Open(context.Background(), Config{Library: shim.Library, Slot: tok.Label, PIN: tok.PIN, PoolSize: 2,
			MinBackoff: 10 * time.Millisecond, MaxBackoff: 100 * time.Millisecond, Logger: testLogger(t)})
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		mustUp(t, s)
		k, pub, err := s.Generate(context.Background(), fmt.Sprint("k", i))
		if err != nil {
			t.Fatal(err)
		}
		slots, keys, pubs = append(slots, s), append(keys, k), append(pubs, pub)
	}
	if slots[0].mod != slots[1].mod {
		t.Fatal("slots of one library do not share the module")
	}
	var wrong atomic.Int64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for w := 0; w < 4; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				j := (w + i) % 2
				d := digest(fmt.Sprint(w, i))
				sig, err := slots[j].Sign(context.Background(), keys[j], d)
				if err == nil && !keyutil.VerifyRawDigest(pubs[j], d, sig) {
					wrong.Add(1)
				}
				if err != nil {
					time.Sleep(time.Millisecond)
				}
			}
		}()
	}
	time.Sleep(100 * time.Millisecond)
	shim.Fail(t)
	waitFor(t, 3*time.Second, "both slots down", func() bool { return !slots[0].Up() && !slots[1].Up() })
	time.Sleep(300 * time.Millisecond) // long enough for re-initialisation attempts
	shim.Recover(t)
	waitFor(t, 5*time.Second, "both slots up", func() bool { return slots[0].Up() && slots[1].Up() })
	time.Sleep(100 * time.Millisecond)
	close(stop)
	wg.Wait()
	if wrong.Load() != 0 {
		t.Fatalf("%d wrong signatures", wrong.Load())
	}
	for j, s := range slots {
		d := digest("after")
		sig, err := s.Sign(context.Background(), keys[j], d)
		if err != nil || !keyutil.VerifyRawDigest(pubs[j], d, sig) {
			t.Fatalf("slot %d after recovery: %v", j, err)
		}
	}
	if err := slots[0].Close(); err != nil {
		t.Fatal(err)
	}
	d := digest("one left")
	sig, err := slots[1].Sign(context.Background(), keys[1], d)
	if err != nil || !keyutil.VerifyRawDigest(pubs[1], d, sig) {
		t.Fatalf("closing one slot broke the other (library finalised under it?): %v", err)
	}
	if !slots[1].Up() {
		t.Fatal("remaining slot went down after the other closed")
	}
}
