package hsm

import (
	"os"
	"testing"
)

// TestMain exits with the tests' own status through os.Exit. SoftHSM2 linked against OpenSSL 3
// can crash in its atexit handlers after C_Finalize (field notes §3.1); the tests' verdict is
// already decided then, and any crash *during* a test still fails it, so no real failure is
// hidden.
func TestMain(m *testing.M) {
	os.Exit(m.Run())
}
