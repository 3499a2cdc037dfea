package appliance_test

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/kmsgate/kmsgate/appliance"
	"github.com/kmsgate/kmsgate/internal/apptest"
)

// TestAuthJSONAtStartup: auth.json is read at start-up; its placeholders are expanded from the
// environment and a bad file stops the appliance with an error naming the file.
func TestAuthJSONAtStartup(t *testing.T) {
	cfg := t.TempDir()
	doc := `{"issuers":[{"issuer":"${IDP}","jwksUrl":"https://idp.example/certs","audience":"kmsgate",
	  "algorithms":["RS256"],"tenantClaim":"tenant","rolesClaim":"scope"}]}`
	if err := os.WriteFile(filepath.Join(cfg, "auth.json"), []byte(doc), 0o600); err != nil {
		t.Fatal(err)
	}
	a := openAppliance(t, func(o *appliance.Options) {
		o.ConfigDir = cfg
		o.Lookup = func(k string) (string, bool) {
			if k == "IDP" {
				return "https://idp.example/realms/eudiplo", true
			}
			return "", false
		}
	})
	if got := a.ExternalTokens().Issuers(); !slices.Equal(got, []string{"https://idp.example/realms/eudiplo"}) {
		t.Fatalf("trusted issuers = %v", got)
	}
	if err := os.WriteFile(filepath.Join(cfg, "auth.json"), []byte(strings.Replace(doc, `"RS256"`, `"HS256"`, 1)), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err := appliance.Open(context.Background(), appliance.Options{ConfigDir: cfg, DataDir: t.TempDir(),
		MasterKeyEnv: apptest.MasterKey, Lookup: func(string) (string, bool) { return "https://x.example", true }})
	if err == nil || !strings.Contains(err.Error(), "auth.json") || !strings.Contains(err.Error(), "HS256") {
		t.Fatalf("Open with an HS256 issuer = %v, want a refusal naming auth.json and HS256", err)
	}
}
