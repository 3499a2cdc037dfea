package appliance_test

import (
	"slices"
	"testing"

	"github.com/kmsgate/kmsgate/appliance"
)

// The catalog is derived from the provider packages' tagged config structs: each type's secrets
// must be there without a central list.
func TestProviderCatalogNamesEveryTypeAndItsSecrets(t *testing.T) {
	cat := appliance.ProviderCatalog()
	want := map[string][]string{
		"db":      nil,
		"pkcs11":  {"pin"},
		"vault":   {"vaultToken"},
		"aws-kms": {"accessKeyId", "secretAccessKey"},
		"http":    {"apiKey", "clientSecret", "token"},
	}
	if len(cat) != len(want) {
		t.Fatalf("catalog types = %v, want %v", cat, want)
	}
	for typ, secrets := range want {
		got, ok := cat[typ]
		if !ok {
			t.Errorf("type %q missing from the catalog", typ)
			continue
		}
		for _, s := range secrets {
			if !slices.Contains(got, s) {
				t.Errorf("type %q: secret field %q not marked (got %v)", typ, s, got)
			}
		}
	}
}
