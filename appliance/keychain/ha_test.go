package keychain

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kmsgate/kmsgate/appliance/seal"
	"github.com/kmsgate/kmsgate/appliance/store"
	"github.com/kmsgate/kmsgate/appliance/tenants"
	"github.com/kmsgate/kmsgate/internal/errs"
	"github.com/kmsgate/kmsgate/internal/testenv"
	"github.com/kmsgate/kmsgate/providers"
	"github.com/kmsgate/kmsgate/providers/db"
)

// replicas are n key-chain services on one store, as n kmsgate replicas on one PostgreSQL
// database: each has its own db provider object, registry, tenant service and chain index, and
// they share the master key and a movable clock.
type replicas struct {
	svcs  []*Service
	st    *store.Store
	clock *fakeClock
}

func newReplicas(t *testing.T, st *store.Store, n int) *replicas {
	t.Helper()
	ctx := context.Background()
	sealer, err := seal.New(bytes.Repeat([]byte{9}, 32))
	if err != nil {
		t.Fatal(err)
	}
	clk := &fakeClock{t: time.Date(2026, 3, 1, 10, 37, 12, 0, time.UTC)}
	r := &replicas{st: st, clock: clk}
	for i := range n {
		factories := map[string]providers.Factory{providers.TypeDB: func(ctx context.Context, cfg providers.Config) (providers.Provider, error) {
			return db.New(cfg, sealer, func(tenant, kid string) []byte { return seal.AAD("db-key", tenant, kid) },
				store.SealedKeys{St: st})
		}}
		reg, err := providers.NewRegistry(ctx, []providers.Config{{ID: "db", Type: "db", Raw: json.RawMessage(`{"id":"db","type":"db"}`)}},
			"db", factories, nil)
		if err != nil {
			t.Fatal(err)
		}
		ten, err := tenants.New(ctx, st)
		if err != nil {
			t.Fatal(err)
		}
		if i == 0 {
			if _, err := ten.CreateTenant(ctx, tenants.CreateTenantRequest{ID: testTenant, Name: "Acme Issuer"}); err != nil {
				t.Fatal(err)
			}
		}
		r.svcs = append(r.svcs, New(Config{Store: st, Registry: reg, Tenants: ten, PublicURL: "https://issuer.example.test",
			Grace: 7 * 24 * time.Hour, Now: clk.Now, Instance: "replica-" + strconv.Itoa(i+1)}))
	}
	return r
}

func openPostgresStore(t *testing.T) *store.Store {
	t.Helper()
	testenv.NeedsBackend(t, "postgres")
	pg := testenv.StartPostgres(t)
	st, err := store.OpenPostgres(context.Background(), pg.NewDatabase(t), store.PostgresOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	return st
}

// createChains makes n standalone chains with a one-day rotation interval, spread over the
// replicas, 8 at a time; it returns their ids and active kids.
func (r *replicas) createChains(t *testing.T, n int) (ids []string, active map[string]string) {
	t.Helper()
	ctx := context.Background()
	ids = make([]string, n)
	var next atomic.Int64
	var wg sync.WaitGroup
	errc := make(chan error, 8)
	for w := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			s := r.svcs[w%len(r.svcs)]
			prov, _ := s.reg.Get("db")
			for {
				i := int(next.Add(1)) - 1
				if i >= n {
					return
				}
				id, err := s.create(ctx, testTenant, prov, UsageAttestation, KeyUseSign, TypeStandalone, "",
					Policy{Enabled: true, IntervalDays: 1})
				if err != nil {
					errc <- err
					return
				}
				ids[i] = id
			}
		}()
	}
	wg.Wait()
	close(errc)
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	active = map[string]string{}
	for _, id := range ids {
		c, err := r.svcs[0].load(ctx, testTenant, id)
		if err != nil {
			t.Fatal(err)
		}
		active[id] = c.Active.KID
	}
	return ids, active
}

// census counts the sealed db keys, the open key intents and the rotation leases in the store.
func census(t *testing.T, st *store.Store) (sealed, intents, leases int) {
	t.Helper()
	ctx := context.Background()
	for prefix, n := range map[string]*int{"dbkey/": &sealed, "intent/": &intents, prefixLease: &leases} {
		if err := st.List(ctx, prefix, func(string, []byte) error { *n++; return nil }); err != nil {
			t.Fatal(err)
		}
	}
	return
}

func dueChainCount(t *testing.T) int {
	if v := os.Getenv("KMSGATE_HA_CHAINS"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n <= 0 {
			t.Fatalf("KMSGATE_HA_CHAINS=%q", v)
		}
		return n
	}
	return 1000
}

// rotateAllDue makes every chain due at once and runs every replica's scheduler concurrently;
// each chain must be rotated exactly once, and no backend key may be left behind by the
// replicas that lost a race.
func rotateAllDue(t *testing.T, r *replicas, n int) {
	ctx := context.Background()
	t0 := time.Now()
	ids, before := r.createChains(t, n)
	created := time.Since(t0)
	r.clock.Add(25 * time.Hour)
	counts := make([]int, len(r.svcs))
	var wg sync.WaitGroup
	t1 := time.Now()
	for i, s := range r.svcs {
		wg.Add(1)
		go func() { defer wg.Done(); counts[i] = s.Tick(ctx) }()
	}
	wg.Wait()
	took := time.Since(t1)
	total := 0
	for _, c := range counts {
		total += c
	}
	t.Logf("%d chains created in %s; %d due chains rotated by %d replicas in %s (per replica %v, %d workers each)",
		n, created.Round(time.Millisecond), total, len(r.svcs), took.Round(time.Millisecond), counts, DefaultRotationWorkers)
	if total != n {
		t.Errorf("schedulers report %d rotations for %d due chains, want exactly %d", total, n, n)
	}
	for _, id := range ids {
		c, err := r.svcs[0].load(ctx, testTenant, id)
		if err != nil {
			t.Fatal(err)
		}
		if len(c.PreviousKeys) != 1 || c.PreviousKeys[0].Key.KID != before[id] || c.Active.KID == before[id] ||
			c.LastRotatedAt == nil || !c.LastRotatedAt.Equal(r.clock.Now()) {
			t.Fatalf("chain %s not rotated exactly once: %d previous keys, active %s (was %s)", id,
				len(c.PreviousKeys), c.Active.KID, before[id])
		}
	}
	// One active and one previous key per chain in the backend: every key a losing replica made
	// was rolled back, and every lease was released.
	sealed, intents, leases := census(t, r.st)
	if sealed != 2*n || intents != 0 || leases != 0 {
		t.Errorf("store holds %d sealed keys (want %d), %d open intents, %d leases (want 0, 0)", sealed, 2*n, intents, leases)
	}
	// A second pass finds nothing due.
	for _, s := range r.svcs {
		if got := s.Tick(ctx); got != 0 {
			t.Errorf("second pass rotated %d chains", got)
		}
	}
}

// TestHARotationExactlyOncePostgres: three replicas on one PostgreSQL database, all chains due at
// once, all three schedulers ticking concurrently.
func TestHARotationExactlyOncePostgres(t *testing.T) {
	testenv.NeedsBackend(t, "postgres")
	r := newReplicas(t, openPostgresStore(t), 3)
	rotateAllDue(t, r, dueChainCount(t))
}

// TestHARotationBadger is the same pass on the embedded store with one replica, for the figure.
func TestHARotationBadger(t *testing.T) {
	if testing.Short() {
		t.Skip("slow")
	}
	st, err := store.Open(t.TempDir(), store.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	rotateAllDue(t, newReplicas(t, st, 1), dueChainCount(t))
}

// TestHAConcurrentWritesPostgres spreads manual rotations and updates of the same chains over
// three replicas: every acknowledged rotation is in the record (no lost update), the last
// acknowledged description survives the concurrent rotations, each record has exactly one active
// key, and no backend key is left behind by a write that lost.
func TestHAConcurrentWritesPostgres(t *testing.T) {
	testenv.NeedsBackend(t, "postgres")
	r := newReplicas(t, openPostgresStore(t), 3)
	ctx := context.Background()
	const chains, rotationsPerReplica = 6, 4
	ids, _ := r.createChains(t, chains)
	acked := make([]atomic.Int64, chains)
	conflicts := atomic.Int64{}
	lastDesc := make([]string, chains)
	var wg sync.WaitGroup
	for ci, id := range ids {
		for ri, s := range r.svcs {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for range rotationsPerReplica {
					err := s.Rotate(ctx, testTenant, id, "manual")
					switch {
					case err == nil:
						acked[ci].Add(1)
					case strings.Contains(err.Error(), "changed concurrently"):
						conflicts.Add(1)
					default:
						t.Errorf("rotate %s on replica %d: %v", id, ri+1, err)
					}
				}
			}()
		}
		// One writer of descriptions per chain, moving from replica to replica, so "the last
		// acknowledged description" is well defined while rotations run concurrently.
		wg.Add(1)
		go func() {
			defer wg.Done()
			for k := range 9 {
				d := fmt.Sprintf("update %d of %s", k, id)
				err := r.svcs[k%3].Update(ctx, testTenant, id, UpdateRequest{Description: &d})
				switch {
				case err == nil:
					lastDesc[ci] = d
				case strings.Contains(err.Error(), "changed concurrently"):
					conflicts.Add(1)
				default:
					t.Errorf("update %s: %v", id, err)
				}
			}
		}()
	}
	wg.Wait()
	totalKeys, totalRot := 0, int64(0)
	for ci, id := range ids {
		c, err := r.svcs[ci%3].load(ctx, testTenant, id)
		if err != nil {
			t.Fatal(err)
		}
		n := acked[ci].Load()
		totalRot += n
		if int64(len(c.PreviousKeys)) != n {
			t.Errorf("chain %s: %d acknowledged rotations but %d previous keys (lost update)", id, n, len(c.PreviousKeys))
		}
		if lastDesc[ci] != "" && c.Description != lastDesc[ci] {
			t.Errorf("chain %s: description %q, want the last acknowledged %q (lost update)", id, c.Description, lastDesc[ci])
		}
		seen := map[string]bool{}
		for _, k := range c.keys() {
			if seen[k.KID] {
				t.Errorf("chain %s holds key %s twice", id, k.KID)
			}
			seen[k.KID] = true
		}
		totalKeys += 1 + len(c.PreviousKeys)
	}
	sealed, intents, _ := census(t, r.st)
	if sealed != totalKeys || intents != 0 {
		t.Errorf("store holds %d sealed keys for %d keys in chain records, %d open intents", sealed, totalKeys, intents)
	}
	t.Logf("%d acknowledged rotations over %d chains on 3 replicas, %d writes answered 409 after losing twice", totalRot,
		chains, conflicts.Load())
	if totalRot == 0 {
		t.Fatal("no rotation succeeded")
	}
}

// TestHARotationLeaseOfDeadReplica: a lease left by a replica that died blocks the chain's
// rotation until it expires; then another replica rotates it once.
func TestHARotationLeaseOfDeadReplica(t *testing.T) {
	testenv.NeedsBackend(t, "postgres")
	r := newReplicas(t, openPostgresStore(t), 3)
	ctx := context.Background()
	ids, before := r.createChains(t, 1)
	id := ids[0]
	r.clock.Add(25 * time.Hour)
	lease := rotationLease{Owner: "replica-dead", Expires: r.clock.Now().Add(DefaultRotationLease)}
	if err := r.st.Put(ctx, leaseKey(testTenant, id), lease); err != nil {
		t.Fatal(err)
	}
	for i, s := range r.svcs {
		if got := s.Tick(ctx); got != 0 {
			t.Fatalf("replica %d rotated a chain whose lease another replica holds", i+1)
		}
	}
	if c, _ := r.svcs[0].load(ctx, testTenant, id); c.Active.KID != before[id] || len(c.PreviousKeys) != 0 {
		t.Fatalf("chain changed under a foreign lease: active %s, %d previous", c.Active.KID, len(c.PreviousKeys))
	}
	r.clock.Add(DefaultRotationLease + time.Second)
	rotated := 0
	for _, s := range r.svcs[1:] {
		rotated += s.Tick(ctx)
	}
	c, err := r.svcs[0].load(ctx, testTenant, id)
	if err != nil {
		t.Fatal(err)
	}
	if rotated != 1 || len(c.PreviousKeys) != 1 || c.PreviousKeys[0].Key.KID != before[id] {
		t.Fatalf("after the lease expired: %d rotations, %d previous keys", rotated, len(c.PreviousKeys))
	}
	if _, _, leases := census(t, r.st); leases != 0 {
		t.Errorf("%d leases left after the takeover", leases)
	}
}

// TestHAChainQuotaAcrossReplicas: three replicas that do not see each other's in-flight creates
// (no change notifications here) still hold the tenant's chain quota exactly, because the count
// lives in the store and changes in the chain write's own transaction. Each replica's index alone
// would have let every replica create up to the quota.
func TestHAChainQuotaAcrossReplicas(t *testing.T) {
	st := openPostgresStore(t)
	r := newReplicas(t, st, 3)
	const quota = 5
	for _, s := range r.svcs {
		s.maxChains = quota
	}
	ctx := context.Background()
	var created, refused atomic.Int64
	var wg sync.WaitGroup
	errc := make(chan error, 30)
	for i := range 30 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			s := r.svcs[i%3]
			prov, _ := s.reg.Get("db")
			_, err := s.create(ctx, testTenant, prov, UsageAttestation, KeyUseSign, TypeStandalone, "", Policy{})
			switch {
			case err == nil:
				created.Add(1)
			case errs.CodeOf(err) == "quota_exceeded":
				refused.Add(1)
			default:
				errc <- err
			}
		}()
	}
	wg.Wait()
	close(errc)
	for err := range errc {
		t.Fatalf("create: %v", err)
	}
	chains := 0
	if err := st.List(ctx, prefixChain+testTenant+"\x00", func(string, []byte) error { chains++; return nil }); err != nil {
		t.Fatal(err)
	}
	if created.Load() != quota || refused.Load() != 30-quota || chains != quota {
		t.Fatalf("30 concurrent creates over 3 replicas with a quota of %d: %d created, %d refused, %d chain records",
			quota, created.Load(), refused.Load(), chains)
	}
	sealed, intents, _ := census(t, st)
	if sealed != quota || intents != 0 {
		t.Fatalf("after the refused creates: %d sealed keys (want %d: refused creates roll their key back), %d intents",
			sealed, quota, intents)
	}

	// A delete on one replica frees exactly one slot for the others.
	var first string
	if err := st.List(ctx, prefixChain+testTenant+"\x00", func(key string, _ []byte) error {
		if first == "" {
			_, first, _ = parseChainKey(key)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if err := r.svcs[1].Delete(ctx, testTenant, first); err != nil {
		t.Fatal(err)
	}
	prov, _ := r.svcs[2].reg.Get("db")
	if _, err := r.svcs[2].create(ctx, testTenant, prov, UsageAttestation, KeyUseSign, TypeStandalone, "", Policy{}); err != nil {
		t.Fatalf("create after a delete on another replica: %v", err)
	}
	if _, err := r.svcs[0].create(ctx, testTenant, prov, UsageAttestation, KeyUseSign, TypeStandalone, "", Policy{}); errs.CodeOf(err) != "quota_exceeded" {
		t.Fatalf("create beyond the quota after the refill = %v, want quota_exceeded", err)
	}
}
