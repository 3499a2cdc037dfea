package appliance_test

import (
	"context"
	"sync"
	"testing"

	"github.com/kmsgate/kmsgate/appliance"
	"github.com/kmsgate/kmsgate/appliance/authn"
	"github.com/kmsgate/kmsgate/appliance/tenants"
	"github.com/kmsgate/kmsgate/internal/apptest"
	"github.com/kmsgate/kmsgate/internal/testenv"
)

// TestOAuthReplicas: three replicas started at once on one PostgreSQL store create one system key
// between them; a token from any replica works on every other; revoking the client through one
// replica refuses its tokens on the others within a second; a rotation through one replica keeps
// old tokens valid everywhere and new tokens (new kid) are accepted everywhere.
func TestOAuthReplicas(t *testing.T) {
	testenv.NeedsBackend(t, "postgres")
	dsn := testenv.PostgresDSN(t)
	r := make([]*apptest.Instance, 3)
	var wg sync.WaitGroup
	for i := range r {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r[i] = apptest.Start(t, apptest.Options{Tweak: func(o *appliance.Options) {
				o.Store = dsn
				o.CacheRefreshInterval = -1
			}})
		}()
	}
	wg.Wait()
	waitListeners(t, dsn, len(r))
	kid := r[0].App.Tokens().Keys().ActiveKID()
	for i, in := range r {
		set := fetchJWKS(t, in)
		if len(set.Keys) != 1 || set.Keys[0].KeyID != kid {
			t.Fatalf("replica %d publishes %+v, replica 1 signs with %q", i+1, set.Keys, kid)
		}
	}
	if n := countSystemKeys(t, r[0]); n != 1 {
		t.Fatalf("%d system keys owned after a concurrent start, want 1 (the losers delete theirs)", n)
	}

	apiKey := r[0].CreateTenant("acme")
	id := credentialID(apiKey)
	if st, body := r[0].Do("POST", "/keys", apiKey, map[string]string{"kid": "k1"}); st != 200 {
		t.Fatalf("create: %d %s", st, body)
	}
	tokens := make([]string, len(r))
	for i, in := range r {
		st, out := eudiploTokenFetch(t, in.URL+"/api/oauth2/token", id, apiKey)
		if st != 201 {
			t.Fatalf("token from replica %d: %d %v", i+1, st, out)
		}
		tokens[i] = out["access_token"].(string)
	}
	for i, tok := range tokens {
		for j, in := range r {
			if st := signStatus(in, tok, "k1"); st != 200 {
				t.Fatalf("token of replica %d on replica %d: %d", i+1, j+1, st)
			}
		}
	}

	// Rotation through replica 2: old tokens still work everywhere, new ones too.
	newKID, err := r[1].App.Tokens().Keys().Rotate(context.Background())
	if err != nil || newKID == kid {
		t.Fatalf("rotate: %q %v", newKID, err)
	}
	for j, in := range r {
		until(t, "rotation published", func() bool {
			set := fetchJWKS(t, in)
			return len(set.Keys) == 2 && set.Keys[0].KeyID == newKID && set.Keys[1].KeyID == kid
		})
		if st := signStatus(in, tokens[0], "k1"); st != 200 {
			t.Fatalf("pre-rotation token on replica %d: %d", j+1, st)
		}
	}
	st, out := eudiploTokenFetch(t, r[2].URL+"/oauth2/token", id, apiKey)
	if st != 200 {
		t.Fatalf("token after rotation: %d %v", st, out)
	}
	rotated := out["access_token"].(string)
	for j, in := range r {
		if st := signStatus(in, rotated, "k1"); st != 200 {
			t.Fatalf("post-rotation token on replica %d: %d", j+1, st)
		}
	}

	// Revocation through replica 1 refuses the client's tokens on replicas 2 and 3 within 1 s.
	if _, err := r[0].App.Tenants().Revoke(context.Background(), id, tenants.RevokeCredential); err != nil {
		t.Fatal(err)
	}
	for j, in := range r[1:] {
		d := until(t, "token of the revoked client refused", func() bool { return signStatus(in, rotated, "k1") == 401 })
		t.Logf("replica %d refuses the revoked client's token after %v", j+2, d)
	}
	if st := signStatus(r[0], tokens[1], "k1"); st != 401 {
		t.Fatalf("replica 1 accepts a token of its revoked client: %d", st)
	}
	// A second rotation deletes the key before the previous one: two system keys remain.
	if _, err := r[0].App.Tokens().Keys().Rotate(context.Background()); err != nil {
		t.Fatal(err)
	}
	if n := countSystemKeys(t, r[0]); n != 2 {
		t.Fatalf("%d system keys after two rotations, want 2 (active and previous)", n)
	}
}

// countSystemKeys counts the owned-key records of the system namespace.
func countSystemKeys(t *testing.T, in *apptest.Instance) int {
	t.Helper()
	n, err := in.App.KeyCount(context.Background(), authn.SystemTenant)
	if err != nil {
		t.Fatal(err)
	}
	return int(n)
}
