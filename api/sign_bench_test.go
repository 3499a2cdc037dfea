package api_test

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"net"
	"testing"

	"github.com/valyala/fasthttp"
	"github.com/valyala/fasthttp/fasthttputil"

	"github.com/kmsgate/kmsgate/internal/apptest"
)

// BenchmarkSignRequest measures one POST /keys/{kid}/sign through the whole server stack (Fiber,
// auth, strict decode, key lookup, db provider, metrics, response) over an in-memory connection,
// so allocs/op is the server's plus a small fixed client share.
func BenchmarkSignRequest(b *testing.B) {
	in := apptest.Start(b, apptest.Options{})
	key := in.CreateTenant("bench")
	if st, body := in.Do("POST", "/keys", key, map[string]string{"kid": "k"}); st != 200 {
		b.Fatalf("generate: %d %s", st, body)
	}
	ln := fasthttputil.NewInmemoryListener()
	go in.App.App().Listener(ln) // closed with the app when the instance stops
	c := &fasthttp.HostClient{Addr: "mem", Dial: func(string) (net.Conn, error) { return ln.Dial() }}
	req, resp := fasthttp.AcquireRequest(), fasthttp.AcquireResponse()
	req.SetRequestURI("http://mem/keys/k/sign")
	req.Header.SetMethod("POST")
	req.Header.SetContentType("application/json")
	req.Header.Set("Authorization", "Bearer "+key)
	req.SetBody([]byte(`{"data":"` + base64.StdEncoding.EncodeToString([]byte("eyJhbGciOiJFUzI1NiJ9.eyJpc3MiOiJ4In0")) + `","alg":"ES256"}`))
	b.ReportAllocs()
	b.ResetTimer()
	for b.Loop() {
		if err := c.Do(req, resp); err != nil || resp.StatusCode() != 200 {
			b.Fatalf("%v %d %s", err, resp.StatusCode(), resp.Body())
		}
	}
}

// BenchmarkECDSAReference is the in-process signature alone, the floor of BenchmarkSignRequest.
func BenchmarkECDSAReference(b *testing.B) {
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	d := sha256.Sum256([]byte("eyJhbGciOiJFUzI1NiJ9.eyJpc3MiOiJ4In0"))
	b.ReportAllocs()
	for b.Loop() {
		if _, err := ecdsa.SignASN1(rand.Reader, k, d[:]); err != nil {
			b.Fatal(err)
		}
	}
}
