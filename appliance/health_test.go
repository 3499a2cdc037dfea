package appliance_test

import (
	"bytes"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kmsgate/kmsgate/appliance"
	"github.com/kmsgate/kmsgate/internal/apptest"
)

// TestAnonymousHealthIsNotAmplified: 50 anonymous clients hammering /health must not multiply the
// probes a real remote KMS receives; only the background monitor probes (it used to be one probe
// per client each time the 1 s cache expired).
func TestAnonymousHealthIsNotAmplified(t *testing.T) {
	var probes atomic.Int64
	mux := http.NewServeMux()
	mux.HandleFunc("GET /health", func(w http.ResponseWriter, r *http.Request) {
		probes.Add(1)
		time.Sleep(20 * time.Millisecond) // a realistic round trip, so concurrent callers overlap
		w.Write([]byte(`{"ok":true}`))
	})
	remote := httptest.NewServer(mux)
	t.Cleanup(remote.Close)
	const interval = 500 * time.Millisecond
	in := apptest.Start(t, apptest.Options{
		KMSJSON: fmt.Sprintf(`{"defaultProvider":"remote","providers":[{"id":"remote","type":"http","baseUrl":%q}]}`, remote.URL),
		Tweak:   func(o *appliance.Options) { o.HealthInterval = interval }})
	const providers = 1
	start := time.Now()
	before := probes.Load()
	var wg sync.WaitGroup
	var answers, bad atomic.Int64
	client := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: 64}}
	for range 50 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for time.Since(start) < 2*time.Second {
				resp, err := client.Get(in.URL + "/health")
				if err != nil {
					bad.Add(1)
					return
				}
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if resp.StatusCode != 200 {
					bad.Add(1)
				}
				answers.Add(1)
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	got := probes.Load() - before
	limit := int64(elapsed/interval) + providers
	if bad.Load() != 0 {
		t.Fatalf("%d failed /health answers", bad.Load())
	}
	if answers.Load() < 100 {
		t.Fatalf("only %d /health answers; the load did not happen", answers.Load())
	}
	if got > limit {
		t.Fatalf("%d anonymous /health answers caused %d backend probes in %v; want <= %d", answers.Load(), got,
			elapsed, limit)
	}
	t.Logf("%d answers, %d probes in %v", answers.Load(), got, elapsed)
}

// syncBuffer is a log sink safe for concurrent writers.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// TestHealthHidesBackendDetails: a remote KMS that cannot be reached yields network errors that
// name its address. Neither anonymous callers nor tenants may see them (on /health or
// /key-chain/providers/health): they get a stable code, and the details go to the log.
func TestHealthHidesBackendDetails(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close() // nothing listens there: connection refused
	var logs syncBuffer
	in := apptest.Start(t, apptest.Options{
		KMSJSON: fmt.Sprintf(`{"defaultProvider":"db","providers":[{"id":"db","type":"db"},{"id":"remote","type":"http","baseUrl":"http://%s/kms-secret-path"}]}`, addr),
		Tweak: func(o *appliance.Options) {
			o.Logger = slog.New(slog.NewJSONHandler(&logs, &slog.HandlerOptions{Level: slog.LevelWarn}))
		}})
	key := in.CreateTenant("acme")
	_, port, _ := net.SplitHostPort(addr)
	leaks := []string{addr, port, "kms-secret-path", "refused", "dial", "tcp"}
	check := func(what string, wantStatus int, body []byte, st int) {
		t.Helper()
		if st != wantStatus {
			t.Fatalf("%s = %d, want %d: %s", what, st, wantStatus, body)
		}
		for _, l := range leaks {
			if strings.Contains(string(body), l) {
				t.Fatalf("%s leaks backend detail %q: %s", what, l, body)
			}
		}
	}
	st, body := in.Do("GET", "/health", "", nil)
	check("anonymous /health", 503, body, st)
	// The tenant's default provider (db) is up, so its /health is 200; the remote is still listed.
	st, body = in.Do("GET", "/health", key, nil)
	check("tenant /health", 200, body, st)
	if !strings.Contains(string(body), `"code":"backend_unhealthy"`) {
		t.Fatalf("tenant /health has no stable code: %s", body)
	}
	st, body = in.Do("GET", "/key-chain/providers/health", key, nil)
	check("/key-chain/providers/health", 200, body, st)
	if !strings.Contains(string(body), `"code":"backend_unhealthy"`) {
		t.Fatalf("providers/health has no stable code: %s", body)
	}
	if l := logs.String(); !strings.Contains(l, "provider health probe failed") || !strings.Contains(l, port) {
		t.Fatalf("the log does not carry the backend's error: %s", l)
	}
}
