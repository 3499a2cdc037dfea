package tenants_test

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/kmsgate/kmsgate/appliance/store"
	"github.com/kmsgate/kmsgate/appliance/tenants"
	"github.com/kmsgate/kmsgate/internal/errs"
)

func newService(t *testing.T, opts ...tenants.Option) (*tenants.Service, *store.Store) {
	t.Helper()
	st, err := store.Open(t.TempDir(), store.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	s, err := tenants.New(context.Background(), st, opts...)
	if err != nil {
		t.Fatal(err)
	}
	return s, st
}

func known(ids ...string) tenants.Option {
	return tenants.WithProviders(func() ([]string, error) { return ids, nil })
}

func TestCreateAuthenticateRevoke(t *testing.T) {
	ctx := context.Background()
	s, st := newService(t)
	res, err := s.CreateTenant(ctx, tenants.CreateTenantRequest{ID: "acme"})
	if err != nil {
		t.Fatal(err)
	}
	if res.Name != "acme" || strings.Join(res.Roles, ",") != "manage,sign" || !strings.HasPrefix(res.APIKey, "kmsgate_") {
		t.Fatalf("create: %+v", res)
	}
	p, err := s.Authenticate(res.APIKey)
	if err != nil || p.TenantID != "acme" || !p.Has(tenants.RoleSign) || p.Has(tenants.RoleExport) {
		t.Fatalf("authenticate: %+v %v", p, err)
	}
	if _, err := s.CreateTenant(ctx, tenants.CreateTenantRequest{ID: "acme"}); !errors.Is(err, tenants.ErrTenantExists) {
		t.Fatalf("second create: %v, want ErrTenantExists", err)
	}
	last := "A"
	if strings.HasSuffix(res.APIKey, "A") {
		last = "B"
	}
	for _, bad := range []string{"", res.APIKey + "x", res.APIKey[:len(res.APIKey)-1] + last, "kmsgate_short_x",
		strings.Replace(res.APIKey, "kmsgate_", "other_", 1)} {
		if _, err := s.Authenticate(bad); !errors.Is(err, tenants.ErrUnauthenticated) {
			t.Errorf("Authenticate(%q) = %v, want ErrUnauthenticated", bad, err)
		}
	}
	// Only the hash is stored: the secret half appears nowhere in the store.
	secret := res.APIKey[strings.LastIndex(res.APIKey, "_")+1:]
	_ = st.List(ctx, "", func(k string, v []byte) error {
		if strings.Contains(string(v), secret) {
			t.Errorf("record %s holds the API key's secret", k)
		}
		return nil
	})

	second, err := s.AddKey(ctx, "acme", []string{tenants.RoleSign}, "ci")
	if err != nil {
		t.Fatal(err)
	}
	if p, err := s.Authenticate(second.Key); err != nil || p.Has(tenants.RoleManage) || p.CredentialID != second.CredentialID {
		t.Fatalf("sign-only key: %+v %v", p, err)
	}
	ids, err := s.Revoke(ctx, second.CredentialID, tenants.RevokeAny)
	if err != nil || len(ids) != 1 {
		t.Fatalf("revoke one credential: %v %v", ids, err)
	}
	if _, err := s.Authenticate(second.Key); !errors.Is(err, tenants.ErrUnauthenticated) {
		t.Fatal("revoked credential still authenticates")
	}
	if _, err := s.Authenticate(res.APIKey); err != nil {
		t.Fatalf("revoking one credential revoked another: %v", err)
	}
	if ids, err := s.Revoke(ctx, "acme", tenants.RevokeAny); err != nil || len(ids) != 1 {
		t.Fatalf("revoke tenant: %v %v", ids, err)
	}
	if _, err := s.Authenticate(res.APIKey); !errors.Is(err, tenants.ErrUnauthenticated) {
		t.Fatal("credential of a revoked tenant still authenticates")
	}
	if _, err := s.Revoke(ctx, "nobody", tenants.RevokeAny); !errors.Is(err, tenants.ErrCredNotFound) {
		t.Fatalf("revoke unknown: %v, want ErrCredNotFound", err)
	}

	// A fresh service over the same store sees the revocations.
	s2, err := tenants.New(ctx, st)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s2.Authenticate(res.APIKey); !errors.Is(err, tenants.ErrUnauthenticated) {
		t.Fatal("revocation lost on reload")
	}
}

func TestRolesAndIDs(t *testing.T) {
	ctx := context.Background()
	s, _ := newService(t)
	for _, c := range []struct {
		req tenants.CreateTenantRequest
		ok  bool
	}{
		{tenants.CreateTenantRequest{ID: "a", Roles: []string{"manage", "sign", "export"}}, true},
		{tenants.CreateTenantRequest{ID: "b", Roles: []string{"admin"}}, false},
		{tenants.CreateTenantRequest{ID: "c", Roles: []string{"root"}}, false},
		{tenants.CreateTenantRequest{ID: "-bad"}, false},
		{tenants.CreateTenantRequest{ID: "has space"}, false},
		{tenants.CreateTenantRequest{ID: strings.Repeat("x", 65)}, false},
	} {
		_, err := s.CreateTenant(ctx, c.req)
		if (err == nil) != c.ok {
			t.Errorf("create %+v: %v, want ok=%v", c.req, err, c.ok)
		}
	}
	if _, err := s.AddKey(ctx, "nobody", nil, ""); !errors.Is(err, tenants.ErrTenantNotFound) {
		t.Fatalf("add-key for an unknown tenant: %v", err)
	}
	admin, err := s.AddKey(ctx, "", []string{tenants.RoleSign}, "admin")
	if err != nil || strings.Join(admin.Roles, ",") != "admin" {
		t.Fatalf("admin key: %+v %v, want exactly role admin", admin, err)
	}
}

func TestCreateTenantValidatesProviders(t *testing.T) {
	ctx := context.Background()
	s, _ := newService(t, known("db", "hsm", "vault"))
	for _, c := range []struct {
		name     string
		allowed  []string
		def      string
		wantCode string
	}{
		{"all known", []string{"db", "hsm"}, "hsm", ""},
		{"default only", nil, "vault", ""},
		{"unknown allowed", []string{"db", "nosuch"}, "", "unknown_provider"},
		{"unknown default", nil, "alsonope", "unknown_provider"},
		{"both unknown", []string{"nosuch"}, "alsonope", "unknown_provider"},
		{"default outside allow-list", []string{"db"}, "hsm", "default_provider_not_allowed"},
	} {
		t.Run(c.name, func(t *testing.T) {
			id := strings.ReplaceAll(c.name, " ", "-")
			_, err := s.CreateTenant(ctx, tenants.CreateTenantRequest{ID: id, AllowedProviders: c.allowed, DefaultProvider: c.def})
			if c.wantCode == "" {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			if !errors.Is(err, errs.BadInput) || errs.CodeOf(err) != c.wantCode {
				t.Fatalf("err = %v (code %q), want BadInput %s", err, errs.CodeOf(err), c.wantCode)
			}
			if _, err := s.Tenant(ctx, id); !errors.Is(err, tenants.ErrTenantNotFound) {
				t.Fatalf("refused tenant was stored: %v", err)
			}
		})
	}
}

func TestCreateTenantProvidersFailClosed(t *testing.T) {
	ctx := context.Background()
	// Without a provider list nothing is known, so naming a provider is refused.
	s, _ := newService(t)
	if _, err := s.CreateTenant(ctx, tenants.CreateTenantRequest{ID: "x", DefaultProvider: "db"}); errs.CodeOf(err) != "unknown_provider" {
		t.Fatalf("no provider list: %v", err)
	}
	// The list is consulted only when the request names providers, and its error is reported.
	calls := 0
	cfgErr := errors.New("kms.json: HSM_PIN is not set")
	s, _ = newService(t, tenants.WithProviders(func() ([]string, error) { calls++; return nil, cfgErr }))
	if _, err := s.CreateTenant(ctx, tenants.CreateTenantRequest{ID: "plain"}); err != nil || calls != 0 {
		t.Fatalf("plain create: %v, %d provider-list calls", err, calls)
	}
	if _, err := s.CreateTenant(ctx, tenants.CreateTenantRequest{ID: "y", DefaultProvider: "db"}); !errors.Is(err, cfgErr) {
		t.Fatalf("provider list error: %v", err)
	}
}

// A tenant id may equal another tenant's credential id: a plain revoke must not guess which one is
// meant, and the explicit targets revoke exactly what they name.
func TestRevokeRefusesAnAmbiguousID(t *testing.T) {
	ctx := context.Background()
	s, _ := newService(t)
	acme, err := s.CreateTenant(ctx, tenants.CreateTenantRequest{ID: "acme"})
	if err != nil {
		t.Fatal(err)
	}
	acmeCred := credID(acme.APIKey)
	twin, err := s.CreateTenant(ctx, tenants.CreateTenantRequest{ID: acmeCred})
	if err != nil {
		t.Fatalf("a tenant id equal to a credential id: %v", err)
	}
	_, err = s.Revoke(ctx, acmeCred, tenants.RevokeAny)
	if errs.KindOf(err) != errs.Conflict || errs.CodeOf(err) != "ambiguous_revoke_target" ||
		!strings.Contains(errs.PublicMessage(err), "--tenant") {
		t.Fatalf("ambiguous revoke = %v, want a conflict naming --tenant/--credential", err)
	}
	for _, key := range []string{acme.APIKey, twin.APIKey} {
		if _, err := s.Authenticate(key); err != nil {
			t.Fatalf("a refused revoke revoked something: %v", err)
		}
	}
	ids, err := s.Revoke(ctx, acmeCred, tenants.RevokeCredential)
	if err != nil || len(ids) != 1 || ids[0] != acmeCred {
		t.Fatalf("revoke --credential = %v, %v", ids, err)
	}
	if _, err := s.Authenticate(acme.APIKey); !errors.Is(err, tenants.ErrUnauthenticated) {
		t.Fatalf("revoked credential still authenticates: %v", err)
	}
	if _, err := s.Authenticate(twin.APIKey); err != nil {
		t.Fatalf("revoke --credential revoked the twin tenant's key: %v", err)
	}
	ids, err = s.Revoke(ctx, twin.ID, tenants.RevokeTenant)
	if err != nil || len(ids) != 1 || ids[0] != credID(twin.APIKey) {
		t.Fatalf("revoke --tenant = %v, %v", ids, err)
	}
	if _, err := s.Revoke(ctx, "acme", tenants.RevokeCredential); !errors.Is(err, tenants.ErrCredNotFound) {
		t.Fatalf("revoke --credential of a tenant id = %v, want not found", err)
	}
}

// credID is the credential id inside an API key kmsgate_<id>_<secret>.
func credID(apiKey string) string {
	parts := strings.Split(apiKey, "_")
	return parts[1]
}
