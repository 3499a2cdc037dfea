package cli_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5"

	"github.com/kmsgate/kmsgate/appliance"
	"github.com/kmsgate/kmsgate/internal/apptest"
	"github.com/kmsgate/kmsgate/internal/keyutil"
	"github.com/kmsgate/kmsgate/internal/testenv"
)

// copyReport is what `kmsgate store copy` prints.
type copyReport struct {
	Records          int            `json:"records"`
	ByKind           map[string]int `json:"byKind"`
	SealedKeysOpened int            `json:"sealedKeysOpened"`
	Unreferenced     int            `json:"sealedKeysUnreferenced"`
}

func storeCopy(t *testing.T, from, to string) copyReport {
	t.Helper()
	out, err := run(t, "store", "copy", "--from", from, "--to", to)
	if err != nil {
		t.Fatalf("store copy --from %s --to %s: %v\n%s", from, to, err, out)
	}
	var r copyReport
	if err := json.Unmarshal([]byte(out), &r); err != nil {
		t.Fatalf("store copy printed %q: %v", out, err)
	}
	return r
}

// signsAs signs through in with kid and checks the signature against pub.
func signsAs(t *testing.T, in *apptest.Instance, apiKey, kid string, pub *ecdsa.PublicKey) {
	t.Helper()
	msg := make([]byte, 32)
	rand.Read(msg)
	st, body := in.Do("POST", "/keys/"+kid+"/sign", apiKey, map[string]string{"data": base64.StdEncoding.EncodeToString(msg), "alg": "ES256"})
	if st != 200 {
		t.Fatalf("sign with %s: %d %s", kid, st, body)
	}
	var r struct{ Signature string }
	apptest.JSON(t, body, &r)
	raw, _ := base64.RawURLEncoding.DecodeString(r.Signature)
	der, err := keyutil.RawToDER(raw)
	if err != nil {
		t.Fatal(err)
	}
	d := sha256.Sum256(msg)
	if !ecdsa.VerifyASN1(pub, d[:], der) {
		t.Fatalf("%s signs, but not with the key it had before the copy", kid)
	}
}

func generateKey(t *testing.T, in *apptest.Instance, apiKey, kid string) *ecdsa.PublicKey {
	t.Helper()
	st, body := in.Do("POST", "/keys", apiKey, map[string]string{"kid": kid, "alg": "ES256"})
	if st != 200 {
		t.Fatalf("generate %s: %d %s", kid, st, body)
	}
	var r struct {
		PublicJWK keyutil.JWK `json:"publicJwk"`
	}
	apptest.JSON(t, body, &r)
	pub, err := keyutil.ParsePublicJWK(r.PublicJWK)
	if err != nil {
		t.Fatal(err)
	}
	return pub
}

func chainIDs(t *testing.T, in *apptest.Instance, apiKey string) string {
	t.Helper()
	st, body := in.Do("GET", "/key-chain", apiKey, nil)
	if st != 200 {
		t.Fatalf("list key chains: %d %s", st, body)
	}
	var cs []struct{ ID string }
	apptest.JSON(t, body, &cs)
	ids := make([]string, len(cs))
	for i, c := range cs {
		ids[i] = c.ID
	}
	return strings.Join(ids, ",")
}

// TestStoreCopyRoundTrip copies a populated Badger store (tenants, API keys, db provider keys,
// key chains) to PostgreSQL, serves from PostgreSQL, adds a key there, and copies back to Badger:
// every key still signs as itself, every API key still works, and the sealed keys stay sealed in
// PostgreSQL.
func TestStoreCopyRoundTrip(t *testing.T) {
	testenv.NeedsBackend(t, "postgres")
	t.Setenv("KMSGATE_MASTER_KEY", apptest.MasterKey)
	pg := testenv.StartPostgres(t)
	pgDSN := pg.NewDatabase(t)

	badger1 := t.TempDir()
	in := apptest.Start(t, apptest.Options{DataDir: badger1})
	acme, other := in.CreateTenant("acme"), in.CreateTenant("other", "sign")
	pubs := map[string]*ecdsa.PublicKey{"k1": generateKey(t, in, acme, "k1"), "k2": generateKey(t, in, acme, "k2")}
	if st, body := in.Do("POST", "/key-chain", acme, map[string]any{"usageType": "access", "type": "standalone"}); st/100 != 2 {
		t.Fatalf("create key chain: %d %s", st, body)
	}
	chains := chainIDs(t, in, acme)
	if chains == "" {
		t.Fatal("no key chain to copy")
	}
	in.Stop()

	toPG := storeCopy(t, badger1, pgDSN)
	if toPG.Records == 0 || toPG.ByKind["tenant"] != 2 || toPG.ByKind["cred"] != 2 || toPG.ByKind["dbkey"] < 3 {
		t.Fatalf("copy to PostgreSQL: %+v, want 2 tenants, 2 credentials, ≥3 sealed keys", toPG)
	}
	if toPG.SealedKeysOpened != toPG.ByKind["dbkey"] || toPG.Unreferenced != 0 {
		t.Fatalf("copy to PostgreSQL opened %d of %d sealed keys (%d unreferenced)", toPG.SealedKeysOpened, toPG.ByKind["dbkey"], toPG.Unreferenced)
	}
	assertSealedInPostgres(t, pgDSN)

	// The same command line, pointed at PostgreSQL, serves the copied state.
	onPG := apptest.Start(t, apptest.Options{DataDir: t.TempDir(), Tweak: func(o *appliance.Options) { o.Store = pgDSN }})
	for kid, pub := range pubs {
		signsAs(t, onPG, acme, kid, pub)
	}
	if got := chainIDs(t, onPG, acme); got != chains {
		t.Fatalf("key chains on PostgreSQL: %s, want %s", got, chains)
	}
	if st, _ := onPG.Do("POST", "/keys", other, map[string]string{"kid": "x"}); st != 403 {
		t.Fatalf("the sign-only key of tenant other lost its roles in the copy: create answered %d, want 403", st)
	}
	pubs["k3"] = generateKey(t, onPG, acme, "k3")
	onPG.Stop()

	// Every CLI command honours --store: the tenant list comes from PostgreSQL, not the (empty) data dir.
	out, err := run(t, "tenant", "list", "--store", pgDSN, "--data-dir", t.TempDir())
	if err != nil || !strings.Contains(out, `"acme"`) || !strings.Contains(out, `"other"`) {
		t.Fatalf("tenant list --store: %v %s", err, out)
	}

	badger2 := t.TempDir()
	back := storeCopy(t, pgDSN, badger2)
	// k3 added three records on PostgreSQL: its key reference, its sealed key and the lifecycle's
	// owned-key record (its tenant's key count is updated in place).
	if back.Records != toPG.Records+3 || back.ByKind["key"] != toPG.ByKind["key"]+1 ||
		back.ByKind["dbkey"] != toPG.ByKind["dbkey"]+1 || back.ByKind["keyown"] != toPG.ByKind["keyown"]+1 ||
		back.SealedKeysOpened != back.ByKind["dbkey"] {
		t.Fatalf("copy back: %+v, want the first copy (%+v) plus k3's key record, sealed key and owned record", back, toPG)
	}
	in2 := apptest.Start(t, apptest.Options{DataDir: badger2})
	for kid, pub := range pubs {
		signsAs(t, in2, acme, kid, pub)
	}
	if got := chainIDs(t, in2, acme); got != chains {
		t.Fatalf("key chains after the round trip: %s, want %s", got, chains)
	}
	in2.Stop()

	// A copy never merges into a store that holds records.
	if out, err := run(t, "store", "copy", "--from", badger1, "--to", pgDSN); err == nil || !strings.Contains(err.Error(), "not empty") {
		t.Fatalf("copy onto a populated store: %v %s, want a refusal", err, out)
	}
	// Under a different master key nothing opens: refused before the destination is touched.
	t.Setenv("KMSGATE_MASTER_KEY", base64.StdEncoding.EncodeToString(make([]byte, 32)))
	fresh := pg.NewDatabase(t)
	if out, err := run(t, "store", "copy", "--from", badger1, "--to", fresh); err == nil || !strings.Contains(err.Error(), "master key") {
		t.Fatalf("copy under the wrong master key: %v %s, want a master key error", err, out)
	}
	conn, err := pgx.Connect(context.Background(), fresh)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	var tables int
	if err := conn.QueryRow(context.Background(), "SELECT count(*) FROM pg_tables WHERE tablename = 'records'").Scan(&tables); err != nil || tables != 0 {
		t.Fatalf("a refused copy still touched the destination (records table: %d, %v)", tables, err)
	}
}

// assertSealedInPostgres reads the raw db key rows: each must be a sealed blob (version byte,
// nonce, AES-GCM ciphertext of a 32-byte scalar plus tag), never a bare 32-byte scalar.
func assertSealedInPostgres(t *testing.T, dsn string) {
	t.Helper()
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	rows, err := conn.Query(ctx, "SELECT key, value FROM records WHERE key >= 'dbkey/'::bytea AND key < 'dbkey0'::bytea")
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	n := 0
	for rows.Next() {
		var k, v []byte
		if err := rows.Scan(&k, &v); err != nil {
			t.Fatal(err)
		}
		var sealed []byte
		if err := json.Unmarshal(v, &sealed); err != nil {
			t.Fatalf("%s: %v", k, err)
		}
		if len(sealed) != 1+12+32+16 || sealed[0] != 1 {
			t.Fatalf("%s holds %d bytes (first %#x), want a sealed record of %d", k, len(sealed), sealed[0], 1+12+32+16)
		}
		n++
	}
	if err := rows.Err(); err != nil || n == 0 {
		t.Fatalf("no sealed keys found in PostgreSQL (%v)", err)
	}
}
