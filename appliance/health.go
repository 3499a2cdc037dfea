package appliance

import (
	"context"
	"sync"
	"time"

	"github.com/kmsgate/kmsgate/metrics"
	"github.com/kmsgate/kmsgate/providers"
)

// healthMonitor caches provider health for a short time, so /health and the key-chain health
// endpoint cannot be turned into a probe flood against an HSM or a remote KMS, and it refreshes the
// provider_up gauges in the background.
type healthMonitor struct {
	reg     *providers.Registry
	m       *metrics.Metrics
	ttl     time.Duration
	timeout time.Duration

	mu   sync.Mutex
	last map[string]cached
}

type cached struct {
	r  providers.HealthReport
	at time.Time
}

func newHealthMonitor(reg *providers.Registry, m *metrics.Metrics) *healthMonitor {
	return &healthMonitor{reg: reg, m: m, ttl: time.Second, timeout: 5 * time.Second, last: map[string]cached{}}
}

// Check returns the health of the providers in ids (all when empty), probing those whose cached
// result is older than the TTL, in parallel.
func (h *healthMonitor) Check(ctx context.Context, ids []string) []providers.HealthReport {
	if len(ids) == 0 {
		ids = h.reg.IDs()
	}
	now := time.Now()
	out := make([]providers.HealthReport, len(ids))
	var stale []string
	var staleIdx []int
	h.mu.Lock()
	for i, id := range ids {
		if c, ok := h.last[id]; ok && now.Sub(c.at) < h.ttl {
			out[i] = c.r
		} else {
			stale = append(stale, id)
			staleIdx = append(staleIdx, i)
		}
	}
	h.mu.Unlock()
	if len(stale) == 0 {
		return out
	}
	fresh := h.reg.HealthAll(ctx, h.timeout, stale...)
	h.mu.Lock()
	for i, r := range fresh {
		out[staleIdx[i]] = r
		h.last[r.ProviderID] = cached{r: r, at: time.Now()}
		h.record(r)
	}
	h.mu.Unlock()
	return out
}

func (h *healthMonitor) record(r providers.HealthReport) {
	up := 0.0
	if r.OK {
		up = 1
	}
	h.m.ProviderUp.WithLabelValues(r.ProviderID, r.Type).Set(up)
	h.m.ProviderProbe.WithLabelValues(r.ProviderID, r.Type).Set(float64(r.LatencyMs) / 1000)
}

// run probes every provider each interval until ctx ends.
func (h *healthMonitor) run(ctx context.Context, every time.Duration) {
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		h.Check(ctx, nil)
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}
