package providers_test

import (
	"context"
	"encoding/json"
	"errors"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kmsgate/kmsgate/internal/errs"
	"github.com/kmsgate/kmsgate/providers"
)

// stub is a Provider for the registry's own bookkeeping. It is a fake on purpose: the registry
// only calls ID, Type, Health and Close, and no real backend can be made to hang its health check
// on demand. The embedded nil interface makes any other call panic, so the test would notice.
type stub struct {
	providers.Provider
	id, typ string
	hang    bool
	closed  *atomic.Int32
}

func (s *stub) ID() string   { return s.id }
func (s *stub) Type() string { return s.typ }
func (s *stub) Close() error {
	s.closed.Add(1)
	if s.id == "bad-close" {
		return errors.New("close failed")
	}
	return nil
}
func (s *stub) Health(ctx context.Context) providers.Health {
	if s.hang {
		// Ignores ctx, like a backend call stuck in C code.
		time.Sleep(time.Hour)
	}
	return providers.Health{OK: true}
}

func cfg(id, typ string) providers.Config {
	return providers.Config{ID: id, Type: typ, Raw: json.RawMessage(`{"id":"` + id + `","type":"` + typ + `"}`)}
}

func factories(closed *atomic.Int32) map[string]providers.Factory {
	mk := func(hang bool) providers.Factory {
		return func(_ context.Context, c providers.Config) (providers.Provider, error) {
			if c.ID == "broken" {
				return nil, c.Errorf("field \"library\" is required")
			}
			return &stub{id: c.ID, typ: c.Type, hang: hang, closed: closed}, nil
		}
	}
	return map[string]providers.Factory{"ok": mk(false), "hang": mk(true)}
}

func TestNewRegistryErrorsCloseWhatWasBuilt(t *testing.T) {
	ctx := context.Background()
	for _, c := range []struct {
		name string
		cfgs []providers.Config
		def  string
		want string
	}{
		{"unknown type", []providers.Config{cfg("a", "ok"), cfg("b", "nosuch")}, "a", `unknown type "nosuch"`},
		{"factory error", []providers.Config{cfg("a", "ok"), cfg("broken", "ok")}, "a", `"library" is required`},
		{"default missing", []providers.Config{cfg("a", "ok"), cfg("b", "ok")}, "c", `defaultProvider "c"`},
	} {
		t.Run(c.name, func(t *testing.T) {
			var closed atomic.Int32
			r, err := providers.NewRegistry(ctx, c.cfgs, c.def, factories(&closed), nil)
			if err == nil || r != nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("NewRegistry = %v, %v; want an error containing %q", r, err, c.want)
			}
			if closed.Load() == 0 {
				t.Fatal("providers built before the error were not closed")
			}
		})
	}
}

func TestGetAndIDs(t *testing.T) {
	var closed atomic.Int32
	r, err := providers.NewRegistry(context.Background(), []providers.Config{cfg("b", "ok"), cfg("a", "ok")}, "a", factories(&closed), nil)
	if err != nil {
		t.Fatal(err)
	}
	if p, err := r.Get(""); err != nil || p.ID() != "a" {
		t.Fatalf("Get(\"\") = %v %v, want the default a", p, err)
	}
	if p, err := r.Get("b"); err != nil || p.ID() != "b" {
		t.Fatalf("Get(b) = %v %v", p, err)
	}
	_, err = r.Get("nope")
	if !errors.Is(err, errs.BadInput) || errs.CodeOf(err) != "unknown_provider" || !strings.Contains(errs.PublicMessage(err), `["a","b"]`) {
		t.Fatalf("Get(nope) = %v (code %q), want BadInput unknown_provider listing the ids", err, errs.CodeOf(err))
	}
	if ids := r.IDs(); strings.Join(ids, ",") != "b,a" || r.DefaultID() != "a" {
		t.Fatalf("IDs = %v, default %q: want configuration order", ids, r.DefaultID())
	}
	ids := r.IDs()
	ids[0] = "mutated"
	if r.IDs()[0] != "b" {
		t.Fatal("IDs exposes the registry's own slice")
	}
	if err := r.Close(); err != nil || closed.Load() != 2 {
		t.Fatalf("Close: %v, %d closed", err, closed.Load())
	}
}

func TestHealthAllBoundedByTimeout(t *testing.T) {
	var closed atomic.Int32
	r, err := providers.NewRegistry(context.Background(),
		[]providers.Config{cfg("fast", "ok"), cfg("stuck", "hang"), cfg("bad-close", "ok")}, "fast", factories(&closed), nil)
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	reps := r.HealthAll(context.Background(), 200*time.Millisecond)
	if el := time.Since(start); el > 2*time.Second {
		t.Fatalf("HealthAll took %v with a hanging provider and a 200ms timeout", el)
	}
	got := map[string]providers.HealthReport{}
	for _, h := range reps {
		got[h.ProviderID] = h
	}
	if len(reps) != 3 || !got["fast"].OK || !got["bad-close"].OK || got["stuck"].OK || !strings.Contains(got["stuck"].Error, "timed out") ||
		got["stuck"].Type != "hang" {
		t.Fatalf("reports: %+v", reps)
	}
	if only := r.HealthAll(context.Background(), time.Second, "fast", "unknown"); len(only) != 1 || only[0].ProviderID != "fast" {
		t.Fatalf("HealthAll(fast, unknown) = %+v", only)
	}
	if err := r.Close(); err == nil || !strings.Contains(err.Error(), `"bad-close"`) {
		t.Fatalf("Close = %v, want the failing provider named", err)
	}
}
