// Package metrics owns kmsgate's Prometheus registry and collectors. Every label value comes from a
// closed set (provider ids from kms.json, route templates, fixed result names): never a kid, tenant
// input or raw path, so a caller cannot grow the series count.
package metrics

import (
	"net/http"
	"runtime"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Sign results (closed set).
const (
	ResultOK          = "ok"
	ResultError       = "error"
	ResultUnavailable = "unavailable"
	ResultThrottled   = "throttled"
	ResultBadInput    = "bad_input"
	ResultNotFound    = "not_found"
)

// Metrics is the set of collectors one appliance exposes.
type Metrics struct {
	Registry *prometheus.Registry

	SignDuration   *prometheus.HistogramVec
	HTTPRequests   *prometheus.CounterVec
	HTTPDuration   *prometheus.HistogramVec
	ProviderUp     *prometheus.GaugeVec
	ProviderProbe  *prometheus.GaugeVec
	Throttled      *prometheus.CounterVec
	KeyOps         *prometheus.CounterVec
	RotationsTotal *prometheus.CounterVec
}

// SignBuckets run from 100 µs to 10 s: an in-process signature is ~50 µs, a SoftHSM one ~60 µs, a
// network HSM or cloud KMS tens of ms, and a stuck backend hits the upper buckets.
var SignBuckets = []float64{0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
	0.25, 0.5, 1, 2.5, 5, 10}

// New creates the registry with process, Go and build-info collectors.
func New(version, commit string) *Metrics {
	r := prometheus.NewRegistry()
	m := &Metrics{
		Registry: r,
		SignDuration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "kmsgate_sign_duration_seconds", Help: "Time to produce one signature in the provider, by result.",
			Buckets: SignBuckets}, []string{"provider", "alg", "result"}),
		HTTPRequests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "kmsgate_http_requests_total", Help: "HTTP requests by route template, method and status code."},
			[]string{"route", "method", "code"}),
		HTTPDuration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "kmsgate_http_request_duration_seconds", Help: "HTTP request latency by route template.",
			Buckets: SignBuckets}, []string{"route", "method"}),
		ProviderUp: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "kmsgate_provider_up", Help: "1 when the provider's last health probe succeeded."},
			[]string{"provider", "type"}),
		ProviderProbe: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "kmsgate_provider_health_latency_seconds", Help: "Latency of the provider's last health probe."},
			[]string{"provider", "type"}),
		Throttled: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "kmsgate_provider_throttled_total", Help: "Requests a provider rejected as throttled or over quota."},
			[]string{"provider"}),
		KeyOps: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "kmsgate_key_operations_total", Help: "Key lifecycle operations by provider, operation and result."},
			[]string{"provider", "op", "result"}),
		RotationsTotal: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "kmsgate_keychain_rotations_total", Help: "Key-chain rotations by trigger and result."},
			[]string{"trigger", "result"}),
	}
	build := prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "kmsgate_build_info",
		Help: "Build information; the value is always 1."}, []string{"version", "commit", "goversion"})
	build.WithLabelValues(version, commit, runtime.Version()).Set(1)
	r.MustRegister(m.SignDuration, m.HTTPRequests, m.HTTPDuration, m.ProviderUp, m.ProviderProbe, m.Throttled,
		m.KeyOps, m.RotationsTotal, build,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// Handler serves the exposition format.
func (m *Metrics) Handler() http.Handler {
	return promhttp.HandlerFor(m.Registry, promhttp.HandlerOpts{Registry: m.Registry})
}

// ProviderRecorder holds one provider's pre-resolved collectors, so that the sign hot path does
// no label hashing or allocation. It satisfies the provider decorator's observer interface.
type ProviderRecorder struct {
	m         *Metrics
	provider  string
	ok, fail  prometheus.Observer
	throttled prometheus.Counter
}

// ProviderRecorder returns the recorder for provider.
func (m *Metrics) ProviderRecorder(provider string) *ProviderRecorder {
	return &ProviderRecorder{m: m, provider: provider,
		ok:        m.SignDuration.WithLabelValues(provider, "ES256", ResultOK),
		fail:      m.SignDuration.WithLabelValues(provider, "ES256", ResultError),
		throttled: m.Throttled.WithLabelValues(provider)}
}

// ObserveSign records one signature.
func (r *ProviderRecorder) ObserveSign(alg, result string, d time.Duration) {
	if alg == "ES256" {
		switch result {
		case ResultOK:
			r.ok.Observe(d.Seconds())
			return
		case ResultError:
			r.fail.Observe(d.Seconds())
			return
		}
	}
	r.m.SignDuration.WithLabelValues(r.provider, alg, result).Observe(d.Seconds())
}

// Throttled counts one throttled call.
func (r *ProviderRecorder) Throttled() { r.throttled.Inc() }

// KeyOp counts one key lifecycle operation.
func (r *ProviderRecorder) KeyOp(op, result string) {
	r.m.KeyOps.WithLabelValues(r.provider, op, result).Inc()
}

// HTTPMethod folds a request method into a closed set. It returns string constants, never m:
// the caller's string may point into a reused request buffer, and a label value is kept for the
// life of the process.
func HTTPMethod(m string) string {
	switch m {
	case "GET":
		return "GET"
	case "POST":
		return "POST"
	case "PUT":
		return "PUT"
	case "DELETE":
		return "DELETE"
	case "HEAD":
		return "HEAD"
	case "PATCH":
		return "PATCH"
	case "OPTIONS":
		return "OPTIONS"
	}
	return "OTHER"
}

// StatusCode renders a status code label; codes are three digits by construction.
func StatusCode(c int) string {
	if c < 100 || c > 599 {
		return "other"
	}
	return strconv.Itoa(c)
}
