package pkcs11

import (
	"context"
	"fmt"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/prometheus/client_golang/prometheus/testutil/promlint"

	"github.com/kmsgate/kmsgate/hsm"
	"github.com/kmsgate/kmsgate/internal/testenv"
	"github.com/kmsgate/kmsgate/providers"
)

// TestMetricsCollector scrapes the pkcs11 collector for a healthy and a broken provider, lints
// the exposition and checks the values come from the stats snapshot.
func TestMetricsCollector(t *testing.T) {
	env := testenv.NewSoftHSM(t, 2)
	good := newProvider(t, cfgFor(t, "hsm", map[string]any{"library": env.Library, "slot": env.Tokens[0].Label, "pin": env.Tokens[0].PIN, "poolSize": 3}))
	bad := newProvider(t, cfgFor(t, "broken", map[string]any{"library": env.Library, "slot": env.Tokens[1].Label, "pin": "wrong-pin"}))
	ref, err := good.Generate(context.Background(), providers.KeySpec{KID: "m"})
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 10; i++ {
		if _, err := good.SignMessage(context.Background(), ref, "ES256", []byte("x")); err != nil {
			t.Fatal(err)
		}
	}
	c := NewCollector(func() map[string]hsm.Stats {
		return map[string]hsm.Stats{"hsm": good.Stats(), "broken": bad.Stats()}
	})
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(c)
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	problems, err := promlint.NewWithMetricFamilies(mfs).Lint()
	if err != nil || len(problems) != 0 {
		t.Fatalf("lint: %v %v", err, problems)
	}
	rec := httptest.NewRecorder()
	promhttp.HandlerFor(reg, promhttp.HandlerOpts{}).ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	exposition := rec.Body.String()
	contains := func(text string) {
		t.Helper()
		for _, line := range strings.Split(strings.TrimSpace(text), "\n") {
			if !strings.Contains(exposition, line+"\n") {
				t.Errorf("exposition lacks %q", line)
			}
		}
	}
	want := `
# HELP kmsgate_pkcs11_pool_sessions PKCS#11 pool sessions by state (capacity, in_use, idle).
# TYPE kmsgate_pkcs11_pool_sessions gauge
kmsgate_pkcs11_pool_sessions{provider="broken",state="capacity"} 0
kmsgate_pkcs11_pool_sessions{provider="broken",state="idle"} 0
kmsgate_pkcs11_pool_sessions{provider="broken",state="in_use"} 0
kmsgate_pkcs11_pool_sessions{provider="hsm",state="capacity"} 3
kmsgate_pkcs11_pool_sessions{provider="hsm",state="idle"} 3
kmsgate_pkcs11_pool_sessions{provider="hsm",state="in_use"} 0
# HELP kmsgate_pkcs11_slot_up 1 when the slot serves requests, 0 while it is down or rebuilding.
# TYPE kmsgate_pkcs11_slot_up gauge
kmsgate_pkcs11_slot_up{provider="broken"} 0
kmsgate_pkcs11_slot_up{provider="hsm"} 1
# HELP kmsgate_pkcs11_sessions_opened_total C_OpenSession calls that succeeded.
# TYPE kmsgate_pkcs11_sessions_opened_total counter
kmsgate_pkcs11_sessions_opened_total{provider="broken"} 1
kmsgate_pkcs11_sessions_opened_total{provider="hsm"} 3
# HELP kmsgate_pkcs11_logins_total C_Login calls.
# TYPE kmsgate_pkcs11_logins_total counter
kmsgate_pkcs11_logins_total{provider="broken"} 1
kmsgate_pkcs11_logins_total{provider="hsm"} 1
# HELP kmsgate_pkcs11_object_searches_total C_FindObjectsInit calls (0 per signature in steady state).
# TYPE kmsgate_pkcs11_object_searches_total counter
kmsgate_pkcs11_object_searches_total{provider="broken"} 0
kmsgate_pkcs11_object_searches_total{provider="hsm"} 0
`
	contains(want)
	if n := strings.Count(exposition, "\nkmsgate_pkcs11_errors_total{"); n != 2*len(hsm.CKRNames()) {
		t.Fatalf("errors_total series = %d; want a closed set of %d per provider", n, len(hsm.CKRNames()))
	}
	var b strings.Builder
	b.WriteString("# HELP kmsgate_pkcs11_errors_total Failed PKCS#11 calls by return code (closed set; unknown codes are \"other\").\n# TYPE kmsgate_pkcs11_errors_total counter\n")
	for _, prov := range []string{"broken", "hsm"} {
		for _, n := range hsm.CKRNames() {
			v := 0
			if prov == "broken" && n == "CKR_PIN_INCORRECT" {
				v = 1
			}
			fmt.Fprintf(&b, "kmsgate_pkcs11_errors_total{ckr=%q,provider=%q} %d\n", n, prov, v)
		}
	}
	contains(b.String())
}
