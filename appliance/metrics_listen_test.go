package appliance_test

import (
	"context"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/kmsgate/kmsgate/appliance"
	"github.com/kmsgate/kmsgate/internal/apptest"
)

func httpGet(t *testing.T, url string) (int, string) {
	t.Helper()
	resp, err := (&http.Client{Timeout: 10 * time.Second}).Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// TestMetricsListen: without --metrics-listen /metrics stays on the main listener; with it,
// /metrics is served only on its own address and the main listener answers 404.
func TestMetricsListen(t *testing.T) {
	t.Run("default", func(t *testing.T) {
		in := apptest.Start(t, apptest.Options{})
		if st, body := httpGet(t, in.URL+"/metrics"); st != 200 || !strings.Contains(body, "kmsgate_build_info") {
			t.Fatalf("main /metrics = %d %.200s", st, body)
		}
		if in.App.MetricsAddr() != "" {
			t.Fatalf("a metrics listener was opened without --metrics-listen: %s", in.App.MetricsAddr())
		}
	})
	t.Run("separate", func(t *testing.T) {
		in := apptest.Start(t, apptest.Options{Tweak: func(o *appliance.Options) { o.MetricsListen = "127.0.0.1:0" }})
		if st, body := httpGet(t, in.URL+"/metrics"); st != 404 || !strings.Contains(body, `"route_not_found"`) {
			t.Fatalf("main /metrics with --metrics-listen = %d %.200s", st, body)
		}
		var addr string
		for deadline := time.Now().Add(10 * time.Second); addr == ""; time.Sleep(10 * time.Millisecond) {
			if addr = in.App.MetricsAddr(); addr == "" && time.Now().After(deadline) {
				t.Fatal("the metrics listener did not open")
			}
		}
		if st, body := httpGet(t, "http://"+addr+"/metrics"); st != 200 || !strings.Contains(body, "kmsgate_build_info") {
			t.Fatalf("metrics listener /metrics = %d %.200s", st, body)
		}
		if st, _ := httpGet(t, "http://"+addr+"/health"); st != 404 {
			t.Fatalf("the metrics listener serves /health: %d", st)
		}
	})
}

// TestServeReleasesPortWhenMetricsListenFails: an unusable --metrics-listen address fails the start
// and frees the main port.
func TestServeReleasesPortWhenMetricsListenFails(t *testing.T) {
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	a := openAppliance(t, func(o *appliance.Options) { o.MetricsListen = busy.Addr().String() })
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	if err := a.Serve(context.Background(), ln); err == nil || !strings.Contains(err.Error(), "metrics listener") {
		t.Fatalf("Serve = %v, want a metrics listener error", err)
	}
	again, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatalf("port %s still bound after the failed start: %v", addr, err)
	}
	again.Close()
}
