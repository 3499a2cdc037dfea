package awskms

import "github.com/prometheus/client_golang/prometheus"

// throttledDesc is immutable; the count itself lives in each Provider, so nothing is global.
var throttledDesc = prometheus.NewDesc("kmsgate_awskms_throttled_total",
	"Backend calls the backend throttled; each was answered 503 with Retry-After.",
	[]string{"provider", "type"}, nil)

// Describe and Collect make the provider a prometheus.Collector, so the appliance can register it
// and export the throttling count without the provider touching a global registry.
func (p *Provider) Describe(ch chan<- *prometheus.Desc) { ch <- throttledDesc }

func (p *Provider) Collect(ch chan<- prometheus.Metric) {
	ch <- prometheus.MustNewConstMetric(throttledDesc, prometheus.CounterValue, float64(p.ThrottledCount()),
		p.ID(), "aws-kms")
}
