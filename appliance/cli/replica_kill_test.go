package cli_test

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"os/exec"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/kmsgate/kmsgate/appliance/store"
	"github.com/kmsgate/kmsgate/internal/keyutil"
	"github.com/kmsgate/kmsgate/internal/testenv"
)

// pgCensus is takeCensus for a PostgreSQL store, read while the replicas run: sealed db keys, the
// ones no key record, key-chain record or owned-key record references (orphans), the owned-key
// records no key or chain record references (a key-chain create killed between confirming its
// key and writing the chain: counted, kept, harmless), open intents, and which acknowledged kids
// have no key record.
type pgCensus struct {
	sealed, orphans, ownedOnly, intents int
	missing                             []string
}

func takePGCensus(t *testing.T, dsn string, kids []string) pgCensus {
	t.Helper()
	ctx := context.Background()
	st, err := store.OpenPostgres(ctx, dsn, store.PostgresOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	// refs collects {"providerId":"db","externalId":…} objects anywhere in the records' JSON.
	collect := func(prefix string) map[string]bool {
		refs := map[string]bool{}
		var walk func(v any)
		walk = func(v any) {
			switch x := v.(type) {
			case map[string]any:
				if p, _ := x["providerId"].(string); p == "db" {
					if id, _ := x["externalId"].(string); id != "" {
						refs[id] = true
					}
				}
				for _, c := range x {
					walk(c)
				}
			case []any:
				for _, c := range x {
					walk(c)
				}
			}
		}
		err := st.List(ctx, prefix, func(_ string, val []byte) error {
			var v any
			if err := json.Unmarshal(val, &v); err != nil {
				return err
			}
			walk(v)
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		return refs
	}
	records := collect("key/")
	for id := range collect("chain/") {
		records[id] = true
	}
	owned := collect("keyown/")
	var c pgCensus
	if err := st.List(ctx, "dbkey/", func(k string, _ []byte) error {
		c.sealed++
		id := strings.TrimPrefix(k, "dbkey/")
		if !records[id] && !owned[id] {
			c.orphans++
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	for id := range owned {
		if !records[id] {
			c.ownedOnly++
		}
	}
	if err := st.List(ctx, "intent/", func(string, []byte) error { c.intents++; return nil }); err != nil {
		t.Fatal(err)
	}
	for _, kid := range kids {
		var r store.KeyRef
		if err := st.Get(ctx, store.KeyRecordKey("acme", kid), &r); err != nil {
			c.missing = append(c.missing, kid)
		}
	}
	return c
}

// replicaSet is three server processes on one PostgreSQL database, each with its own data dir.
type replicaSet struct {
	t    *testing.T
	dsn  string
	env  []string
	dirs []string
	base []string
	addr []string
	mu   sync.Mutex
	cmd  []*exec.Cmd
}

func (r *replicaSet) start(i int) {
	r.t.Helper()
	cmd := startHelper(r.t, r.dirs[i], r.addr[i], append([]string{"KMSGATE_STORE=" + r.dsn}, r.env...)...)
	r.mu.Lock()
	r.cmd[i] = cmd
	r.mu.Unlock()
}

func (r *replicaSet) kill(i int) {
	r.t.Helper()
	r.mu.Lock()
	cmd := r.cmd[i]
	r.cmd[i] = nil
	r.mu.Unlock()
	if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
		r.t.Fatal(err)
	}
	cmd.Wait()
}

func (r *replicaSet) stopAll() {
	r.mu.Lock()
	defer r.mu.Unlock()
	for i, cmd := range r.cmd {
		if cmd != nil {
			cmd.Process.Signal(syscall.SIGTERM)
			cmd.Wait()
			r.cmd[i] = nil
		}
	}
}

// loadResult is what the clients were told: acknowledged key creates (kid → public key) and
// acknowledged key-chain creates (ids).
type loadResult struct {
	mu       sync.Mutex
	keys     map[string]*ecdsa.PublicKey
	chains   []string
	retried  atomic.Int64 // requests repeated on another replica after a transport error
	conflict atomic.Int64 // retried key creates answered 409: the first attempt had committed
}

// TestKillReplicaUnderLoadPostgres runs three server processes on one PostgreSQL database, has 12
// clients create db keys and key chains spread over all three (a client whose request fails on
// the transport repeats it on the next replica), and kills one replica with SIGKILL in the middle.
// Every acknowledged key and chain must exist and sign on both survivors (checked with
// crypto/ecdsa) and on the killed replica once restarted; the creates the kill cut off leave
// intents and unreferenced sealed keys, which the survivors' periodic sweep (not a restart)
// must remove: no orphaned backend key and no intent left.
func TestKillReplicaUnderLoadPostgres(t *testing.T) {
	testenv.NeedsBackend(t, "postgres")
	pg := testenv.StartPostgres(t)
	dsn := pg.NewDatabase(t)
	out, err := run(t, "tenant", "create", "acme", "--store", dsn, "--data-dir", t.TempDir())
	if err != nil {
		t.Fatalf("%v %s", err, out)
	}
	var ten struct{ APIKey string }
	if err := json.Unmarshal([]byte(out), &ten); err != nil {
		t.Fatal(err)
	}
	const maxAge = 3 * time.Second
	rs := &replicaSet{t: t, dsn: dsn, cmd: make([]*exec.Cmd, 3),
		env: []string{"KMSGATE_CREATE_RATE=-1", "KMSGATE_KEY_INTENT_MAX_AGE=" + maxAge.String()}}
	for i := 0; i < 3; i++ {
		ln, _ := net.Listen("tcp", "127.0.0.1:0")
		rs.addr = append(rs.addr, ln.Addr().String())
		ln.Close()
		rs.base = append(rs.base, "http://"+rs.addr[i])
		rs.dirs = append(rs.dirs, t.TempDir())
		rs.start(i)
	}
	defer rs.stopAll()
	client := &http.Client{Timeout: 30 * time.Second}
	res := &loadResult{keys: map[string]*ecdsa.PublicKey{}}

	// do sends one request to replica r and, on a transport error (the replica is dead), to the
	// next ones; it returns the status and body of the first answer.
	do := func(r int, path string, body any) (int, []byte, bool) {
		b, _ := json.Marshal(body)
		retried := false
		for k := 0; k < 3; k++ {
			req, _ := http.NewRequest("POST", rs.base[(r+k)%3]+path, bytes.NewReader(b))
			req.Header.Set("Authorization", "Bearer "+ten.APIKey)
			req.Header.Set("Content-Type", "application/json")
			resp, err := client.Do(req)
			if err != nil {
				res.retried.Add(1)
				retried = true
				continue
			}
			out, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			return resp.StatusCode, out, retried
		}
		return 0, nil, retried
	}

	var killed int
	var before pgCensus
	for attempt := 1; ; attempt++ {
		var wg sync.WaitGroup
		var acks atomic.Int64
		stop := make(chan struct{})
		var failures []string
		var fmu sync.Mutex
		fail := func(s string) {
			fmu.Lock()
			failures = append(failures, s)
			fmu.Unlock()
		}
		for w := 0; w < 12; w++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := 0; ; i++ {
					select {
					case <-stop:
						return
					default:
					}
					r := (w + i) % 3
					if i%2 == 0 {
						kid := fmt.Sprintf("a%d-w%d-%d", attempt, w, i)
						st, body, retried := do(r, "/keys", map[string]string{"kid": kid})
						switch {
						case st == 200:
							var g struct{ PublicJWK keyutil.JWK }
							if err := json.Unmarshal(body, &g); err != nil {
								fail(fmt.Sprintf("generate %s: %v", kid, err))
								continue
							}
							pub, err := keyutil.ParsePublicJWK(g.PublicJWK)
							if err != nil {
								fail(fmt.Sprintf("generate %s: %v", kid, err))
								continue
							}
							res.mu.Lock()
							res.keys[kid] = pub
							res.mu.Unlock()
							acks.Add(1)
						case st == 409 && retried:
							res.conflict.Add(1) // committed before the kill; checked below via the store
						case st == 0 || st == 503:
						default:
							fail(fmt.Sprintf("generate %s: %d %s", kid, st, body))
						}
					} else {
						st, body, _ := do(r, "/key-chain", map[string]string{"usageType": "attestation", "type": "standalone"})
						switch st {
						case 201:
							var c struct{ ID string }
							if err := json.Unmarshal(body, &c); err != nil || c.ID == "" {
								fail(fmt.Sprintf("chain create: %s", body))
								continue
							}
							res.mu.Lock()
							res.chains = append(res.chains, c.ID)
							res.mu.Unlock()
							acks.Add(1)
						case 0, 503:
						default:
							fail(fmt.Sprintf("chain create: %d %s", st, body))
						}
					}
				}
			}()
		}
		target := acks.Load() + 60
		for acks.Load() < target {
			time.Sleep(5 * time.Millisecond)
		}
		killed = (attempt - 1) % 3
		rs.kill(killed)
		// The clients go on against the survivors for a while, retrying what the kill cut off.
		// (At most 2 s: the census below must see the intents the kill left before the survivors'
		// sweep, which takes only intents older than maxAge, removes them.)
		after, until := acks.Load(), time.Now().Add(2*time.Second)
		for acks.Load() < after+30 && time.Now().Before(until) {
			time.Sleep(5 * time.Millisecond)
		}
		if acks.Load() == after {
			t.Fatal("no create acknowledged by the survivors within 2 s of the kill")
		}
		close(stop)
		wg.Wait()
		if len(failures) > 0 {
			t.Fatalf("unexpected answers under load (first of %d): %s", len(failures), failures[0])
		}
		res.mu.Lock()
		kids := make([]string, 0, len(res.keys))
		for kid := range res.keys {
			kids = append(kids, kid)
		}
		res.mu.Unlock()
		before = takePGCensus(t, dsn, kids)
		t.Logf("attempt %d, replica %d killed: %d acknowledged keys, %d acknowledged chains, %d requests repeated on another replica; "+
			"%d sealed db keys, %d unreferenced, %d open intents", attempt, killed, len(kids), len(res.chains), res.retried.Load(),
			before.sealed, before.orphans, before.intents)
		if len(before.missing) > 0 {
			t.Fatalf("acknowledged keys lost: %v", before.missing)
		}
		if before.orphans > before.intents {
			t.Fatalf("%d unreferenced sealed keys but only %d intents: a key was created without an intent", before.orphans, before.intents)
		}
		if before.intents > 0 || attempt == 5 {
			break
		}
		rs.start(killed) // the kill landed between creates: try again
	}
	if before.intents == 0 {
		t.Fatal("no kill landed inside a create in 5 attempts: the test proves nothing")
	}

	// The survivors' periodic sweep (every maxAge, for intents older than maxAge) must clean up
	// what the killed replica left, without a restart.
	deadline := time.Now().Add(6*maxAge + 10*time.Second)
	var after pgCensus
	for {
		after = takePGCensus(t, dsn, nil)
		if after.orphans == 0 && after.intents == 0 || time.Now().After(deadline) {
			break
		}
		time.Sleep(250 * time.Millisecond)
	}
	swept := time.Since(deadline.Add(-(6*maxAge + 10*time.Second)))
	t.Logf("after the survivors' sweep (%v after the census): %d sealed db keys, %d unreferenced, %d open intents, "+
		"%d owned keys no key or chain references; %d retried creates found already committed (409)",
		swept.Round(10*time.Millisecond), after.sealed, after.orphans, after.intents, after.ownedOnly, res.conflict.Load())
	if after.orphans != 0 || after.intents != 0 {
		t.Fatalf("after the sweep: %d orphaned sealed keys, %d intents; want 0 and 0", after.orphans, after.intents)
	}
	if after.sealed != before.sealed-before.orphans {
		t.Fatalf("the sweep deleted %d sealed keys, want exactly the %d orphans", before.sealed-after.sealed, before.orphans)
	}
	sweptMetric := 0.0
	for i := 0; i < 3; i++ {
		if i != killed {
			sweptMetric += sweptDeleted(t, rs.base[i])
		}
	}
	if sweptMetric < float64(before.orphans) {
		t.Errorf("the survivors' kmsgate_key_intents_swept_total{result=\"deleted\"} is %v, want at least the %d orphans", sweptMetric, before.orphans)
	}

	// Every acknowledged write exists and signs on the survivors and on the restarted replica.
	rs.start(killed)
	res.mu.Lock()
	defer res.mu.Unlock()
	for i := 0; i < 3; i++ {
		for kid, pub := range res.keys {
			msg := []byte("after the kill: " + kid)
			st, body := post(t, rs.base[i]+"/keys/"+kid+"/sign", ten.APIKey, map[string]string{"data": base64.StdEncoding.EncodeToString(msg)})
			if err := verifyES256(st, body, pub, msg); err != nil {
				t.Fatalf("acknowledged key %s on replica %d: %v", kid, i, err)
			}
		}
		for _, id := range res.chains {
			pubs := chainKeys(t, rs.base[i], ten.APIKey, id)
			msg := []byte("after the kill: chain " + id)
			st, body := post(t, rs.base[i]+"/key-chain/"+id+"/sign", ten.APIKey, map[string]string{"data": base64.StdEncoding.EncodeToString(msg)})
			var r struct{ KID string }
			json.Unmarshal(body, &r)
			if err := verifyES256(st, body, pubs[r.KID], msg); err != nil {
				t.Fatalf("acknowledged chain %s on replica %d: %v", id, i, err)
			}
		}
	}
	t.Logf("all %d acknowledged keys and %d acknowledged chains sign on the 2 survivors and the restarted replica", len(res.keys), len(res.chains))
}

func verifyES256(st int, body []byte, pub *ecdsa.PublicKey, msg []byte) error {
	var r struct{ Signature string }
	json.Unmarshal(body, &r)
	raw, err := base64.RawURLEncoding.DecodeString(r.Signature)
	if st != 200 || err != nil || len(raw) != 64 {
		return fmt.Errorf("sign: %d %s", st, strings.TrimSpace(string(body)))
	}
	if pub == nil {
		return errors.New("signed with a key the chain's JWKS does not list")
	}
	d := sha256.Sum256(msg)
	if !ecdsa.Verify(pub, d[:], new(big.Int).SetBytes(raw[:32]), new(big.Int).SetBytes(raw[32:])) {
		return errors.New("the signature does not verify")
	}
	return nil
}

// chainKeys reads a chain's JWKS: kid → public key.
func chainKeys(t *testing.T, base, apiKey, id string) map[string]*ecdsa.PublicKey {
	t.Helper()
	req, _ := http.NewRequest("GET", base+"/key-chain/"+id+"/jwks", nil)
	req.Header.Set("Authorization", "Bearer "+apiKey)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var set struct{ Keys []keyutil.JWK }
	if err := json.NewDecoder(resp.Body).Decode(&set); err != nil || resp.StatusCode != 200 {
		t.Fatalf("jwks of chain %s: %d %v", id, resp.StatusCode, err)
	}
	out := map[string]*ecdsa.PublicKey{}
	for _, k := range set.Keys {
		pub, err := keyutil.ParsePublicJWK(k)
		if err != nil {
			t.Fatal(err)
		}
		out[k.Kid] = pub
	}
	return out
}

// sweptDeleted reads kmsgate_key_intents_swept_total{result="deleted"} (all provider types) from
// /metrics.
func sweptDeleted(t *testing.T, base string) float64 {
	t.Helper()
	resp, err := http.Get(base + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	var n float64
	for _, line := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(line, "kmsgate_key_intents_swept_total{") && strings.Contains(line, `result="deleted"`) {
			var v float64
			fmt.Sscan(line[strings.LastIndexByte(line, ' ')+1:], &v)
			n += v
		}
	}
	return n
}
