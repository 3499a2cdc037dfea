package appliance_test

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kmsgate/kmsgate/appliance"
	"github.com/kmsgate/kmsgate/appliance/tenants"
)

// storeServer is an appliance on a given store, served on loopback, with tenant acme, a contract
// key "known" and an access key chain: what the store-fault tests sign with.
type storeServer struct {
	base, key, chainID string
	msg                map[string]string
}

// serveOnStore starts a storeServer on dsn; it stops at test cleanup.
func serveOnStore(t *testing.T, dsn string) *storeServer {
	t.Helper()
	a := openAppliance(t, func(o *appliance.Options) { o.Store = dsn })
	res, err := a.CreateTenant(context.Background(), tenants.CreateTenantRequest{ID: "acme", Name: "Acme",
		Roles: []string{tenants.RoleManage, tenants.RoleSign}})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &storeServer{base: "http://" + ln.Addr().String(), key: res.APIKey,
		msg: map[string]string{"data": base64.StdEncoding.EncodeToString([]byte("m"))}}
	sctx, stopServe := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- a.Serve(sctx, ln) }()
	t.Cleanup(func() { stopServe(); <-served })
	for i := 0; i < 100; i++ {
		if st, _, _ := call(t, "GET", s.base+"/healthz", "", nil); st == 200 {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if st, b, _ := call(t, "POST", s.base+"/keys", s.key, map[string]string{"kid": "known"}); st != 200 {
		t.Fatalf("generate: %d %s", st, b)
	}
	st, cb, _ := call(t, "POST", s.base+"/key-chain", s.key, map[string]any{"usageType": "access", "type": "internalChain"})
	if st != 201 {
		t.Fatalf("create key chain: %d %s", st, cb)
	}
	var chain struct{ ID string }
	if err := json.Unmarshal(cb, &chain); err != nil || chain.ID == "" {
		t.Fatalf("create key chain: %s", cb)
	}
	s.chainID = chain.ID
	return s
}

// signLoad is four clients cycling through contract sign, key-chain sign and key-chain JWS.
type signLoad struct {
	signs, errs atomic.Int64
	firstErr    atomic.Value
	stop        func() // stops the clients and waits for them; safe to call twice
}

// startSignLoad checks each sign path once, then starts the clients. They stop at the latest at
// test cleanup, before the server (cleanups run last-registered first).
func (s *storeServer) startSignLoad(t *testing.T) *signLoad {
	t.Helper()
	reqs := []struct {
		path string
		body any
	}{
		{"/keys/known/sign", s.msg},
		{"/key-chain/" + s.chainID + "/sign", s.msg},
		{"/key-chain/" + s.chainID + "/jws", map[string]any{"payload": map[string]string{"a": "b"}}},
	}
	for _, r := range reqs {
		if st, b, _ := call(t, "POST", s.base+r.path, s.key, r.body); st != 200 {
			t.Fatalf("%s before the fault: %d %s", r.path, st, b)
		}
	}
	l := &signLoad{}
	done := make(chan struct{})
	var wg sync.WaitGroup
	l.stop = sync.OnceFunc(func() { close(done); wg.Wait() })
	t.Cleanup(l.stop)
	for w := 0; w < 4; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-done:
					return
				default:
				}
				r := reqs[l.signs.Add(1)%int64(len(reqs))]
				if st, b, _ := call(t, "POST", s.base+r.path, s.key, r.body); st != 200 {
					l.errs.Add(1)
					l.firstErr.CompareAndSwap(nil, r.path+": "+string(b))
				}
			}
		}()
	}
	return l
}
