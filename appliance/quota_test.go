package appliance_test

import (
	"encoding/json"
	"fmt"
	"sync"
	"testing"

	"github.com/kmsgate/kmsgate/appliance"
	"github.com/kmsgate/kmsgate/internal/apptest"
)

// TestKeyQuotaAcrossFaces: /keys keys and key-chain keys share one per-tenant quota. Concurrent
// creates stop exactly at the quota (403 quota_exceeded), a slot freed on one face is usable on
// the other, and one freed slot admits exactly one of many concurrent creates.
func TestKeyQuotaAcrossFaces(t *testing.T) {
	const quota = 12
	in := apptest.Start(t, apptest.Options{Tweak: func(o *appliance.Options) {
		o.MaxKeysPerTenant = quota
		o.CreateRate = -1 // the per-credential rate limit is not under test
	}})
	key := in.CreateTenant("acme")
	other := in.CreateTenant("other")

	type result struct {
		status int
		code   string
		kid    string
	}
	burst := func(n int, prefix string) []result {
		out := make([]result, n)
		var wg sync.WaitGroup
		for i := range n {
			wg.Add(1)
			go func() {
				defer wg.Done()
				kid := fmt.Sprintf("%s-%d", prefix, i)
				st, body := in.Do("POST", "/keys", key, map[string]string{"kid": kid})
				var p struct{ Code string }
				json.Unmarshal(body, &p)
				out[i] = result{st, p.Code, kid}
			}()
		}
		wg.Wait()
		return out
	}
	count := func(rs []result) (ok int, kids []string) {
		for _, r := range rs {
			switch {
			case r.status == 200:
				ok++
				kids = append(kids, r.kid)
			case r.status == 403 && r.code == "quota_exceeded":
			default:
				t.Fatalf("create %s: %d %s, want 200 or 403 quota_exceeded", r.kid, r.status, r.code)
			}
		}
		return ok, kids
	}

	// The tenant bootstrap already made some key-chain keys; the burst fills the rest.
	created, kids := count(burst(30, "burst"))
	if created == 0 || created >= quota {
		t.Fatalf("%d of 30 creates succeeded, want between 1 and %d", created, quota-1)
	}
	if r := burst(3, "full"); func() int { n, _ := count(r); return n }() != 0 {
		t.Fatal("creates succeed beyond the quota")
	}
	chain := map[string]any{"usageType": "access", "type": "standalone"}
	if st, body := in.Do("POST", "/key-chain", key, chain); st != 403 || !jsonHasCode(body, "quota_exceeded") {
		t.Fatalf("key-chain create at the quota: %d %s, want 403 quota_exceeded", st, body)
	}
	// Another tenant is not limited by acme's keys.
	if st, body := in.Do("POST", "/keys", other, map[string]string{"kid": "k"}); st != 200 {
		t.Fatalf("other tenant: %d %s", st, body)
	}

	// A slot freed on the /keys face is taken by a key chain...
	if st, body := in.Do("DELETE", "/keys/"+kids[0], key, nil); st != 200 && st != 204 {
		t.Fatalf("delete: %d %s", st, body)
	}
	st, body := in.Do("POST", "/key-chain", key, chain)
	if st != 201 {
		t.Fatalf("key-chain create after freeing a slot: %d %s", st, body)
	}
	var c struct{ ID string }
	json.Unmarshal(body, &c)
	if n, _ := count(burst(3, "after-chain")); n != 0 {
		t.Fatal("the key chain's key was not counted")
	}
	// ...and the slot the chain frees admits exactly one of many concurrent creates.
	if st, body := in.Do("DELETE", "/key-chain/"+c.ID, key, nil); st != 200 && st != 204 {
		t.Fatalf("delete chain: %d %s", st, body)
	}
	if n, _ := count(burst(10, "race")); n != 1 {
		t.Fatalf("%d of 10 concurrent creates took one free slot", n)
	}
}

func jsonHasCode(body []byte, code string) bool {
	var p struct{ Code string }
	return json.Unmarshal(body, &p) == nil && p.Code == code
}
