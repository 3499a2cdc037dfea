package hsm

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/kmsgate/kmsgate/internal/testenv"
)

func TestListSlots(t *testing.T) {
	env := testenv.NewSoftHSM(t, 2)
	reports, err := ListSlots(env.Library)
	if err != nil {
		t.Fatal(err)
	}
	found := 0
	for _, r := range reports {
		for _, tok := range env.Tokens {
			if r.Label == tok.Label {
				found++
				if !r.TokenPresent || r.Index < 0 || !r.ECKeyPairGen || !r.ECDSA || r.Serial == "" || !strings.Contains(strings.Join(r.Flags, ","), "initialized") {
					t.Errorf("report for %s: %+v", tok.Label, r)
				}
			}
		}
	}
	if found != 2 {
		t.Fatalf("found %d of 2 tokens in %+v", found, reports)
	}
}

// TestDiagnose is the logic behind "kmsgate doctor": each common failure stops at the right step
// with a fix, and the PIN never appears.
func TestDiagnose(t *testing.T) {
	env := testenv.NewSoftHSM(t, 2)
	const pin = "424242-not-it"
	b, err := os.ReadFile(env.Library)
	if err != nil {
		t.Fatal(err)
	}
	b[18], b[19] = 0xb7, 0x00 // e_machine = EM_AARCH64
	armLib := filepath.Join(t.TempDir(), "libarm.so")
	if err := os.WriteFile(armLib, b, 0o600); err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name     string
		cfg      Config
		failStep string
		want     string
	}{
		{"ok", Config{Library: env.Library, Slot: env.Tokens[0].Label, PIN: env.Tokens[0].PIN}, "", ""},
		{"wrong path", Config{Library: "/opt/vendor/lib/libnope.so", Slot: "0", PIN: pin}, "library loads", "does not exist"},
		{"wrong architecture", Config{Library: armLib, Slot: "0", PIN: pin}, "library loads", "wrong architecture"},
		// SoftHSM2 always offers one more, uninitialised token after the initialised ones.
		{"token not initialised", Config{Library: env.Library, Slot: "2", PIN: pin}, "slot resolves", "not initialised"},
		{"label typo", Config{Library: env.Library, Slot: "kmsgate-test-00", PIN: pin}, "slot resolves", "no initialised token labelled"},
		{"wrong pin", Config{Library: env.Library, Slot: env.Tokens[1].Label, PIN: pin}, "login works", "wrong PIN"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			checks := Diagnose(context.Background(), c.cfg)
			if len(checks) != 4 {
				t.Fatalf("%d checks: %+v", len(checks), checks)
			}
			for _, ch := range checks {
				if strings.Contains(ch.Detail+ch.Fix, pin) {
					t.Fatalf("PIN leaked in %+v", ch)
				}
				if !ch.OK && c.failStep == "" {
					t.Fatalf("unexpected failure %+v", ch)
				}
			}
			if c.failStep == "" {
				return
			}
			var failed *Check
			for i := range checks {
				if !checks[i].OK {
					failed = &checks[i]
					break
				}
			}
			if failed == nil || failed.Name != c.failStep || !strings.Contains(failed.Detail, c.want) || failed.Fix == "" {
				t.Fatalf("first failure = %+v, want step %q with %q and a fix", failed, c.failStep, c.want)
			}
		})
	}
}
