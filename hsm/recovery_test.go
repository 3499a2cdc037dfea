package hsm

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kmsgate/kmsgate/internal/testenv"
	"github.com/kmsgate/kmsgate/providers/keyutil"
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
