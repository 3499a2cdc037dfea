package appliance

import (
	"bytes"
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kmsgate/kmsgate/internal/testenv"
)

func TestStorePasswordSources(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "pw")
	creds := filepath.Join(dir, "creds")
	os.WriteFile(file, []byte("from-file\n"), 0o600)
	os.Mkdir(creds, 0o700)
	os.WriteFile(filepath.Join(creds, StorePasswordCredential), []byte("from-credential"), 0o600)
	for name, tc := range map[string]struct{ file, creds, want, err string }{
		"file wins":          {file, creds, "from-file", ""},
		"systemd credential": {"", creds, "from-credential", ""},
		"none":               {"", filepath.Join(dir, "no-creds"), "", ""},
		"missing file":       {filepath.Join(dir, "nope"), creds, "", "store password file"},
	} {
		got, err := storePassword(tc.file, tc.creds)
		if got != tc.want || (tc.err == "") != (err == nil) || (err != nil && !strings.Contains(err.Error(), tc.err)) {
			t.Errorf("%s: %q %v, want %q %q", name, got, err, tc.want, tc.err)
		}
	}
	os.WriteFile(file, []byte("\n"), 0o600)
	if _, err := storePassword(file, ""); err == nil {
		t.Error("an empty password file was accepted")
	}
}

// TestOpenStoreSelectsAndLogsSafely: unset selects Badger under the data dir, a postgres:// URL
// PostgreSQL (its password read from the file and never logged), anything else is refused
// without being echoed. It logs how long each engine takes to open.
func TestOpenStoreSelectsAndLogsSafely(t *testing.T) {
	ctx := context.Background()
	var logs bytes.Buffer
	log := slog.New(slog.NewJSONHandler(&logs, nil))
	data := t.TempDir()
	start := time.Now()
	st, err := OpenStore(ctx, StoreOptions{DataDir: data, Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	badgerOpen := time.Since(start)
	st.Close()
	if _, err := os.Stat(DBDir(data)); err != nil {
		t.Fatalf("Badger was not opened under the data dir: %v", err)
	}
	if _, err := OpenStore(ctx, StoreOptions{URL: "mysql://u:hunter2@h/db", DataDir: data}); err == nil ||
		strings.Contains(err.Error(), "hunter2") {
		t.Fatalf("a non-PostgreSQL URL: %v, want a refusal without the value", err)
	}
	if testing.Short() {
		return
	}
	pg := testenv.StartPostgres(t)
	dsn := pg.NewDatabase(t)
	db, _ := testenv.DatabaseOf(dsn)
	const pw = "pw-5ecret-value"
	pg.Exec(t, db, "CREATE ROLE "+testenv.PostgresPasswordRole+" LOGIN PASSWORD '"+pw+"'")
	pg.Exec(t, db, "GRANT ALL ON SCHEMA public TO "+testenv.PostgresPasswordRole)
	pwFile := filepath.Join(t.TempDir(), "pw")
	os.WriteFile(pwFile, []byte(pw+"\n"), 0o600)
	// The URL carries a wrong password too: the file must win, and neither may be logged.
	u := strings.Replace(pg.DSN(testenv.PostgresPasswordRole, db), "@", ":url-password@", 1)
	start = time.Now()
	st, err = OpenStore(ctx, StoreOptions{URL: u, PasswordFile: pwFile, DataDir: data, Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	pgOpen := time.Since(start)
	st.Close()
	start = time.Now()
	st, err = OpenStore(ctx, StoreOptions{URL: u, PasswordFile: pwFile, DataDir: data, Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	pgReopen := time.Since(start)
	st.Close()
	if s := logs.String(); strings.Contains(s, pw) || strings.Contains(s, "url-password") ||
		!strings.Contains(s, `"backend":"postgres"`) || !strings.Contains(s, `"backend":"badger"`) {
		t.Fatalf("store logs leak a password or miss the backend:\n%s", s)
	}
	t.Logf("store open: badger %v, postgres %v (first, with migrations), postgres %v (migrated)", badgerOpen, pgOpen, pgReopen)
}
