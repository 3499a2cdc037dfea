package keys_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"testing"

	"github.com/kmsgate/kmsgate/appliance/keys"
	"github.com/kmsgate/kmsgate/appliance/seal"
	"github.com/kmsgate/kmsgate/appliance/store"
	"github.com/kmsgate/kmsgate/internal/errs"
	"github.com/kmsgate/kmsgate/internal/keyutil"
	"github.com/kmsgate/kmsgate/providers"
	"github.com/kmsgate/kmsgate/providers/db"
)

type env struct {
	st     *store.Store
	sealed store.SealedKeys
	reg    *providers.Registry
	prov   providers.Provider
	svc    *keys.Service
}

// newEnv builds the key service on a real Badger store in a temp dir and the real db provider.
func newEnv(t *testing.T) *env {
	t.Helper()
	ctx := context.Background()
	st, err := store.Open(t.TempDir(), store.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	key := make([]byte, 32)
	if _, err := rand.Read(key); err != nil {
		t.Fatal(err)
	}
	sealer, err := seal.New(key)
	if err != nil {
		t.Fatal(err)
	}
	sealed := store.SealedKeys{St: st}
	factories := map[string]providers.Factory{providers.TypeDB: db.Factory(sealer,
		func(tenant, kid string) []byte { return seal.AAD("db-key", tenant, kid) }, sealed, nil)}
	reg, err := providers.NewRegistry(ctx, []providers.Config{{ID: "db", Type: "db", Raw: json.RawMessage(`{"id":"db","type":"db"}`)}},
		"db", factories, nil)
	if err != nil {
		t.Fatal(err)
	}
	prov, _ := reg.Get("db")
	return &env{st: st, sealed: sealed, reg: reg, prov: prov, svc: keys.New(st, reg, nil)}
}

func (e *env) sealedExists(t *testing.T, id string) bool {
	t.Helper()
	_, found, err := e.sealed.Load(context.Background(), id)
	if err != nil {
		t.Fatal(err)
	}
	return found
}

func (e *env) record(t *testing.T, tenant, kid string) store.KeyRef {
	t.Helper()
	var r store.KeyRef
	if err := e.st.Get(context.Background(), store.KeyRecordKey(tenant, kid), &r); err != nil {
		t.Fatal(err)
	}
	return r
}

func TestGenerateSignDelete(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	ki, err := e.svc.Generate(ctx, "t1", "k1", "", e.prov)
	if err != nil {
		t.Fatal(err)
	}
	if ki.Alg != providers.ES256 || ki.ProviderID != "db" {
		t.Fatalf("info %+v", ki)
	}
	if _, err := e.svc.Generate(ctx, "t1", "k1", "", e.prov); errs.CodeOf(err) != "key_exists" {
		t.Fatalf("second generate: %v, want key_exists", err)
	}
	rec := e.record(t, "t1", "k1")
	if !e.sealedExists(t, rec.ExternalID) {
		t.Fatal("no sealed key behind the record")
	}
	pub, err := keyutil.ParsePublicJWK(ki.PublicJWK)
	if err != nil {
		t.Fatal(err)
	}
	msg := []byte("hello")
	sig, err := e.svc.Sign(ctx, "t1", "k1", "", msg, false)
	if err != nil {
		t.Fatal(err)
	}
	d := sha256.Sum256(msg)
	if !keyutil.VerifyRawDigest(pub, d[:], sig) {
		t.Fatal("message signature does not verify")
	}
	sig, err = e.svc.Sign(ctx, "t1", "k1", providers.ES256, d[:], true)
	if err != nil || !keyutil.VerifyRawDigest(pub, d[:], sig) {
		t.Fatalf("digest signature: %v", err)
	}
	if _, err := e.svc.Sign(ctx, "t1", "k1", "", d[:31], true); errs.CodeOf(err) != "invalid_digest" {
		t.Fatalf("short digest: %v", err)
	}
	if _, err := e.svc.Sign(ctx, "t2", "k1", "", msg, false); errs.CodeOf(err) != "key_not_found" {
		t.Fatalf("other tenant's kid: %v, want key_not_found", err)
	}
	if err := e.svc.Delete(ctx, "t1", "k1"); err != nil {
		t.Fatal(err)
	}
	if e.sealedExists(t, rec.ExternalID) {
		t.Fatal("delete left the sealed key behind")
	}
	if _, err := e.svc.Sign(ctx, "t1", "k1", "", msg, false); errs.CodeOf(err) != "key_not_found" {
		t.Fatalf("sign after delete: %v, want key_not_found", err)
	}
	if err := e.svc.Delete(ctx, "t1", "k1"); err != nil {
		t.Fatalf("second delete must succeed: %v", err)
	}
}

func TestImportReplacesAndDeletesTheOldKey(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	priv, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if _, err := e.svc.Generate(ctx, "t1", "k1", "", e.prov); err != nil {
		t.Fatal(err)
	}
	old := e.record(t, "t1", "k1")
	ki, err := e.svc.Import(ctx, "t1", "k1", "", e.prov, priv)
	if err != nil {
		t.Fatal(err)
	}
	if !ki.Imported || !ki.CreatedAt.Equal(old.CreatedAt) {
		t.Fatalf("import info %+v", ki)
	}
	if e.sealedExists(t, old.ExternalID) {
		t.Fatal("the replaced key is still in the backend")
	}
	sig, err := e.svc.Sign(ctx, "t1", "k1", "", []byte("m"), false)
	d := sha256.Sum256([]byte("m"))
	if err != nil || !keyutil.VerifyRawDigest(&priv.PublicKey, d[:], sig) {
		t.Fatalf("sign with imported key: %v", err)
	}
}

// A key whose reference cannot be persisted must not stay in the backend.
func TestLifecycleRollsBackWhenPersistFails(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	lc := keys.NewLifecycleWith(keys.LifecycleConfig{Store: e.st})
	persistErr := errors.New("disk full")
	var created providers.KeyRef
	_, err := lc.Generate(ctx, e.prov, providers.KeySpec{Tenant: "t1", KID: "k1"}, func(_ *store.Txn, ref providers.KeyRef) error {
		created = ref
		if !e.sealedExists(t, ref.ExternalID) {
			t.Error("the key does not exist while it is being persisted")
		}
		return persistErr
	})
	if !errors.Is(err, persistErr) {
		t.Fatalf("err %v, want the persist error", err)
	}
	if created.ExternalID == "" || e.sealedExists(t, created.ExternalID) {
		t.Fatalf("the backend key %q was not rolled back", created.ExternalID)
	}

	priv, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	_, err = lc.Import(ctx, e.prov, providers.KeySpec{Tenant: "t1", KID: "k2"}, priv, func(_ *store.Txn, ref providers.KeyRef) error {
		created = ref
		return persistErr
	})
	if !errors.Is(err, persistErr) || e.sealedExists(t, created.ExternalID) {
		t.Fatalf("import: err %v, sealed key left: %v", err, e.sealedExists(t, created.ExternalID))
	}

	b := lc.Begin()
	r1, err1 := b.Generate(ctx, e.prov, providers.KeySpec{Tenant: "t1", KID: "a"})
	r2, err2 := b.Generate(ctx, e.prov, providers.KeySpec{Tenant: "t1", KID: "b"})
	if err1 != nil || err2 != nil {
		t.Fatal(err1, err2)
	}
	if err := b.Commit(func() error { return persistErr }); !errors.Is(err, persistErr) {
		t.Fatal(err)
	}
	if e.sealedExists(t, r1.ExternalID) || e.sealedExists(t, r2.ExternalID) {
		t.Fatal("a batch rollback left keys behind")
	}
	// Nothing may stay counted or pending after the rollbacks.
	if n, err := lc.KeyCount(ctx, "t1"); err != nil || n != 0 {
		t.Fatalf("key count after rollbacks = %d, %v; want 0", n, err)
	}
	if n := countPrefix(t, e.st, "intent/"); n != 0 {
		t.Fatalf("%d intents left after rollbacks", n)
	}
}

func countPrefix(t *testing.T, st *store.Store, prefix string) int {
	t.Helper()
	n := 0
	if err := st.List(context.Background(), prefix, func(string, []byte) error { n++; return nil }); err != nil {
		t.Fatal(err)
	}
	return n
}

// A concurrent generate of the same kid loses at the store and must not leak its backend key.
func TestGenerateConflictAtPersistRollsBack(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	// Another writer created the record between the existence check and the write.
	lc := e.svc.Lifecycle()
	var created providers.KeyRef
	_, err := lc.Generate(ctx, e.prov, providers.KeySpec{Tenant: "t1", KID: "k1"}, func(tx *store.Txn, ref providers.KeyRef) error {
		created = ref
		return tx.Create("x", 1)
	})
	if err != nil {
		t.Fatal(err)
	}
	_, err = lc.Generate(ctx, e.prov, providers.KeySpec{Tenant: "t1", KID: "k1"}, func(tx *store.Txn, ref providers.KeyRef) error {
		created = ref
		return tx.Create("x", 1)
	})
	if !errors.Is(err, store.ErrExists) || e.sealedExists(t, created.ExternalID) {
		t.Fatalf("err %v; sealed key left behind", err)
	}
}

// A key that vanished from the backend (deleted out of band) reports the same code as one deleted
// through kmsgate.
func TestKeyGoneFromBackendIsKeyNotFound(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	if _, err := e.svc.Generate(ctx, "t1", "k1", "", e.prov); err != nil {
		t.Fatal(err)
	}
	if _, err := e.svc.Sign(ctx, "t1", "k1", "", []byte("warm the cache"), false); err != nil {
		t.Fatal(err)
	}
	rec := e.record(t, "t1", "k1")
	ref, err := keys.ProviderRef(rec, "t1")
	if err != nil {
		t.Fatal(err)
	}
	// Out of band: straight to the backend, bypassing the record.
	if err := e.prov.Delete(ctx, ref); err != nil {
		t.Fatal(err)
	}
	_, err = e.svc.Sign(ctx, "t1", "k1", "", []byte("m"), false)
	if errs.KindOf(err) != errs.NotFound || errs.CodeOf(err) != "key_not_found" {
		t.Fatalf("sign with a vanished key: %v (code %q), want not_found/key_not_found", err, errs.CodeOf(err))
	}
}

// Records written by the previous release (with a "material" field, and a chain key without
// tenant or times) decode into the shared reference.
func TestOldRecordFormsDecode(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	priv, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	jwk, _ := keyutil.PublicJWK(&priv.PublicKey, "k1", "ES256")
	jb, _ := json.Marshal(jwk)
	old := `{"tenant":"t1","kid":"k1","providerId":"db","externalId":"abc","alg":"ES256","publicJwk":` + string(jb) +
		`,"material":"c2VhbGVk","imported":true,"createdAt":"2025-01-02T03:04:05Z","updatedAt":"2025-01-02T03:04:05Z"}`
	if err := e.st.Put(ctx, store.KeyRecordKey("t1", "k1"), json.RawMessage(old)); err != nil {
		t.Fatal(err)
	}
	ki, err := e.svc.Get(ctx, "t1", "k1")
	if err != nil {
		t.Fatal(err)
	}
	if !ki.Imported || ki.CreatedAt.Year() != 2025 || ki.ProviderID != "db" {
		t.Fatalf("decoded %+v", ki)
	}
	var r store.KeyRef
	if err := json.Unmarshal([]byte(`{"kid":"k1","providerId":"db","alg":"ES256","publicJwk":`+string(jb)+`,"material":"eA=="}`), &r); err != nil {
		t.Fatal(err)
	}
	if _, err := keys.ProviderRef(r, "t1"); err != nil {
		t.Fatal(err)
	}
}
