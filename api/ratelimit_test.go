package api_test

import (
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kmsgate/kmsgate/appliance"
	"github.com/kmsgate/kmsgate/internal/apptest"
)

func post(t *testing.T, in *apptest.Instance, path, key, body string) (*http.Response, []byte) {
	t.Helper()
	req, _ := http.NewRequest("POST", in.URL+path, strings.NewReader(body))
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Authorization", "Bearer "+key)
	resp, err := in.Client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp, b
}

// TestCreationIsRateLimitedPerCredential: with the default limits one API key creating keys in a
// burst is refused with 429 rate_limited and a Retry-After once past the burst, while another
// tenant's key is unaffected.
func TestCreationIsRateLimitedPerCredential(t *testing.T) {
	in := apptest.Start(t, apptest.Options{})
	key := in.CreateTenant("acme")
	other := in.CreateTenant("other")
	created, limited := 0, 0
	for i := range 80 {
		resp, body := post(t, in, "/keys", key, fmt.Sprintf(`{"kid":"k%d"}`, i))
		switch resp.StatusCode {
		case 200:
			created++
		case 429:
			limited++
			var p problemBody
			apptest.JSON(t, body, &p)
			ra, err := strconv.Atoi(resp.Header.Get("Retry-After"))
			if p.Code != "rate_limited" || err != nil || ra < 1 {
				t.Fatalf("429 with code %q and Retry-After %q", p.Code, resp.Header.Get("Retry-After"))
			}
		default:
			t.Fatalf("create %d: %d %s", i, resp.StatusCode, body)
		}
	}
	if created < appliance.DefaultCreateBurst || limited == 0 {
		t.Fatalf("80 creations in a burst: %d created, %d limited; want >= %d created and some limited",
			created, limited, appliance.DefaultCreateBurst)
	}
	if resp, body := post(t, in, "/keys", other, `{"kid":"k0"}`); resp.StatusCode != 200 {
		t.Fatalf("another tenant's key is limited too: %d %s", resp.StatusCode, body)
	}
}

// signMany sends n sign requests from 8 workers and returns the count per status.
func signMany(t *testing.T, in *apptest.Instance, key string, n int) map[int]int {
	t.Helper()
	var mu sync.Mutex
	counts := map[int]int{}
	var next atomic.Int64
	var wg sync.WaitGroup
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for next.Add(1) <= int64(n) {
				req, _ := http.NewRequest("POST", in.URL+"/keys/k/sign", strings.NewReader(`{"data":"aGVsbG8","alg":"ES256"}`))
				req.Header.Set("Content-Type", "application/json")
				req.Header.Set("Authorization", "Bearer "+key)
				resp, err := in.Client.Do(req)
				if err != nil {
					t.Error(err)
					return
				}
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				mu.Lock()
				counts[resp.StatusCode]++
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	return counts
}

// TestSigningIsNotRateLimitedByDefault: 2,000 fast signatures with one key never meet a 429;
// with --sign-rate set they do.
func TestSigningIsNotRateLimitedByDefault(t *testing.T) {
	in := apptest.Start(t, apptest.Options{})
	key := in.CreateTenant("acme")
	if st, body := in.Do("POST", "/keys", key, map[string]string{"kid": "k"}); st != 200 {
		t.Fatalf("generate: %d %s", st, body)
	}
	start := time.Now()
	if c := signMany(t, in, key, 2000); c[200] != 2000 {
		t.Fatalf("2000 signatures with default limits: %v", c)
	}
	t.Logf("2000 signatures in %v", time.Since(start))

	limited := apptest.Start(t, apptest.Options{Tweak: func(o *appliance.Options) { o.SignRate, o.SignBurst = 5, 5 }})
	key = limited.CreateTenant("acme")
	if st, body := limited.Do("POST", "/keys", key, map[string]string{"kid": "k"}); st != 200 {
		t.Fatalf("generate: %d %s", st, body)
	}
	if c := signMany(t, limited, key, 100); c[429] == 0 || c[200] < 5 || c[200]+c[429] != 100 {
		t.Fatalf("100 signatures with --sign-rate 5: %v", c)
	}
}
