package pkcs11

import (
	"context"
	"testing"
	"time"

	"github.com/kmsgate/kmsgate/internal/errs"
	"github.com/kmsgate/kmsgate/internal/keyutil"
	"github.com/kmsgate/kmsgate/internal/testenv"
	"github.com/kmsgate/kmsgate/providers"
)

// TestProviderRecovery checks the contract face of a token failure: requests during the outage
// are KindUnavailable (503) with a retry hint, health goes false and comes back without a new
// provider. The failure is injected by a shim around SoftHSM2 because SoftHSM2 cannot fail on
// demand (see internal/testenv); hsm's TestRecoveryUnderLoad covers the same under load.
func TestProviderRecovery(t *testing.T) {
	env := testenv.NewSoftHSM(t, 1)
	shim := testenv.BuildFaultShim(t, env.Library)
	p := newProvider(t, cfgFor(t, "hsm", map[string]any{"library": shim.Library, "slot": 0, "pin": env.Tokens[0].PIN, "poolSize": 2}))
	ctx := context.Background()
	ref, err := p.Generate(ctx, providers.KeySpec{KID: "k"})
	if err != nil {
		t.Fatal(err)
	}
	shim.Fail(t)
	_, err = p.SignMessage(ctx, ref, "ES256", []byte("during"))
	if errs.KindOf(err) != errs.Unavailable || errs.RetryAfterOf(err) == 0 {
		t.Fatalf("sign during outage: %v (kind %v)", err, errs.KindOf(err))
	}
	if h := p.Health(ctx); h.OK {
		t.Fatal("health ok during outage")
	}
	start := time.Now()
	shim.Recover(t)
	for !p.Health(ctx).OK {
		if time.Since(start) > 10*time.Second {
			t.Fatalf("provider did not recover: %v", p.LastError())
		}
		time.Sleep(5 * time.Millisecond)
	}
	t.Logf("provider healthy again %v after the token came back", time.Since(start))
	sig, err := p.SignMessage(ctx, ref, "ES256", []byte("after"))
	if err != nil || !keyutil.VerifyRaw(ref.Public, []byte("after"), sig) {
		t.Fatalf("sign after recovery: %v", err)
	}
}
