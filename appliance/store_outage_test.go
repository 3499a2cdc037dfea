package appliance_test

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kmsgate/kmsgate/appliance"
	"github.com/kmsgate/kmsgate/appliance/tenants"
	"github.com/kmsgate/kmsgate/internal/apptest"
	"github.com/kmsgate/kmsgate/internal/testenv"
)

func call(t *testing.T, method, url, key string, body any) (int, []byte, http.Header) {
	t.Helper()
	var r io.Reader
	if body != nil {
		b, _ := json.Marshal(body)
		r = bytes.NewReader(b)
	}
	req, _ := http.NewRequest(method, url, r)
	if key != "" {
		req.Header.Set("Authorization", "Bearer "+key)
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	out, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, out, resp.Header
}

// TestSigningSurvivesPostgresOutage stops PostgreSQL under a sign loop on the contract face and
// the key-chain face (sign and JWS): signing with a known key never fails, a write answers 503 store_unavailable, /health reports the
// store down, and once PostgreSQL is back writes succeed without restarting kmsgate.
func TestSigningSurvivesPostgresOutage(t *testing.T) {
	if testing.Short() {
		t.Skip("needs PostgreSQL")
	}
	pg := testenv.StartPostgres(t)
	dsn := pg.NewDatabase(t)
	a := openAppliance(t, func(o *appliance.Options) { o.Store = dsn })
	ctx := context.Background()
	res, err := a.CreateTenant(ctx, tenants.CreateTenantRequest{ID: "acme", Name: "Acme",
		Roles: []string{tenants.RoleManage, tenants.RoleSign}})
	if err != nil {
		t.Fatal(err)
	}
	key := res.APIKey
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	base := "http://" + ln.Addr().String()
	sctx, stopServe := context.WithCancel(ctx)
	served := make(chan error, 1)
	go func() { served <- a.Serve(sctx, ln) }()
	defer func() { stopServe(); <-served }()
	for i := 0; i < 100; i++ {
		if st, _, _ := call(t, "GET", base+"/healthz", "", nil); st == 200 {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if st, b, _ := call(t, "POST", base+"/keys", key, map[string]string{"kid": "known"}); st != 200 {
		t.Fatalf("generate: %d %s", st, b)
	}
	msg := map[string]string{"data": base64.StdEncoding.EncodeToString([]byte("m"))}
	if st, b, _ := call(t, "POST", base+"/keys/known/sign", key, msg); st != 200 {
		t.Fatalf("sign: %d %s", st, b)
	}

	st, cb, _ := call(t, "POST", base+"/key-chain", key, map[string]any{"usageType": "access", "type": "internalChain"})
	if st != 201 {
		t.Fatalf("create key chain: %d %s", st, cb)
	}
	var chain struct{ ID string }
	if err := json.Unmarshal(cb, &chain); err != nil || chain.ID == "" {
		t.Fatalf("create key chain: %s", cb)
	}
	// One request of each kind per worker turn: contract sign, key-chain sign, key-chain JWS.
	reqs := []struct {
		path string
		body any
	}{
		{"/keys/known/sign", msg},
		{"/key-chain/" + chain.ID + "/sign", msg},
		{"/key-chain/" + chain.ID + "/jws", map[string]any{"payload": map[string]string{"a": "b"}}},
	}
	for _, r := range reqs {
		if st, b, _ := call(t, "POST", base+r.path, key, r.body); st != 200 {
			t.Fatalf("%s before the outage: %d %s", r.path, st, b)
		}
	}

	var signs, signErrs atomic.Int64
	var firstErr atomic.Value
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for w := 0; w < 4; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				r := reqs[signs.Add(1)%int64(len(reqs))]
				if st, b, _ := call(t, "POST", base+r.path, key, r.body); st != 200 {
					signErrs.Add(1)
					firstErr.CompareAndSwap(nil, r.path+": "+string(b))
				}
			}
		}()
	}

	pg.Stop(t)
	st, b, hdr := call(t, "POST", base+"/keys", key, map[string]string{"kid": "during"})
	if st != 503 || !strings.Contains(string(b), `"code":"store_unavailable"`) || hdr.Get("Retry-After") == "" {
		t.Fatalf("write during the outage: %d %s, want 503 store_unavailable with Retry-After", st, b)
	}
	if strings.Contains(string(b), "connect") || strings.Contains(string(b), "socket") {
		t.Fatalf("backend text reached the caller: %s", b)
	}
	var health string
	down := false
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline) && !down; time.Sleep(100 * time.Millisecond) {
		st, hb, _ := call(t, "GET", base+"/health", key, nil)
		health = string(hb)
		down = st == 503 && strings.Contains(health, `"store":{"backend":"postgres","ok":false`) &&
			strings.Contains(health, `"code":"store_unavailable"`)
	}
	if !down {
		t.Fatalf("/health during the outage: %s, want the store down", health)
	}
	time.Sleep(time.Second) // keep signing through the outage a little longer
	duringOutage := signs.Load()

	pg.Start(t)
	back := time.Now()
	var recovered time.Duration
	for i := 0; ; i++ {
		st, b, _ := call(t, "POST", base+"/keys", key, map[string]string{"kid": "after"})
		if st == 200 {
			recovered = time.Since(back)
			break
		}
		if st != 503 || time.Since(back) > 30*time.Second {
			t.Fatalf("write after PostgreSQL returned: %d %s", st, b)
		}
		time.Sleep(50 * time.Millisecond)
	}
	close(stop)
	wg.Wait()
	if n := signErrs.Load(); n != 0 || duringOutage == 0 {
		t.Fatalf("signing across the outage: %d errors in %d signatures (first: %v)", n, signs.Load(), firstErr.Load())
	}
	if st, b, _ := call(t, "POST", base+"/keys/after/sign", key, msg); st != 200 {
		t.Fatalf("sign with the key written after recovery: %d %s", st, b)
	}
	t.Logf("FIGURE postgres outage: %d signatures (contract sign, key-chain sign and JWS), 0 errors; first successful write %s after PostgreSQL was started again (without restarting kmsgate)",
		signs.Load(), recovered.Round(time.Millisecond))
}

// TestStartWithoutPostgresFails: a replica that cannot reach PostgreSQL at start-up refuses to
// start with a message naming the store, without its password.
func TestStartWithoutPostgresFails(t *testing.T) {
	if testing.Short() {
		t.Skip("needs PostgreSQL")
	}
	pg := testenv.StartPostgres(t)
	dsn := pg.NewDatabase(t)
	pg.Stop(t)
	u := strings.Replace(dsn, "@", ":hunter2-secret@", 1)
	_, err := appliance.Open(context.Background(), appliance.Options{ConfigDir: t.TempDir(), DataDir: t.TempDir(),
		MasterKeyEnv: apptest.MasterKey, Store: u})
	if err == nil || !strings.Contains(err.Error(), "cannot reach PostgreSQL") || strings.Contains(err.Error(), "hunter2") {
		t.Fatalf("Open with PostgreSQL down = %v, want a clear refusal without the password", err)
	}
}
