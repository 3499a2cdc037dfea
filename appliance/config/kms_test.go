package config

import (
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func env(m map[string]string) LookupFunc {
	return func(k string) (string, bool) { v, ok := m[k]; return v, ok }
}

func TestExpandString(t *testing.T) {
	e := env(map[string]string{"A": "alpha", "B": "beta", "EMPTY": "", "NESTED": "${A}"})
	cases := []struct{ in, want, errVar string }{
		{"plain", "plain", ""},
		{"${A}", "alpha", ""},
		{"x-${A}-${B}-y", "x-alpha-beta-y", ""},
		{"${MISSING:fallback}", "fallback", ""},
		{"${MISSING:}", "", ""},
		{"${A:unused}", "alpha", ""},
		{"${EMPTY:def}", "def", ""},
		{"${NESTED}", "${A}", ""}, // one pass: a value is never re-expanded
		{"${CLOUD_USER:u}:${CLOUD_PASS:p}", "u:p", ""},
		{"${MISSING}", "", "MISSING"},
		{"${EMPTY}", "", "EMPTY"},
		{"${not a name}", "${not a name}", ""},
		{"unterminated ${A", "unterminated ${A", ""},
		{"$A {A}", "$A {A}", ""},
	}
	for _, c := range cases {
		got, err := ExpandString(c.in, e)
		if c.errVar != "" {
			var ue *UnsetVarError
			if !errors.As(err, &ue) || ue.Name != c.errVar {
				t.Errorf("%q: want unset-variable error for %s, got %v (%q)", c.in, c.errVar, err, got)
			}
			continue
		}
		if err != nil || got != c.want {
			t.Errorf("%q: got %q, %v; want %q", c.in, got, err, c.want)
		}
	}
}

func TestParseKMSPlaceholdersAndDefaults(t *testing.T) {
	src := `{"defaultProvider":"${DEF:main-vault}","providers":[
	  {"id":"main-vault","type":"vault","vaultUrl":"${VAULT_URL}","vaultToken":"${VAULT_TOKEN}"},
	  {"id":"hsm","type":"pkcs11","library":"/usr/lib/softhsm/libsofthsm2.so","slot":0,"pin":"${HSM_USER:cu}:${HSM_PASS}","readOnly":false}]}`
	k, err := ParseKMS([]byte(src), env(map[string]string{"VAULT_URL": "http://127.0.0.1:8200", "VAULT_TOKEN": "s.secret",
		"HSM_PASS": "1234"}), testCatalog)
	if err != nil {
		t.Fatal(err)
	}
	if k.DefaultProvider != "main-vault" {
		t.Errorf("defaultProvider = %q", k.DefaultProvider)
	}
	if len(k.Providers) != 3 || k.Providers[2].ID != "db" {
		t.Fatalf("db must always be added: %+v", k.Providers)
	}
	var hsm map[string]any
	if err := json.Unmarshal(k.Providers[1].Raw, &hsm); err != nil {
		t.Fatal(err)
	}
	if hsm["pin"] != "cu:1234" || hsm["slot"] != float64(0) || hsm["readOnly"] != false {
		t.Errorf("expanded entry wrong: %v", hsm)
	}
	red, err := k.Redacted()
	if err != nil {
		t.Fatal(err)
	}
	for _, secret := range []string{"s.secret", "cu:1234"} {
		if strings.Contains(string(red), secret) {
			t.Errorf("redacted config leaks %q:\n%s", secret, red)
		}
	}
	if !strings.Contains(string(red), "http://127.0.0.1:8200") || !strings.Contains(string(red), "<redacted>") {
		t.Errorf("redacted config lost non-secret values or markers:\n%s", red)
	}
}

func TestParseKMSErrors(t *testing.T) {
	cases := []struct{ name, src, wantSub string }{
		{"unknown top-level field", `{"providers":[],"defaultProvider":"db","extra":1}`, `unknown field "extra"`},
		{"duplicate id", `{"providers":[{"id":"a","type":"db"},{"id":"a","type":"db"}]}`, `duplicate provider id "a"`},
		{"unknown type", `{"providers":[{"id":"x","type":"azure-kv"}]}`, `unknown type "azure-kv"`},
		{"missing id", `{"providers":[{"type":"db"}]}`, `"id" is required`},
		{"missing type", `{"providers":[{"id":"x"}]}`, `"type" is required`},
		{"default names nothing", `{"defaultProvider":"nope","providers":[{"id":"a","type":"db"}]}`, `defaultProvider: "nope" names no configured provider`},
		{"unset var names provider", `{"providers":[{"id":"v1","type":"vault","vaultUrl":"${NOPE_URL}"}]}`, `provider "v1": field vaultUrl: environment variable NOPE_URL is not set`},
		{"db id reserved", `{"providers":[{"id":"db","type":"vault"}]}`, `reserved`},
		{"not json", `{"providers":`, `invalid kms.json`},
		{"trailing data", `{"providers":[]} {}`, `trailing data`},
		{"description type", `{"providers":[{"id":"a","type":"db","description":5}]}`, `"description" must be a string`},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := ParseKMS([]byte(c.src), env(nil), testCatalog)
			if err == nil || !strings.Contains(err.Error(), c.wantSub) {
				t.Fatalf("want error containing %q, got %v", c.wantSub, err)
			}
		})
	}
}

func TestLoadKMSMissingFileIsDefault(t *testing.T) {
	k, err := LoadKMS(t.TempDir(), env(nil), testCatalog)
	if err != nil {
		t.Fatal(err)
	}
	if k.DefaultProvider != "db" || len(k.Providers) != 1 || k.Providers[0].Type != "db" || k.Source != "" {
		t.Fatalf("default config wrong: %+v", k)
	}
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, FileName), []byte(`{"providers":[{"id":"x","type":"nope"}]}`), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := LoadKMS(dir, env(nil), testCatalog); err == nil || !strings.Contains(err.Error(), filepath.Join(dir, FileName)) {
		t.Fatalf("error must name the file: %v", err)
	}
}

// testCatalog stands in for the composition root's provider table (appliance.ProviderCatalog,
// tested there against the real provider packages).
var testCatalog = Catalog{"db": nil, "pkcs11": {"pin"}, "vault": {"vaultToken"},
	"aws-kms": {"accessKeyId", "secretAccessKey"}, "http": {"apiKey", "clientSecret", "token"}}

func TestRedactedUsesTheCatalogAndHidesURLCredentials(t *testing.T) {
	cat := Catalog{"db": nil, "newkms": {"signingSecret"}}
	src := `{"providers":[{"id":"n","type":"newkms","signingSecret":"s3cr3t-value",
	  "nested":{"signingSecret":"nested-s3cr3t"},
	  "endpoint":"https://admin:pa55word@kms.example:8443/v1?token=qu3ry-s3cr3t&region=eu",
	  "mirror":"https://only-user-t0ken@mirror.example/","plain":"https://kms.example/v1"}]}`
	k, err := ParseKMS([]byte(src), env(nil), cat)
	if err != nil {
		t.Fatal(err)
	}
	red, err := k.Redacted()
	if err != nil {
		t.Fatal(err)
	}
	for _, secret := range []string{"s3cr3t-value", "nested-s3cr3t", "pa55word", "qu3ry-s3cr3t", "only-user-t0ken"} {
		if strings.Contains(string(red), secret) {
			t.Errorf("redacted config leaks %q:\n%s", secret, red)
		}
	}
	for _, kept := range []string{"https://admin:<redacted>@kms.example:8443/v1?", "region=<redacted>",
		"https://<redacted>@mirror.example/", "https://kms.example/v1"} {
		if !strings.Contains(string(red), kept) {
			t.Errorf("redacted config lost %q:\n%s", kept, red)
		}
	}
	if _, err := ParseKMS([]byte(`{"providers":[{"id":"x","type":"vault"}]}`), env(nil), cat); err == nil ||
		!strings.Contains(err.Error(), "known: db, newkms") {
		t.Errorf("unknown type error does not name the catalog's types: %v", err)
	}
}
