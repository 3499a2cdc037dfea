package api_test

import (
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/kmsgate/kmsgate/internal/apptest"
	"github.com/kmsgate/kmsgate/internal/keyutil"
	"github.com/kmsgate/kmsgate/internal/testenv"
)

// TestHSMFailureOverHTTP takes the HSM away under the API (fault shim over SoftHSM2: the real
// module cannot fail on demand) and checks what a client sees: fast 503s with Retry-After and a
// 503 /health while it is gone, valid signatures again once it is back — with no restart.
func TestHSMFailureOverHTTP(t *testing.T) {
	env := testenv.NewSoftHSM(t, 1)
	shim := testenv.BuildFaultShim(t, env.Library)
	in := apptest.Start(t, apptest.Options{KMSJSON: fmt.Sprintf(`{"defaultProvider":"hsm","providers":[
	  {"id":"hsm","type":"pkcs11","library":%q,"slot":%q,"pin":%q}]}`, shim.Library, env.Tokens[0].Label, env.Tokens[0].PIN)})
	key := in.CreateTenant("acme")
	pub := generate(t, in, key, "hsm-key")
	msg := []byte("payload")
	body := `{"data":"` + base64.StdEncoding.EncodeToString(msg) + `"}`
	sign := func() (*http.Response, []byte) {
		req, _ := http.NewRequest("POST", in.URL+"/keys/hsm-key/sign", strings.NewReader(body))
		req.Header.Set("Authorization", "Bearer "+key)
		req.Header.Set("Content-Type", "application/json")
		resp, err := in.Client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var b strings.Builder
		buf := make([]byte, 512)
		for {
			n, err := resp.Body.Read(buf)
			b.Write(buf[:n])
			if err != nil {
				break
			}
		}
		return resp, []byte(b.String())
	}
	verify(t, pub, msg, signRaw(t, in, key, "/keys/hsm-key/sign", msg))

	shim.Fail(t)
	saw503 := false
	for i := 0; i < 20; i++ {
		t0 := time.Now()
		resp, b := sign()
		if took := time.Since(t0); took > 2*time.Second {
			t.Fatalf("a request hung for %v while the HSM was down", took)
		}
		switch resp.StatusCode {
		case 503:
			var p problemBody
			json.Unmarshal(b, &p)
			if resp.Header.Get("Retry-After") == "" || p.Code != "unavailable" {
				t.Fatalf("503 without Retry-After or with code %q: %s", p.Code, b)
			}
			saw503 = true
		case 200:
			t.Fatalf("signed while the HSM was failing: %s", b)
		default:
			t.Fatalf("unexpected %d while the HSM was down: %s", resp.StatusCode, b)
		}
	}
	if !saw503 {
		t.Fatal("no 503 while the HSM was down")
	}
	time.Sleep(1100 * time.Millisecond) // past the health cache
	if st, b := in.Do("GET", "/health", key, nil); st != 503 || !strings.Contains(string(b), `"ok":false`) {
		t.Fatalf("health while the HSM is down: %d %s", st, b)
	}

	shim.Recover(t)
	deadline := time.Now().Add(15 * time.Second)
	for {
		resp, b := sign()
		if resp.StatusCode == 200 {
			var r struct{ Signature string }
			json.Unmarshal(b, &r)
			raw, _ := base64.RawURLEncoding.DecodeString(r.Signature)
			if !keyutil.VerifyRaw(pub, msg, raw) {
				t.Fatal("wrong signature after recovery")
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the HSM did not recover within 15s: %d %s", resp.StatusCode, b)
		}
		time.Sleep(50 * time.Millisecond)
	}
	time.Sleep(1100 * time.Millisecond)
	if st, b := in.Do("GET", "/health", key, nil); st != 200 {
		t.Fatalf("health after recovery: %d %s", st, b)
	}
}
