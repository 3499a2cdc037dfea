package appliance_test

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/kmsgate/kmsgate/appliance"
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
	testenv.NeedsBackend(t, "postgres")
	pg := testenv.StartPostgres(t)
	srv := serveOnStore(t, pg.NewDatabase(t))
	base, key := srv.base, srv.key
	load := srv.startSignLoad(t)

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
	duringOutage := load.signs.Load()

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
	load.stop()
	if n := load.errs.Load(); n != 0 || duringOutage == 0 {
		t.Fatalf("signing across the outage: %d errors in %d signatures (first: %v)", n, load.signs.Load(), load.firstErr.Load())
	}
	if st, b, _ := call(t, "POST", base+"/keys/after/sign", key, srv.msg); st != 200 {
		t.Fatalf("sign with the key written after recovery: %d %s", st, b)
	}
	t.Logf("FIGURE postgres outage: %d signatures (contract sign, key-chain sign and JWS), 0 errors; first successful write %s after PostgreSQL was started again (without restarting kmsgate)",
		load.signs.Load(), recovered.Round(time.Millisecond))
}

// TestStartWithoutPostgresFails: a replica that cannot reach PostgreSQL at start-up refuses to
// start with a message naming the store, without its password.
func TestStartWithoutPostgresFails(t *testing.T) {
	testenv.NeedsBackend(t, "postgres")
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
