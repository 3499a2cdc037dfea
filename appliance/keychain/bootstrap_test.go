package keychain

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/kmsgate/kmsgate/appliance/seal"
	"github.com/kmsgate/kmsgate/appliance/store"
	"github.com/kmsgate/kmsgate/appliance/tenants"
	"github.com/kmsgate/kmsgate/metrics"
	"github.com/kmsgate/kmsgate/providers"
	"github.com/kmsgate/kmsgate/providers/db"
)

// twoProviderEnv has the db provider and "hsm" (a second real db-backed provider that the test
// can take down), and tenants restricted to either.
func twoProviderEnv(t *testing.T) (*Service, *store.Store, *tenants.Service, map[string]*recProvider) {
	t.Helper()
	ctx := context.Background()
	st, err := store.Open(t.TempDir(), store.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	sealer, err := seal.New(bytes.Repeat([]byte{9}, 32))
	if err != nil {
		t.Fatal(err)
	}
	provs := map[string]*recProvider{}
	factories := map[string]providers.Factory{providers.TypeDB: func(ctx context.Context, cfg providers.Config) (providers.Provider, error) {
		p, err := db.New(cfg, sealer, func(tenant, kid string) []byte { return seal.AAD("db-key", tenant, kid) },
			store.SealedKeys{St: st})
		if err != nil {
			return nil, err
		}
		rp := &recProvider{Provider: p, deleted: map[string]bool{}}
		provs[cfg.ID] = rp
		return rp, nil
	}}
	m := metrics.New("test", "test")
	reg, err := providers.NewRegistry(ctx, []providers.Config{
		{ID: "db", Type: "db", Raw: json.RawMessage(`{"id":"db","type":"db"}`)},
		{ID: "hsm", Type: "db", Raw: json.RawMessage(`{"id":"hsm","type":"db"}`)},
	}, "db", factories, func(id string) providers.Observer { return m.ProviderRecorder(id) })
	if err != nil {
		t.Fatal(err)
	}
	ten, err := tenants.New(ctx, st, tenants.WithProviders(func() ([]string, error) { return reg.IDs(), nil }))
	if err != nil {
		t.Fatal(err)
	}
	clk := &fakeClock{t: time.Date(2026, 3, 1, 10, 37, 12, 0, time.UTC)}
	svc := New(Config{Store: st, Registry: reg, Tenants: ten, Now: clk.Now})
	return svc, st, ten, provs
}

func statusOf(rep *BootstrapReport) map[string]BootstrapResult {
	out := map[string]BootstrapResult{}
	for _, c := range rep.Chains {
		out[c.UsageType] = c
	}
	return out
}

// TestBootstrapHonoursAllowList: a tenant restricted to an HSM provider gets its access and
// attestation chains there and no encrypt chain on db (skipped, and the report says why).
func TestBootstrapHonoursAllowList(t *testing.T) {
	svc, _, ten, _ := twoProviderEnv(t)
	if _, err := ten.CreateTenant(ctx, tenants.CreateTenantRequest{ID: "bank", AllowedProviders: []string{"hsm"},
		DefaultProvider: "hsm"}); err != nil {
		t.Fatal(err)
	}
	rep, err := svc.Bootstrap(ctx, "bank")
	if err != nil {
		t.Fatal(err)
	}
	st := statusOf(rep)
	if st[UsageAccess].Status != BootCreated || st[UsageAccess].Provider != "hsm" ||
		st[UsageAttestation].Status != BootCreated || st[UsageAttestation].Provider != "hsm" {
		t.Fatalf("signing chains: %+v", rep)
	}
	if st[UsageEncrypt].Status != BootSkipped || !strings.Contains(st[UsageEncrypt].Reason, "db") {
		t.Fatalf("encrypt chain: %+v", st[UsageEncrypt])
	}
	list, _ := svc.List(ctx, "bank", "")
	for _, c := range list {
		if c.KMSProvider != "hsm" {
			t.Errorf("chain %s (%s) on %s, outside the tenant's allow-list", c.ID, c.UsageType, c.KMSProvider)
		}
	}
	if len(list) != 2 {
		t.Fatalf("%d chains", len(list))
	}
}

// TestBootstrapFailureRecordedAndRetried: with the HSM down at tenant creation, the report names
// the usage types that failed (with a safe reason, not the backend's text), a record keeps them,
// and the scheduler creates them once the HSM is back, then forgets the record.
func TestBootstrapFailureRecordedAndRetried(t *testing.T) {
	svc, st, ten, provs := twoProviderEnv(t)
	if _, err := ten.CreateTenant(ctx, tenants.CreateTenantRequest{ID: "bank", DefaultProvider: "hsm"}); err != nil {
		t.Fatal(err)
	}
	provs["hsm"].set(func(p *recProvider) { p.failGen = true })
	rep, err := svc.Bootstrap(ctx, "bank")
	if err != nil {
		t.Fatal(err)
	}
	s := statusOf(rep)
	for _, u := range []string{UsageAccess, UsageAttestation} {
		r := s[u]
		if r.Status != BootFailed || r.Code != "unavailable" || r.Reason == "" || strings.Contains(r.Reason, "backend down") {
			t.Fatalf("%s: %+v", u, r)
		}
	}
	if s[UsageEncrypt].Status != BootCreated {
		t.Fatalf("encrypt: %+v", s[UsageEncrypt])
	}
	var rec bootRecord
	if err := st.Get(ctx, prefixBoot+"bank", &rec); err != nil || len(rec.UsageTypes) != 2 {
		t.Fatalf("no record of the failed usage types: %+v %v", rec, err)
	}
	// Still down: a tick retries and keeps the record.
	svc.Tick(ctx)
	if err := st.Get(ctx, prefixBoot+"bank", &rec); err != nil {
		t.Fatalf("record dropped while the provider is still down: %v", err)
	}
	// Back: the next tick creates both chains on the HSM and deletes the record.
	provs["hsm"].set(func(p *recProvider) { p.failGen = false })
	svc.Tick(ctx)
	if err := st.Get(ctx, prefixBoot+"bank", &rec); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("record kept after a successful retry: %v", err)
	}
	// Every chain, the encrypt chain included (List hides it).
	all, err := svc.list(ctx, tenantPrefix("bank"))
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]string{}
	for _, c := range all {
		got[c.UsageType] = c.Provider
	}
	if len(all) != 3 || got[UsageAccess] != "hsm" || got[UsageAttestation] != "hsm" || got[UsageEncrypt] != "db" {
		t.Fatalf("after retry: %v", got)
	}
	// A later tick creates nothing more.
	if n := svc.RetryBootstraps(ctx); n != 0 {
		t.Fatalf("retry after success created %d chains", n)
	}
}
