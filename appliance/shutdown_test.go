package appliance_test

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kmsgate/kmsgate/internal/apptest"
	"github.com/kmsgate/kmsgate/internal/keyutil"
)

// slowKMS is a remote KMS that follows the contract literally but takes 400 ms per signature, so a
// request is certainly in flight when the appliance is asked to stop.
func slowKMS(t *testing.T) (*httptest.Server, *sync.Map) {
	keys := &sync.Map{}
	mux := http.NewServeMux()
	mux.HandleFunc("POST /keys", func(w http.ResponseWriter, r *http.Request) {
		var req struct{ Kid, Alg string }
		json.NewDecoder(r.Body).Decode(&req)
		k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		keys.Store(req.Kid, k)
		jwk, _ := keyutil.PublicJWK(&k.PublicKey, req.Kid, "ES256")
		json.NewEncoder(w).Encode(map[string]any{"publicJwk": jwk})
	})
	mux.HandleFunc("POST /keys/{kid}/sign", func(w http.ResponseWriter, r *http.Request) {
		v, ok := keys.Load(r.PathValue("kid"))
		if !ok {
			w.WriteHeader(404)
			return
		}
		var req struct{ Data string }
		json.NewDecoder(r.Body).Decode(&req)
		msg, _ := base64.StdEncoding.DecodeString(req.Data)
		time.Sleep(400 * time.Millisecond)
		d := sha256.Sum256(msg)
		der, _ := ecdsa.SignASN1(rand.Reader, v.(*ecdsa.PrivateKey), d[:])
		raw, _ := keyutil.DERToRaw(der, 32)
		json.NewEncoder(w).Encode(map[string]string{"signature": base64.RawURLEncoding.EncodeToString(raw)})
	})
	mux.HandleFunc("GET /health", func(w http.ResponseWriter, r *http.Request) { w.Write([]byte(`{"ok":true}`)) })
	srv := httptest.NewServer(mux)
	t.Cleanup(srv.Close)
	return srv, keys
}

func TestShutdownDrainsInFlightRequests(t *testing.T) {
	remote, _ := slowKMS(t)
	in := apptest.Start(t, apptest.Options{KMSJSON: fmt.Sprintf(`{"defaultProvider":"slow","providers":[
	  {"id":"slow","type":"http","baseUrl":%q}]}`, remote.URL)})
	key := in.CreateTenant("acme")
	st, body := in.Do("POST", "/keys", key, map[string]string{"kid": "slow-key"})
	if st != 200 {
		t.Fatalf("generate: %d %s", st, body)
	}
	var g struct{ PublicJWK keyutil.JWK }
	json.Unmarshal(body, &g)
	pub, err := keyutil.ParsePublicJWK(g.PublicJWK)
	if err != nil {
		t.Fatal(err)
	}

	const n = 8
	var wg sync.WaitGroup
	results := make(chan string, n)
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			msg := []byte(fmt.Sprintf("in flight %d", i))
			req, _ := http.NewRequest("POST", in.URL+"/keys/slow-key/sign",
				strings.NewReader(`{"data":"`+base64.StdEncoding.EncodeToString(msg)+`"}`))
			req.Header.Set("Authorization", "Bearer "+key)
			req.Header.Set("Content-Type", "application/json")
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				results <- "transport error: " + err.Error()
				return
			}
			defer resp.Body.Close()
			var r struct{ Signature string }
			json.NewDecoder(resp.Body).Decode(&r)
			raw, _ := base64.RawURLEncoding.DecodeString(r.Signature)
			if resp.StatusCode != 200 || !keyutil.VerifyRaw(pub, msg, raw) {
				results <- fmt.Sprintf("status %d / invalid signature", resp.StatusCode)
				return
			}
			results <- "ok"
		}()
	}
	time.Sleep(150 * time.Millisecond) // every request is now waiting on the slow backend
	stopped := make(chan time.Duration)
	go func() {
		t0 := time.Now()
		in.Stop()
		stopped <- time.Since(t0)
	}()
	wg.Wait()
	close(results)
	for r := range results {
		if r != "ok" {
			t.Errorf("an in-flight request was not drained: %s", r)
		}
	}
	took := <-stopped
	if took < 150*time.Millisecond {
		t.Errorf("shutdown returned after %v, before the in-flight requests could finish", took)
	}
	if _, err := http.Get(in.URL + "/healthz"); err == nil {
		t.Error("the listener still accepts connections after shutdown")
	}
}
