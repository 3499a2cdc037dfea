package testenv

import (
	"os"
	"os/exec"
	"testing"
)

// NeedsBackend marks a test that needs a real backend or external tool: "softhsm2" (the module and
// softhsm2-util), "vault", "local-kms", "postgres" (the server binaries), or the name of a program looked up on PATH ("openssl",
// "promtool", "systemd-analyze", "dpkg-deb", "curl", "jq", "gcc", …).
//
// Under `go test -short` the test is skipped: -short is the documented unit-test mode (no backends
// installed), and this is the one place a test may skip. Without -short a missing dependency fails
// the test with an install hint, so `make test`, which never passes -short, can never turn a broken
// test environment into a green run.
func NeedsBackend(t testing.TB, name string) {
	t.Helper()
	if testing.Short() {
		t.Skipf("-short: needs %s (run `make test` for the backend tests)", name)
	}
	switch name {
	case "softhsm2":
		if _, err := os.Stat(SoftHSMLibrary); err != nil {
			t.Fatalf("%s not found (%v). %s", SoftHSMLibrary, err, installHint)
		}
		if _, err := exec.LookPath("softhsm2-util"); err != nil {
			t.Fatalf("softhsm2-util not on PATH. %s", installHint)
		}
	case "vault":
		VaultBinary(t)
	case "local-kms":
		LocalKMSBinary(t)
	case "postgres":
		PostgresBinDir(t)
	default:
		if _, err := exec.LookPath(name); err != nil {
			t.Fatalf("%s is required by this test but is not on PATH (tools/setup-test-env.sh installs every test dependency)", name)
		}
	}
}
