package appliance

import (
	"context"
	"log/slog"
	"sync"
	"time"

	"github.com/kmsgate/kmsgate/api"
	"github.com/kmsgate/kmsgate/metrics"
	"github.com/kmsgate/kmsgate/providers"
)

// DefaultHealthInterval is how often the background monitor probes every provider.
const DefaultHealthInterval = 15 * time.Second

// healthMonitor probes providers in the background and serves the results, so /health and the
// key-chain health endpoint cannot be turned into a probe flood against an HSM or a remote KMS:
// each provider has at most one probe in flight, whoever asked for it. It also refreshes the
// provider_up gauges, and it is where a failing backend's own error text goes (the log); callers
// get a stable code.
type healthMonitor struct {
	reg     *providers.Registry
	m       *metrics.Metrics
	log     *slog.Logger
	ttl     time.Duration
	timeout time.Duration

	mu    sync.Mutex
	state map[string]*probeState // one per provider, built once; fields guarded by mu

	store *storeHealth // nil: no store to probe
}

type probeState struct {
	p        providers.Provider
	have     bool
	last     api.ProviderHealth
	at       time.Time
	rawErr   string        // the backend's error text of the last probe, for change-only logging
	inflight chan struct{} // non-nil while a probe runs; closed when its result is stored
}

func newHealthMonitor(reg *providers.Registry, m *metrics.Metrics, log *slog.Logger) *healthMonitor {
	h := &healthMonitor{reg: reg, m: m, log: log, ttl: time.Second, timeout: 5 * time.Second,
		state: map[string]*probeState{}}
	for _, p := range reg.All() {
		h.state[p.ID()] = &probeState{p: p}
	}
	return h
}

// Check returns the health of the providers in ids (all when empty) from results at most ttl old;
// older ones are refreshed through the provider's single in-flight probe.
func (h *healthMonitor) Check(ctx context.Context, ids []string) []api.ProviderHealth {
	return h.collect(ctx, ids, h.ttl)
}

// Last returns the last results whatever their age, waiting only for providers never probed.
func (h *healthMonitor) Last(ctx context.Context, ids []string) []api.ProviderHealth {
	return h.collect(ctx, ids, 0)
}

func (h *healthMonitor) collect(ctx context.Context, ids []string, maxAge time.Duration) []api.ProviderHealth {
	if len(ids) == 0 {
		ids = h.reg.IDs()
	}
	waits := make([]<-chan struct{}, len(ids))
	now := time.Now()
	h.mu.Lock()
	for i, id := range ids {
		st := h.state[id]
		if st != nil && (!st.have || (maxAge > 0 && now.Sub(st.at) >= maxAge)) {
			waits[i] = h.startLocked(st)
		}
	}
	h.mu.Unlock()
	out := make([]api.ProviderHealth, 0, len(ids))
	for i, id := range ids {
		st := h.state[id]
		if st == nil {
			continue
		}
		if waits[i] != nil {
			select {
			case <-waits[i]:
			case <-ctx.Done():
			}
		}
		h.mu.Lock()
		r, have := st.last, st.have
		h.mu.Unlock()
		if !have {
			r = api.ProviderHealth{ProviderID: st.p.ID(), Type: st.p.Type(), Code: api.HealthNotProbed,
				Error: "no health probe has completed yet"}
		}
		out = append(out, r)
	}
	return out
}

// startLocked starts a probe of st unless one is in flight, and returns the channel closed when the
// running probe's result is stored. h.mu must be held.
func (h *healthMonitor) startLocked(st *probeState) <-chan struct{} {
	if st.inflight != nil {
		return st.inflight
	}
	done := make(chan struct{})
	st.inflight = done
	go h.probe(st, done)
	return done
}

// probe runs one health probe. It is detached from the request that may have started it: a caller
// giving up must not cancel the result others wait for; the timeout bounds it.
func (h *healthMonitor) probe(st *probeState, done chan struct{}) {
	start := time.Now()
	raw := providers.HealthProbe(context.Background(), st.p, h.timeout)
	r := api.ProviderHealth{ProviderID: st.p.ID(), Type: st.p.Type(), OK: raw.OK, LatencyMs: raw.LatencyMs}
	if !raw.OK {
		r.Code, r.Error = api.HealthFailed, "backend health check failed"
		if time.Since(start) >= h.timeout {
			r.Code, r.Error = api.HealthTimeout, "health probe timed out after "+h.timeout.String()
		}
	}
	h.record(r)
	h.mu.Lock()
	wasOK, hadResult, prevErr := st.last.OK, st.have, st.rawErr
	st.last, st.have, st.at, st.rawErr, st.inflight = r, true, time.Now(), raw.Error, nil
	h.mu.Unlock()
	close(done)
	switch {
	case !raw.OK && (wasOK || !hadResult || raw.Error != prevErr):
		h.log.Warn("provider health probe failed", "provider", r.ProviderID, "type", r.Type, "code", r.Code,
			"error", raw.Error)
	case raw.OK && hadResult && !wasOK:
		h.log.Info("provider healthy again", "provider", r.ProviderID, "type", r.Type)
	}
}

// Store reports the record store's health from the last background probe.
func (h *healthMonitor) Store() api.StoreHealth {
	if h.store == nil {
		return api.StoreHealth{OK: true}
	}
	return h.store.Store()
}

// StoreProbeInterval is how often the record store is probed. Shorter than the provider interval:
// a probe is a stat (Badger) or one ping (PostgreSQL), and /health should report a store outage
// within seconds.
const StoreProbeInterval = 2 * time.Second

// watchStore adds the record store to the background probes. The first probe runs here, before
// the listener opens: the store has just been opened, and a /health answered in the first moments
// must not report a healthy replica as down for want of a result.
func (h *healthMonitor) watchStore(st storeProber, backend string) {
	h.store = &storeHealth{st: st, backend: backend, timeout: h.timeout, log: h.log}
	h.store.probe()
}

// runStore probes the store every interval until ctx ends.
func (h *healthMonitor) runStore(ctx context.Context, every time.Duration) {
	if h.store == nil {
		return
	}
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		go h.store.probe()
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

func (h *healthMonitor) record(r api.ProviderHealth) {
	up := 0.0
	if r.OK {
		up = 1
	}
	h.m.ProviderUp.WithLabelValues(r.ProviderID, r.Type).Set(up)
	h.m.ProviderProbe.WithLabelValues(r.ProviderID, r.Type).Set(float64(r.LatencyMs) / 1000)
}

// run starts a probe of every provider each interval until ctx ends; a provider whose previous
// probe is still running is skipped, so a hanging backend never piles up probes.
func (h *healthMonitor) run(ctx context.Context, every time.Duration) {
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		h.mu.Lock()
		for _, st := range h.state {
			h.startLocked(st)
		}
		h.mu.Unlock()
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}
