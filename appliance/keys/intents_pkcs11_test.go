package keys_test

import (
	"context"
	"encoding/json"
	"testing"
	"time"

	"github.com/kmsgate/kmsgate/appliance/keys"
	"github.com/kmsgate/kmsgate/appliance/store"
	"github.com/kmsgate/kmsgate/internal/errs"
	"github.com/kmsgate/kmsgate/internal/testenv"
	"github.com/kmsgate/kmsgate/providers"
	"github.com/kmsgate/kmsgate/providers/pkcs11"
)

type oneProvider struct{ p providers.Provider }

func (o oneProvider) Get(id string) (providers.Provider, error) {
	if id != o.p.ID() {
		return nil, errs.Errorf(errs.NotFound, "no provider %q", id)
	}
	return o.p, nil
}

func openHSM(t *testing.T, env *testenv.SoftHSM) *pkcs11.Provider {
	t.Helper()
	raw, _ := json.Marshal(map[string]any{"id": "hsm", "type": "pkcs11", "library": env.Library, "slot": 0,
		"pin": env.Tokens[0].PIN, "poolSize": 2})
	p, err := pkcs11.New(context.Background(), providers.Config{ID: "hsm", Type: "pkcs11", Raw: raw}, nil)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// A process that dies after the token generated a key pair leaves an intent naming the pair's
// CKA_ID; the next process's sweep finds the objects on the token by it and destroys them.
func TestSweepDestroysPKCS11Objects(t *testing.T) {
	env := testenv.NewSoftHSM(t, 1)
	ctx := context.Background()
	st, err := store.Open(t.TempDir(), store.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()

	// The first process: intent, key pair on the token, then the crash (no commit, no rollback).
	first := openHSM(t, env)
	ref, err := keys.NewLifecycleWith(keys.LifecycleConfig{Store: st}).Begin().
		Generate(ctx, first, providers.KeySpec{Tenant: "t1", KID: "orphan"})
	if err != nil {
		t.Fatal(err)
	}
	var in keys.Intent
	st.List(ctx, "intent/", func(_ string, v []byte) error { return json.Unmarshal(v, &in) })
	if in.ExternalID == "" || in.ExternalID != ref.ExternalID || in.ProviderID != "hsm" {
		t.Fatalf("intent %+v does not name the key's CKA_ID %s", in, ref.ExternalID)
	}
	first.Close()

	// The restarted process, with a fresh session pool and handle cache.
	second := openHSM(t, env)
	defer second.Close()
	if _, err := second.PublicKey(ctx, ref); err != nil {
		t.Fatalf("the orphaned pair is not on the token: %v", err)
	}
	clk := &clock{t: time.Now().Add(time.Hour)}
	var log sweepLog
	lc := keys.NewLifecycleWith(keys.LifecycleConfig{Store: st, Now: clk.now})
	if n, err := lc.Sweep(ctx, oneProvider{second}, 2*time.Minute, log.observe); err != nil || n != 1 {
		t.Fatalf("sweep: %d %v", n, err)
	}
	if len(log.got) != 1 || log.got[0] != "pkcs11/deleted" {
		t.Fatalf("observed %v, want [pkcs11/deleted]", log.got)
	}
	// A third session looks for the objects by CKA_ID and label: both halves are gone.
	third := openHSM(t, env)
	defer third.Close()
	if _, err := third.PublicKey(ctx, ref); errs.KindOf(err) != errs.NotFound {
		t.Fatalf("public key after the sweep: %v, want not found", err)
	}
	if _, err := third.SignDigest(ctx, ref, providers.ES256, make([]byte, 32)); errs.KindOf(err) != errs.NotFound {
		t.Fatalf("private key after the sweep: %v, want not found", err)
	}
}
