package appliance_test

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/kmsgate/kmsgate/appliance"
	"github.com/kmsgate/kmsgate/appliance/store"
	"github.com/kmsgate/kmsgate/appliance/tenants"
	"github.com/kmsgate/kmsgate/internal/apptest"
	"github.com/kmsgate/kmsgate/internal/testenv"
)

// propagationLimit is how soon a write through one replica must take effect on the others.
const propagationLimit = time.Second

// startReplicas starts n appliances on one PostgreSQL database. The periodic refresh is off, so
// whatever propagates does so through change notices alone.
func startReplicas(t *testing.T, dsn string, n int) []*apptest.Instance {
	t.Helper()
	out := make([]*apptest.Instance, n)
	for i := range out {
		out[i] = apptest.Start(t, apptest.Options{Tweak: func(o *appliance.Options) {
			o.Store = dsn
			o.CacheRefreshInterval = -1
		}})
	}
	waitListeners(t, dsn, n)
	return out
}

// waitListeners waits until n replicas' listening connections have run LISTEN.
func waitListeners(t *testing.T, dsn string, n int) {
	t.Helper()
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	deadline := time.Now().Add(10 * time.Second)
	for {
		var got int
		err := conn.QueryRow(ctx, `SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()
			AND application_name = $1 AND query LIKE 'LISTEN %'`, store.ListenerApplicationName).Scan(&got)
		if err != nil {
			t.Fatal(err)
		}
		if got >= n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d of %d replicas listening after 10s", got, n)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// until polls cond every few milliseconds and returns how long it took to hold, failing the test
// when it does not within propagationLimit.
func until(t *testing.T, what string, cond func() bool) time.Duration {
	t.Helper()
	start := time.Now()
	for {
		if cond() {
			return time.Since(start)
		}
		if time.Since(start) > propagationLimit {
			t.Fatalf("%s: not within %v", what, propagationLimit)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

func percentiles(d []time.Duration) (p50, maxD time.Duration) {
	s := slices.Clone(d)
	slices.Sort(s)
	return s[len(s)/2], s[len(s)-1]
}

func signStatus(in *apptest.Instance, key, kid string) int {
	st, _ := in.Do("POST", "/keys/"+kid+"/sign", key, map[string]string{"data": "bQ"})
	return st
}

// TestReplicasRevocation: an API key revoked through replica 1 is refused by replicas 2 and 3
// within a second, measured over 20 trials. Credentials minted on replica 1 are accepted by the
// others as soon as their notice arrives, too.
func TestReplicasRevocation(t *testing.T) {
	testenv.NeedsBackend(t, "postgres")
	pg := testenv.StartPostgres(t)
	dsn := pg.NewDatabase(t)
	r := startReplicas(t, dsn, 3)
	ctx := context.Background()
	admin := r[0].CreateTenant("acme")
	if st, body := r[0].Do("POST", "/keys", admin, map[string]any{"kid": "k1"}); st != 200 {
		t.Fatalf("create key: %d %s", st, body)
	}
	const trials = 20
	var delays []time.Duration
	for i := range trials {
		nk, err := r[0].App.Tenants().AddKey(ctx, "acme", []string{tenants.RoleSign}, fmt.Sprintf("trial-%d", i))
		if err != nil {
			t.Fatal(err)
		}
		for _, in := range r[1:] {
			until(t, "new credential accepted", func() bool { return signStatus(in, nk.Key, "k1") == 200 })
		}
		if _, err := r[0].App.Tenants().Revoke(ctx, nk.CredentialID, tenants.RevokeCredential); err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		var wg sync.WaitGroup
		got := make([]time.Duration, 2)
		for j, in := range r[1:] {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for signStatus(in, nk.Key, "k1") != 401 {
					if time.Since(start) > propagationLimit {
						got[j] = -1
						return
					}
					time.Sleep(2 * time.Millisecond)
				}
				got[j] = time.Since(start)
			}()
		}
		wg.Wait()
		for j, d := range got {
			if d < 0 {
				t.Fatalf("trial %d: replica %d still accepts the revoked key after %v", i, j+2, propagationLimit)
			}
			delays = append(delays, d)
		}
		if st := signStatus(r[0], nk.Key, "k1"); st != 401 {
			t.Fatalf("replica 1 accepts its own revoked key: %d", st)
		}
	}
	p50, maxD := percentiles(delays)
	t.Logf("revocation propagation over %d trials x 2 replicas (HTTP polling every 2ms): p50 %v, max %v", trials, p50, maxD)
}

// TestReplicasKeyDelete: a key deleted through replica 1 answers 404 key_not_found on replica 2,
// which had its reference (and, for a db key, the unsealed key) cached from signing.
func TestReplicasKeyDelete(t *testing.T) {
	testenv.NeedsBackend(t, "postgres")
	pg := testenv.StartPostgres(t)
	dsn := pg.NewDatabase(t)
	r := startReplicas(t, dsn, 2)
	key := r[0].CreateTenant("acme")
	until(t, "tenant key accepted on replica 2", func() bool { return signStatus(r[1], key, "none") == 404 })
	var delays []time.Duration
	for i := range 5 {
		kid := fmt.Sprintf("del-%d", i)
		if st, body := r[0].Do("POST", "/keys", key, map[string]any{"kid": kid}); st != 200 {
			t.Fatalf("create key: %d %s", st, body)
		}
		if st := signStatus(r[1], key, kid); st != 200 {
			t.Fatalf("sign on replica 2 before the delete: %d", st)
		}
		if st, body := r[0].Do("DELETE", "/keys/"+kid, key, nil); st/100 != 2 {
			t.Fatalf("delete on replica 1: %d %s", st, body)
		}
		delays = append(delays, until(t, "deleted key refused on replica 2", func() bool {
			st, body := r[1].Do("POST", "/keys/"+kid+"/sign", key, map[string]string{"data": "bQ"})
			return st == 404 && strings.Contains(string(body), `"key_not_found"`)
		}))
	}
	p50, maxD := percentiles(delays)
	t.Logf("key deletion propagation over %d trials: p50 %v, max %v", len(delays), p50, maxD)
}

// TestReplicasRotation: a key chain rotated through replica 1 signs with its new key on replica
// 2, which had the old one cached, and replica 2's JWKS publishes the new key.
func TestReplicasRotation(t *testing.T) {
	testenv.NeedsBackend(t, "postgres")
	pg := testenv.StartPostgres(t)
	dsn := pg.NewDatabase(t)
	r := startReplicas(t, dsn, 2)
	key := r[0].CreateTenant("acme")
	st, body := r[0].Do("POST", "/key-chain", key, map[string]any{"usageType": "access", "type": "internalChain"})
	if st != 201 {
		t.Fatalf("create chain: %d %s", st, body)
	}
	var created struct{ ID string }
	apptest.JSON(t, body, &created)
	signKID := func(in *apptest.Instance) string {
		st, body := in.Do("POST", "/key-chain/"+created.ID+"/sign", key, map[string]string{"data": "bQ"})
		if st != 200 {
			t.Fatalf("key-chain sign: %d %s", st, body)
		}
		var res struct{ Kid string }
		apptest.JSON(t, body, &res)
		return res.Kid
	}
	jwksHas := func(in *apptest.Instance, kid string) bool {
		_, body := in.Do("GET", "/key-chain/"+created.ID+"/jwks", key, nil)
		return bytes.Contains(body, []byte(`"kid":"`+kid+`"`))
	}
	until(t, "tenant key accepted on replica 2", func() bool { return signStatus(r[1], key, "none") == 404 })
	var delays []time.Duration
	for i := range 5 {
		old := signKID(r[1])
		if st, body := r[0].Do("POST", "/key-chain/"+created.ID+"/rotate", key, nil); st/100 != 2 {
			t.Fatalf("rotate %d on replica 1: %d %s", i, st, body)
		}
		newKID := signKID(r[0])
		if newKID == old {
			t.Fatalf("rotation %d kept kid %s on replica 1", i, old)
		}
		delays = append(delays, until(t, "replica 2 signs with the rotated key", func() bool {
			return signKID(r[1]) == newKID && jwksHas(r[1], newKID)
		}))
	}
	p50, maxD := percentiles(delays)
	t.Logf("rotation propagation over %d trials: p50 %v, max %v", len(delays), p50, maxD)
}

// TestReplicasListenerReconnect: with every replica's listening connection terminated by the
// server, a revocation through replica 1 still reaches replica 2 within a second (the listener
// reconnects and rebuilds its caches), and so does one made after the reconnect.
func TestReplicasListenerReconnect(t *testing.T) {
	testenv.NeedsBackend(t, "postgres")
	pg := testenv.StartPostgres(t)
	dsn := pg.NewDatabase(t)
	r := startReplicas(t, dsn, 2)
	ctx := context.Background()
	admin := r[0].CreateTenant("acme")
	if st, body := r[0].Do("POST", "/keys", admin, map[string]any{"kid": "k1"}); st != 200 {
		t.Fatalf("create key: %d %s", st, body)
	}
	mint := func() *tenants.NewKeyResult {
		nk, err := r[0].App.Tenants().AddKey(ctx, "acme", []string{tenants.RoleSign}, "reconnect")
		if err != nil {
			t.Fatal(err)
		}
		until(t, "new credential accepted on replica 2", func() bool { return signStatus(r[1], nk.Key, "k1") == 200 })
		return nk
	}
	revoke := func(nk *tenants.NewKeyResult) {
		if _, err := r[0].App.Tenants().Revoke(ctx, nk.CredentialID, tenants.RevokeCredential); err != nil {
			t.Fatal(err)
		}
	}
	terminate := func() {
		pg.Exec(t, "postgres", "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
			store.ListenerApplicationName)
	}
	// Revoked while the listeners are down: the rebuild after reconnecting picks it up.
	a := mint()
	terminate()
	revoke(a)
	d1 := until(t, "revocation during the listener outage refused on replica 2", func() bool { return signStatus(r[1], a.Key, "k1") == 401 })

	// After the reconnect, notices flow again.
	waitListeners(t, dsn, 2)
	b := mint()
	revoke(b)
	d2 := until(t, "revocation after the reconnect refused on replica 2", func() bool { return signStatus(r[1], b.Key, "k1") == 401 })
	t.Logf("revocation with the listener terminated: %v; after it reconnected: %v", d1, d2)
}

// storeQueries scrapes kmsgate_store_queries_total, summed over ops, and the series by op.
func storeQueries(t *testing.T, in *apptest.Instance) (total float64, byOp map[string]float64) {
	t.Helper()
	st, body := in.Do("GET", "/metrics", "", nil)
	if st != 200 {
		t.Fatalf("metrics: %d", st)
	}
	byOp = map[string]float64{}
	sc := bufio.NewScanner(bytes.NewReader(body))
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, "kmsgate_store_queries_total{") {
			continue
		}
		v, err := strconv.ParseFloat(line[strings.LastIndexByte(line, ' ')+1:], 64)
		if err != nil {
			t.Fatalf("metrics line %q: %v", line, err)
		}
		total += v
		byOp[line[:strings.IndexByte(line, '}')+1]] = v
	}
	return total, byOp
}

// TestSignCostsNoStoreQuery: signing with known keys, on the contract face and on a key chain
// (sign and JWS), moves kmsgate_store_queries_total by 0, on Badger and on PostgreSQL.
func TestSignCostsNoStoreQuery(t *testing.T) {
	for _, backend := range []string{"badger", "postgres"} {
		t.Run(backend, func(t *testing.T) {
			var in *apptest.Instance
			if backend == "postgres" {
				testenv.NeedsBackend(t, "postgres")
				in = startReplicas(t, testenv.PostgresDSN(t), 1)[0]
			} else {
				in = apptest.Start(t, apptest.Options{})
			}
			key := in.CreateTenant("acme")
			if st, body := in.Do("POST", "/keys", key, map[string]any{"kid": "k1"}); st != 200 {
				t.Fatalf("create key: %d %s", st, body)
			}
			st, body := in.Do("POST", "/key-chain", key, map[string]any{"usageType": "access", "type": "internalChain"})
			if st != 201 {
				t.Fatalf("create chain: %d %s", st, body)
			}
			var created struct{ ID string }
			apptest.JSON(t, body, &created)
			sign := func() {
				if st, body := in.Do("POST", "/keys/k1/sign", key, map[string]string{"data": "bQ"}); st != 200 {
					t.Fatalf("contract sign: %d %s", st, body)
				}
				if st, body := in.Do("POST", "/key-chain/"+created.ID+"/sign", key, map[string]string{"data": "bQ"}); st != 200 {
					t.Fatalf("key-chain sign: %d %s", st, body)
				}
				if st, body := in.Do("POST", "/key-chain/"+created.ID+"/jws", key, map[string]any{"payload": map[string]string{"a": "b"}}); st != 200 {
					t.Fatalf("key-chain jws: %d %s", st, body)
				}
			}
			// Let start-up work (bootstrap, the scheduler's first pass) and the change notices of
			// the writes above finish, waiting until the counter stands still, then sign once so
			// every path has its references cached (a load that raced an invalidation is not
			// cached), and wait again.
			settle := func() (float64, map[string]float64) {
				before, ops := storeQueries(t, in)
				for settled := time.Now(); time.Since(settled) < 300*time.Millisecond; {
					time.Sleep(50 * time.Millisecond)
					if now, nowOps := storeQueries(t, in); now != before {
						before, ops, settled = now, nowOps, time.Now()
					}
				}
				return before, ops
			}
			settle()
			sign()
			before, ops := settle()
			if len(ops) != len(store.Ops) {
				t.Fatalf("kmsgate_store_queries_total has %d series, want %d", len(ops), len(store.Ops))
			}
			// Background work (the scheduler's first pass, bootstrap retries) may still touch
			// the store under a loaded machine. If any signature cost a query no window could be
			// clean, so a window that moved is retried, up to three times.
			const n = 100
			for attempt := 1; ; attempt++ {
				for range n {
					sign()
				}
				after, afterOps := storeQueries(t, in)
				t.Logf("%s: %d signatures on each of 3 paths; kmsgate_store_queries_total %v -> %v", backend, n, before, after)
				for k, v := range afterOps {
					if v != ops[k] {
						t.Logf("moved: %s %v -> %v", k, ops[k], v)
					}
				}
				if after == before {
					break
				}
				if attempt == 3 {
					t.Fatalf("signing moved kmsgate_store_queries_total in every window (last by %v), want 0", after-before)
				}
				before, ops = after, afterOps
			}
		})
	}
}
