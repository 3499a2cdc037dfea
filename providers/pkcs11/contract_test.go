package pkcs11

import (
	"testing"

	"github.com/kmsgate/kmsgate/internal/testenv"
	"github.com/kmsgate/kmsgate/providers"
	"github.com/kmsgate/kmsgate/providers/providertest"
)

// TestSharedContract runs the provider contract suite every backend must pass against SoftHSM2.
// The library is loaded through the fault shim so the suite can take the "HSM" down and bring it
// back for its health checks: SoftHSM2 itself cannot be switched off on demand (the shim only
// forwards to it while no fault is set).
func TestSharedContract(t *testing.T) {
	env := testenv.NewSoftHSM(t, 1)
	shim := testenv.BuildFaultShim(t, env.Library)
	r := providertest.Run(t, providertest.Harness{
		New: func(t *testing.T) providers.Provider {
			p, err := New(t.Context(), cfgFor(t, "hsm", map[string]any{"library": shim.Library, "slot": env.Tokens[0].Label,
				"pin": env.Tokens[0].PIN, "acquireTimeout": "2s"}), nil)
			if err != nil {
				t.Fatal(err)
			}
			return p
		},
		TenantScoped: true,
		MissingRef: func(spec providers.KeySpec) providers.KeyRef {
			return providers.KeyRef{ProviderID: "hsm", Tenant: spec.Tenant, KID: spec.KID, Alg: spec.Alg,
				ExternalID: "00112233445566778899aabbccddeeff"}
		},
		StopBackend:  func(t *testing.T) { shim.Fail(t) },
		StartBackend: func(t *testing.T) { shim.Recover(t) },
	})
	t.Logf("pkcs11 (SoftHSM2): p50 sequential %v, p50 at 16 concurrent %v", r.P50Sequential, r.P50Concurrent)
}
