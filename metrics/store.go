package metrics

import "github.com/prometheus/client_golang/prometheus"

// RegisterStoreQueries exposes kmsgate_store_queries_total{op} for each op of a closed set, read
// from the store's own counters at scrape time (the store counts with plain atomics and does not
// depend on this package).
func (m *Metrics) RegisterStoreQueries(ops []string, read func(op string) uint64) {
	for _, op := range ops {
		m.Registry.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: "kmsgate_store_queries_total", Help: "Store operations (PostgreSQL round trips) by kind.",
			ConstLabels: prometheus.Labels{"op": op}}, func() float64 { return float64(read(op)) }))
	}
}
