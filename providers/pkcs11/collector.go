package pkcs11

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/kmsgate/kmsgate/hsm"
)

// Collector exports the session-pool and error counters of every pkcs11 provider. It
// reads hsm.Stats snapshots only, so a scrape never makes a PKCS#11 call and never waits on a
// busy or failing token.
type Collector struct {
	stats func() map[string]hsm.Stats

	sessions, waits, waitSeconds, exhausted, opened, logins, searches, rebuilds, up, errors *prometheus.Desc
}

// NewCollector builds the collector. stats returns a snapshot per provider id; its keys
// are the configured pkcs11 provider ids (a closed set), so the provider label stays bounded.
func NewCollector(stats func() map[string]hsm.Stats) *Collector {
	d := func(name, help string, labels ...string) *prometheus.Desc {
		return prometheus.NewDesc("kmsgate_pkcs11_"+name, help, append([]string{"provider"}, labels...), nil)
	}
	return &Collector{stats: stats,
		sessions:    d("pool_sessions", "PKCS#11 pool sessions by state (capacity, in_use, idle).", "state"),
		waits:       d("session_waits_total", "Session checkouts that had to wait for a free session."),
		waitSeconds: d("session_wait_seconds_total", "Total time spent waiting for a free session."),
		exhausted:   d("pool_exhausted_total", "Requests refused because no session became free in time."),
		opened:      d("sessions_opened_total", "C_OpenSession calls that succeeded."),
		logins:      d("logins_total", "C_Login calls."),
		searches:    d("object_searches_total", "C_FindObjectsInit calls (0 per signature in steady state)."),
		rebuilds:    d("slot_rebuilds_total", "Times the slot was rebuilt after a fatal token error."),
		up:          d("slot_up", "1 when the slot serves requests, 0 while it is down or rebuilding."),
		errors:      d("errors_total", "Failed PKCS#11 calls by return code (closed set; unknown codes are \"other\").", "ckr"),
	}
}

// Describe implements prometheus.Collector.
func (c *Collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.sessions, c.waits, c.waitSeconds, c.exhausted, c.opened, c.logins,
		c.searches, c.rebuilds, c.up, c.errors} {
		ch <- d
	}
}

// Collect implements prometheus.Collector.
func (c *Collector) Collect(ch chan<- prometheus.Metric) {
	names := hsm.CKRNames()
	for id, s := range c.stats() {
		g := func(d *prometheus.Desc, v float64, l ...string) {
			ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, append([]string{id}, l...)...)
		}
		ctr := func(d *prometheus.Desc, v float64, l ...string) {
			ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, v, append([]string{id}, l...)...)
		}
		g(c.sessions, float64(s.Capacity), "capacity")
		g(c.sessions, float64(s.InUse), "in_use")
		g(c.sessions, float64(s.Idle), "idle")
		ctr(c.waits, float64(s.Waits))
		ctr(c.waitSeconds, s.WaitSeconds)
		ctr(c.exhausted, float64(s.Exhausted))
		ctr(c.opened, float64(s.SessionsOpened))
		ctr(c.logins, float64(s.Logins))
		ctr(c.searches, float64(s.ObjectSearches))
		ctr(c.rebuilds, float64(s.Rebuilds))
		up := 0.0
		if s.Up {
			up = 1
		}
		g(c.up, up)
		for _, n := range names {
			ctr(c.errors, float64(s.Errors[n]), n)
		}
	}
}
