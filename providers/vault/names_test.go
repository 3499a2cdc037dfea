package vault

import (
	"regexp"
	"testing"
)

// Vault's transit key-name pattern (framework.GenericNameRegex).
var vaultName = regexp.MustCompile(`^\w(([\w-.]+)?\w)?$`)

func TestEncodeNameInjectiveAndSafe(t *testing.T) {
	inputs := []string{"a", "a/b", "a_2Fb", "a_b", "a-b", "-a", "a-", ".", "..", "chain-1-active", "ü", "a b", "_", "__", "a.b", "%2F", ""}
	seen := map[string]string{}
	for _, in := range inputs {
		out := encodeName(in)
		if in != "" && !vaultName.MatchString(out) {
			t.Errorf("encodeName(%q) = %q is not a valid Vault name", in, out)
		}
		if prev, dup := seen[out]; dup {
			t.Errorf("encodeName collides: %q and %q both give %q", prev, in, out)
		}
		seen[out] = in
	}
	if got := encodeName("chain-1-active"); got != "chain-1-active" {
		t.Errorf("common kids should stay readable, got %q", got)
	}
}

func FuzzEncodeNameInjective(f *testing.F) {
	f.Add("a/b", "a_2Fb")
	f.Add("x", "x")
	f.Fuzz(func(t *testing.T, a, b string) {
		if a != b && encodeName(a) == encodeName(b) {
			t.Fatalf("%q and %q collide as %q", a, b, encodeName(a))
		}
		if a != "" && !vaultName.MatchString(encodeName(a)) {
			t.Fatalf("encodeName(%q) = %q is not a valid Vault name", a, encodeName(a))
		}
	})
}

func TestSplitExternalID(t *testing.T) {
	m, k, ok := splitExternalID("team/a/kmsgate-t1/key_2F1")
	if !ok || m != "team/a/kmsgate-t1" || k != "key_2F1" {
		t.Fatalf("got %q %q %v", m, k, ok)
	}
	for _, bad := range []string{"", "nokey", "/k", "m/"} {
		if _, _, ok := splitExternalID(bad); ok {
			t.Errorf("splitExternalID(%q) accepted", bad)
		}
	}
}
