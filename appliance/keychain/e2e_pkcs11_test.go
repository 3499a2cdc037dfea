package keychain_test

import (
	"fmt"
	"testing"

	"github.com/kmsgate/kmsgate/internal/testenv"
)

// TestChainSuitePKCS11 re-runs the provider-agnostic suite with a SoftHSM2 token as the default
// provider: certificates signed inside the HSM, import answered with 405, rotated-out and deleted
// keys checked gone from the token. A missing SoftHSM2 fails the test (see testenv.NewSoftHSM).
func TestChainSuitePKCS11(t *testing.T) {
	env := testenv.NewSoftHSM(t, 1)
	kms := fmt.Sprintf(`{"defaultProvider":"hsm","providers":[{"id":"db","type":"db"},`+
		`{"id":"hsm","type":"pkcs11","library":%q,"slot":0,"pin":%q}]}`, env.Library, env.Tokens[0].PIN)
	RunChainSuite(t, kms, "hsm")
}
