package pkcs11

import (
	"os"
	"testing"
)

// TestMain exits with the tests' own status through os.Exit. SoftHSM2 linked against OpenSSL 3
// can crash in its exit handlers after C_Finalize (field notes §3.1); a crash during a test still
// fails that test, so no real failure is hidden.
func TestMain(m *testing.M) {
	os.Exit(m.Run())
}
