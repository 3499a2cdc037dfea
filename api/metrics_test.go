package api_test

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"net"
	"net/http"
	"os/exec"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/kmsgate/kmsgate/internal/apptest"
)

// scrape fetches /metrics over HTTP and fails the test unless it answers 200.
func scrape(t *testing.T, in *apptest.Instance) []byte {
	t.Helper()
	st, body := in.Do("GET", "/metrics", "", nil)
	if st != 200 {
		t.Fatalf("GET /metrics = %d: %.500s", st, body)
	}
	return body
}

// rawRequest sends one request line by hand, so methods net/http would refuse still reach the
// server; the answer is read and discarded.
func rawRequest(t *testing.T, addr, method, path string) {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	fmt.Fprintf(c, "%s %s HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n", method, path)
	_, _ = io.Copy(io.Discard, bufio.NewReader(c))
}

// TestMetricsLabelsStayClosedUnderMixedTraffic is the regression test for labels taken from
// fasthttp's reused request buffer: after mixed-method traffic the exposition held method="GETT"
// and duplicate series, and scrapes failed with 500. Anonymous traffic of every method and odd
// paths must leave /metrics parseable, promtool-clean, and every kmsgate_* label in its closed set.
func TestMetricsLabelsStayClosedUnderMixedTraffic(t *testing.T) {
	promtool, err := exec.LookPath("promtool")
	if err != nil {
		t.Fatal("promtool is required (installed by tools/setup-test-env.sh)")
	}
	in := apptest.Start(t, apptest.Options{})
	key := in.CreateTenant("acme")
	if st, body := in.Do("POST", "/keys", key, map[string]string{"kid": "k1"}); st != 200 {
		t.Fatalf("generate: %d %s", st, body)
	}
	addr := strings.TrimPrefix(in.URL, "http://")
	methods := []string{"GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH"}
	paths := []string{"/health", "/healthz", "/keys/k1", "/keys/k1/sign", "/keys/", "/key-chain", "/key-chain/x/sign",
		"/nope", "/keys/%2e%2e/sign", "/" + strings.Repeat("a", 300), "/keys/k1/sign/extra", "/admin/tenants",
		"/metricsX", "/jwks", "/keys/" + strings.Repeat("z", 200), "/api/key-chain", "/api/key-chain/x/sign",
		"/api/key-chain/" + strings.Repeat("y", 200), "/api/nope"}
	client := &http.Client{Timeout: 10 * time.Second}
	var wg sync.WaitGroup
	errc := make(chan error, 8)
	for w := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range 400 {
				m := methods[(i+w)%len(methods)]
				p := paths[(i*7+w)%len(paths)]
				var body io.Reader
				if m == "POST" || m == "PUT" || m == "PATCH" {
					body = strings.NewReader(`{"data":"aGVsbG8=","alg":"ES256"}`)
				}
				req, err := http.NewRequest(m, in.URL+p, body)
				if err != nil {
					errc <- err
					return
				}
				req.Header.Set("Content-Type", "application/json")
				if i%3 == 0 {
					req.Header.Set("Authorization", "Bearer "+key)
				}
				resp, err := client.Do(req)
				if err != nil {
					errc <- fmt.Errorf("%s %s: %w", m, p, err)
					return
				}
				_, _ = io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
			}
		}()
	}
	wg.Wait()
	close(errc)
	for err := range errc {
		t.Fatal(err)
	}
	// Methods outside the common set, and ones fasthttp may refuse, over raw connections.
	for _, m := range []string{"CONNECT", "TRACE", "PROPFIND", "GETTTTTTTTTTTTTTTTTTTTTT", strings.Repeat("X", 300), "get"} {
		for _, p := range []string{"/health", "/keys/k1", "/nope"} {
			rawRequest(t, addr, m, p)
		}
	}

	scrape(t, in)
	// A second scrape after more traffic: the duplicate-series failure showed up on later scrapes.
	for _, m := range methods {
		rawRequest(t, addr, m, "/healthz")
	}
	body := scrape(t, in)

	parser := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := parser.TextToMetricFamilies(bytes.NewReader(body))
	if err != nil {
		t.Fatalf("exposition does not parse: %v", err)
	}
	cmd := exec.Command(promtool, "check", "metrics")
	cmd.Stdin = bytes.NewReader(body)
	if out, err := cmd.CombinedOutput(); err != nil {
		// promtool exits 3 for lint warnings only; anything else is a broken exposition.
		if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 3 || strings.Contains(string(out), "error") {
			t.Fatalf("promtool check metrics: %v\n%s", err, out)
		}
	}

	routes := map[string]bool{"unmatched": true}
	for _, r := range in.App.App().GetRoutes() {
		routes[r.Path] = true
	}
	closed := map[string]func(string) bool{
		"method": func(v string) bool {
			return map[string]bool{"GET": true, "POST": true, "PUT": true, "DELETE": true, "HEAD": true,
				"OPTIONS": true, "PATCH": true, "OTHER": true}[v]
		},
		"route": func(v string) bool { return routes[v] },
		"code":  regexp.MustCompile(`^([1-5][0-9][0-9]|other)$`).MatchString,
		"provider": func(v string) bool {
			for _, id := range in.App.Registry().IDs() {
				if v == id {
					return true
				}
			}
			return false
		},
		"result": func(v string) bool {
			return map[string]bool{"ok": true, "error": true, "unavailable": true, "throttled": true,
				"bad_input": true, "not_found": true}[v]
		},
		"alg":       func(v string) bool { return v == "ES256" },
		"type":      regexp.MustCompile(`^(db|pkcs11|vault|aws-kms|http)$`).MatchString,
		"op":        regexp.MustCompile(`^[a-z_]{1,32}$`).MatchString,
		"trigger":   regexp.MustCompile(`^[a-z_]{1,32}$`).MatchString,
		"version":   func(v string) bool { return v == "test" },
		"commit":    func(v string) bool { return v == "" },
		"goversion": regexp.MustCompile(`^go[0-9][0-9a-z.\-+ :]*$`).MatchString,
	}
	seen := map[string]bool{}
	for name, fam := range fams {
		if !strings.HasPrefix(name, "kmsgate_") {
			continue
		}
		for _, m := range fam.Metric {
			for _, lp := range m.Label {
				ok := closed[lp.GetName()]
				if ok == nil {
					t.Errorf("%s has label %q with no known closed set", name, lp.GetName())
					continue
				}
				if !ok(lp.GetValue()) {
					t.Errorf("%s{%s=%q}: value outside the closed set", name, lp.GetName(), lp.GetValue())
				}
				if name == "kmsgate_http_requests_total" && lp.GetName() == "method" {
					seen[lp.GetValue()] = true
				}
			}
		}
	}
	for _, m := range append(methods, "OTHER") {
		if !seen[m] {
			t.Errorf("no kmsgate_http_requests_total series for method %s (seen %v)", m, seen)
		}
	}
}
