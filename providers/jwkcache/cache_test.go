package jwkcache

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func (f *fakeClock) Now() time.Time { f.mu.Lock(); defer f.mu.Unlock(); return f.t }
func (f *fakeClock) Add(d time.Duration) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.t = f.t.Add(d)
}

func newKey(t testing.TB) *ecdsa.PublicKey {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return &k.PublicKey
}

func TestTTLExpiry(t *testing.T) {
	clk := &fakeClock{t: time.Unix(1_700_000_000, 0)}
	c := New(WithClock(clk.Now))
	pub := newKey(t)
	c.Put("a", pub)
	clk.Add(DefaultTTL - time.Second)
	if got, ok := c.Get("a"); !ok || !got.Equal(pub) {
		t.Fatalf("entry should still be valid just before the TTL")
	}
	clk.Add(time.Second)
	if _, ok := c.Get("a"); ok {
		t.Fatal("entry must expire at the TTL")
	}
	if c.Len() != 0 {
		t.Fatalf("expired entry must be removed on read, len=%d", c.Len())
	}
}

func TestPutRestartsTTL(t *testing.T) {
	clk := &fakeClock{t: time.Unix(1_700_000_000, 0)}
	c := New(WithClock(clk.Now), WithTTL(time.Minute))
	c.Put("a", newKey(t))
	clk.Add(50 * time.Second)
	c.Put("a", newKey(t))
	clk.Add(50 * time.Second)
	if _, ok := c.Get("a"); !ok {
		t.Fatal("re-put must restart the TTL")
	}
}

func TestDeleteInvalidates(t *testing.T) {
	c := New()
	c.Put("a", newKey(t))
	c.Delete("a")
	if _, ok := c.Get("a"); ok {
		t.Fatal("deleted entry still served")
	}
	c.Delete("never") // must not panic
}

func TestLRUBound(t *testing.T) {
	c := New(WithMaxEntries(3))
	keys := map[string]*ecdsa.PublicKey{}
	for _, k := range []string{"a", "b", "c"} {
		keys[k] = newKey(t)
		c.Put(k, keys[k])
	}
	if _, ok := c.Get("a"); !ok { // a becomes most recently used; b is now the oldest
		t.Fatal("a missing")
	}
	c.Put("d", newKey(t))
	if c.Len() != 3 {
		t.Fatalf("len = %d, want 3", c.Len())
	}
	if _, ok := c.Get("b"); ok {
		t.Fatal("least recently used entry b should have been evicted")
	}
	for _, k := range []string{"a", "c", "d"} {
		if _, ok := c.Get(k); !ok {
			t.Fatalf("%s evicted, want kept", k)
		}
	}
}

func TestGetOrFetch(t *testing.T) {
	c := New()
	pub := newKey(t)
	var calls atomic.Int32
	fetch := func(context.Context) (*ecdsa.PublicKey, error) { calls.Add(1); return pub, nil }
	for i := 0; i < 3; i++ {
		got, err := c.GetOrFetch(context.Background(), "a", fetch)
		if err != nil || !got.Equal(pub) {
			t.Fatalf("GetOrFetch = %v, %v", got, err)
		}
	}
	if calls.Load() != 1 {
		t.Fatalf("fetch called %d times, want 1", calls.Load())
	}
	boom := errors.New("backend down")
	if _, err := c.GetOrFetch(context.Background(), "b",
		func(context.Context) (*ecdsa.PublicKey, error) { return nil, boom }); !errors.Is(err, boom) {
		t.Fatalf("err = %v, want backend error", err)
	}
	if _, ok := c.Get("b"); ok {
		t.Fatal("failed fetch must not be cached")
	}
}

func TestConcurrentUse(t *testing.T) {
	c := New(WithMaxEntries(50))
	pub := newKey(t)
	var wg sync.WaitGroup
	for g := 0; g < 16; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 500; i++ {
				k := fmt.Sprintf("k%d", (g*7+i)%100)
				switch i % 3 {
				case 0:
					c.Put(k, pub)
				case 1:
					c.Get(k)
				default:
					c.Delete(k)
				}
			}
		}()
	}
	wg.Wait()
	if c.Len() > 50 {
		t.Fatalf("bound exceeded: %d", c.Len())
	}
}
