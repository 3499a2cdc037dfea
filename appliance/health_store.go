package appliance

import (
	"context"
	"sync"
	"time"

	"github.com/kmsgate/kmsgate/api"
	"github.com/kmsgate/kmsgate/appliance/store"
)

// storeProber is what the monitor needs of the store.
type storeProber interface {
	Check(ctx context.Context) error
}

// storeHealth probes the record store in the background (the health monitor's loop), so /health
// reports a store outage without any caller's request touching the store.
type storeHealth struct {
	st      storeProber
	backend string
	timeout time.Duration
	log     logger

	mu       sync.Mutex
	have     bool
	last     api.StoreHealth
	rawErr   string
	inflight bool
}

// logger is the part of slog.Logger the probe uses.
type logger interface {
	Warn(msg string, args ...any)
	Info(msg string, args ...any)
}

// Store returns the last probe's result; before the first background probe it probes once.
func (h *storeHealth) Store() api.StoreHealth {
	h.mu.Lock()
	have := h.have
	h.mu.Unlock()
	if !have {
		h.probe()
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if !h.have {
		return api.StoreHealth{Backend: h.backend, Code: api.HealthNotProbed, Error: "no store probe has completed yet"}
	}
	return h.last
}

// probe runs one store probe unless one is in flight (a hanging store never piles up probes).
func (h *storeHealth) probe() {
	h.mu.Lock()
	if h.inflight {
		h.mu.Unlock()
		return
	}
	h.inflight = true
	h.mu.Unlock()

	ctx, cancel := context.WithTimeout(context.Background(), h.timeout)
	start := time.Now()
	err := h.st.Check(ctx)
	cancel()
	r := api.StoreHealth{Backend: h.backend, OK: err == nil, LatencyMs: time.Since(start).Milliseconds()}
	raw := ""
	if err != nil {
		raw = err.Error()
		r.Code, r.Error = store.CodeUnavailable, "the store cannot serve writes"
		if time.Since(start) >= h.timeout {
			r.Code, r.Error = api.HealthTimeout, "store probe timed out after "+h.timeout.String()
		}
	}
	h.mu.Lock()
	wasOK, had, prev := h.last.OK, h.have, h.rawErr
	h.last, h.have, h.rawErr, h.inflight = r, true, raw, false
	h.mu.Unlock()
	switch {
	case err != nil && (wasOK || !had || raw != prev):
		h.log.Warn("store health probe failed", "backend", h.backend, "code", r.Code, "error", raw)
	case err == nil && had && !wasOK:
		h.log.Info("store healthy again", "backend", h.backend)
	}
}
