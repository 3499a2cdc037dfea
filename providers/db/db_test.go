package db_test

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"testing"

	"github.com/jackc/pgx/v5"

	"github.com/kmsgate/kmsgate/appliance/seal"
	"github.com/kmsgate/kmsgate/appliance/store"
	"github.com/kmsgate/kmsgate/internal/keyutil"
	"github.com/kmsgate/kmsgate/internal/testenv"
	"github.com/kmsgate/kmsgate/providers"
	"github.com/kmsgate/kmsgate/providers/db"
	"github.com/kmsgate/kmsgate/providers/providertest"
)

func aad(tenant, kid string) []byte { return seal.AAD("db-key", tenant, kid) }

func newProvider(t *testing.T, st *store.Store, masterKey []byte) *db.Provider {
	s, err := seal.New(masterKey)
	if err != nil {
		t.Fatal(err)
	}
	p, err := db.New(providers.Config{ID: "db", Type: "db", Raw: json.RawMessage(`{"id":"db","type":"db"}`)}, s, aad, store.SealedKeys{St: st})
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func openStore(t *testing.T) *store.Store {
	st, err := store.Open(t.TempDir(), store.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	return st
}

// eachStore runs fn on a Badger store and on a PostgreSQL one: the provider must behave the same
// on both engines.
func eachStore(t *testing.T, fn func(t *testing.T, st *store.Store)) {
	t.Run("badger", func(t *testing.T) { fn(t, openStore(t)) })
	if testing.Short() {
		return
	}
	t.Run("postgres", func(t *testing.T) { fn(t, openPostgresStore(t, testenv.PostgresDSN(t))) })
}

func openPostgresStore(t *testing.T, dsn string) *store.Store {
	st, err := store.OpenPostgres(context.Background(), dsn, store.PostgresOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	return st
}

func TestContract(t *testing.T) { eachStore(t, testContract) }

func testContract(t *testing.T, st *store.Store) {
	mk := bytes.Repeat([]byte{3}, 32)
	r := providertest.Run(t, providertest.Harness{
		New:          func(t *testing.T) providers.Provider { return newProvider(t, st, mk) },
		TenantScoped: true,
		MissingRef: func(spec providers.KeySpec) providers.KeyRef {
			return providers.KeyRef{ProviderID: "db", Tenant: spec.Tenant, KID: spec.KID, Alg: spec.Alg,
				ExternalID: "00000000000000000000000000000000"}
		},
	})
	t.Logf("db provider: p50 sequential %v, p50 at 16 concurrent %v", r.P50Sequential, r.P50Concurrent)
}

func TestSealedKeyIsBoundToOwnerAndMasterKey(t *testing.T) { eachStore(t, testSealedKeyIsBound) }

func testSealedKeyIsBound(t *testing.T, st *store.Store) {
	ctx := context.Background()
	p := newProvider(t, st, bytes.Repeat([]byte{1}, 32))
	ref, err := p.Generate(ctx, providers.KeySpec{Tenant: "tenant-a", KID: "k1", Alg: "ES256"})
	if err != nil {
		t.Fatal(err)
	}
	sig, err := p.SignMessage(ctx, ref, "ES256", []byte("m"))
	if err != nil || !keyutil.VerifyRaw(ref.Public, []byte("m"), sig) {
		t.Fatalf("sign: %v", err)
	}
	// The record on disk must not contain the scalar in clear.
	priv, err := p.ExportPrivate(ref)
	if err != nil {
		t.Fatal(err)
	}
	d, _ := priv.Bytes()
	var sealed []byte
	if err := st.Get(ctx, store.DBKeyKey(ref.ExternalID), &sealed); err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(sealed, d) {
		t.Fatal("the stored record holds the private scalar in clear")
	}
	// A fresh provider (no cache) must refuse the record under another tenant or kid, or with
	// another master key: the same stored record, claimed by a different owner, does not open.
	for name, tc := range map[string]struct {
		ref providers.KeyRef
		mk  byte
	}{
		"other tenant":     {providers.KeyRef{Tenant: "tenant-b", KID: "k1", Alg: "ES256", ExternalID: ref.ExternalID, Public: ref.Public}, 1},
		"other kid":        {providers.KeyRef{Tenant: "tenant-a", KID: "k2", Alg: "ES256", ExternalID: ref.ExternalID, Public: ref.Public}, 1},
		"other master key": {ref, 2},
	} {
		fresh := newProvider(t, st, bytes.Repeat([]byte{tc.mk}, 32))
		if sig, err := fresh.SignMessage(ctx, tc.ref, "ES256", []byte("m")); err == nil || sig != nil {
			t.Errorf("%s: the sealed key opened (sig %x)", name, sig)
		}
	}
	// Delete destroys the record; a fresh provider cannot find it any more.
	if err := p.Delete(ctx, ref); err != nil {
		t.Fatal(err)
	}
	if err := st.Get(ctx, store.DBKeyKey(ref.ExternalID), &sealed); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("sealed record survived delete: %v", err)
	}
}

// TestSealedKeyStaysSealedInPostgres reads the db provider's row straight from PostgreSQL: it
// holds the same AES-GCM sealed record as Badger does, which opens only under the master key and
// the key's owner, and neither the private scalar nor any encoding of it.
// Import once cleared the slice priv.Bytes() returned, which on Go 1.26 is crypto/ecdsa's own
// buffer for the key: the caller's key material read as zeros afterwards.
func TestImportLeavesTheCallersKeyIntact(t *testing.T) {
	p := newProvider(t, openStore(t), bytes.Repeat([]byte{3}, 32))
	priv, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	before, err := priv.Bytes()
	if err != nil {
		t.Fatal(err)
	}
	want := bytes.Clone(before)
	if _, err := p.Import(context.Background(), providers.KeySpec{Tenant: "t", KID: "k", Alg: "ES256"}, priv); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(before, want) {
		t.Fatalf("Import changed the caller's key bytes: %x, want %x", before, want)
	}
}

func TestSealedKeyStaysSealedInPostgres(t *testing.T) {
	testenv.NeedsBackend(t, "postgres")
	ctx := context.Background()
	dsn := testenv.PostgresDSN(t)
	mk := bytes.Repeat([]byte{7}, 32)
	p := newProvider(t, openPostgresStore(t, dsn), mk)
	priv, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	d, _ := priv.Bytes()
	ref, err := p.Import(ctx, providers.KeySpec{Tenant: "tenant-a", KID: "imported", Alg: "ES256"}, priv)
	if err != nil {
		t.Fatal(err)
	}
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	var raw []byte
	if err := conn.QueryRow(ctx, "SELECT value FROM records WHERE key = $1", []byte(store.DBKeyKey(ref.ExternalID))).Scan(&raw); err != nil {
		t.Fatalf("raw row of the sealed key: %v", err)
	}
	for name, enc := range map[string][]byte{"raw": d, "hex": []byte(hex.EncodeToString(d)),
		"base64": []byte(base64.StdEncoding.EncodeToString(d)), "base64url": []byte(base64.RawURLEncoding.EncodeToString(d))} {
		if bytes.Contains(raw, enc) {
			t.Fatalf("the PostgreSQL row holds the private scalar in clear (%s)", name)
		}
	}
	var sealed []byte
	if err := json.Unmarshal(raw, &sealed); err != nil {
		t.Fatalf("row is not the sealed record's JSON: %v", err)
	}
	s, _ := seal.New(mk)
	got, err := s.Open(sealed, aad("tenant-a", "imported"))
	if err != nil || !bytes.Equal(got, d) {
		t.Fatalf("the row does not open to the key under the master key and its owner: %v", err)
	}
	if _, err := s.Open(sealed, aad("tenant-b", "imported")); err == nil {
		t.Fatal("the row opens for another tenant")
	}
}
