package store

import (
	"context"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/kmsgate/kmsgate/internal/testenv"
)

func TestRedactURL(t *testing.T) {
	for in, want := range map[string]string{
		"postgres://kmsgate:s3cret@db.example:5432/kmsgate?sslmode=require":   "postgres://kmsgate:xxxxx@db.example:5432/kmsgate?sslmode=require",
		"postgresql://kmsgate@db/kmsgate?password=s3cret&sslmode=verify-full": "postgresql://kmsgate@db/kmsgate?password=xxxxx&sslmode=verify-full",
		"postgres://db/kmsgate": "postgres://db/kmsgate",
	} {
		if got := RedactURL(in); got != want || strings.Contains(got, "s3cret") {
			t.Errorf("RedactURL(%s) = %s, want %s", in, got, want)
		}
	}
}

// TestPostgresMigrations starts several stores on one empty database at once (replicas starting
// together): each migration is applied once, and a binary older than the schema refuses to start.
func TestPostgresMigrations(t *testing.T) {
	testenv.NeedsBackend(t, "postgres")
	ctx := context.Background()
	pg := testenv.StartPostgres(t)
	dsn := pg.NewDatabase(t)
	const replicas = 4
	var wg sync.WaitGroup
	errs := make([]error, replicas)
	for i := range replicas {
		wg.Add(1)
		go func() {
			defer wg.Done()
			s, err := OpenPostgres(ctx, dsn, PostgresOptions{})
			if err == nil {
				err = s.Put(ctx, "replica/"+string(rune('a'+i)), rec{N: i})
				s.Close()
			}
			errs[i] = err
		}()
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("replica %d: %v", i, err)
		}
	}
	ms, err := migrations()
	if err != nil {
		t.Fatal(err)
	}
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	var rows, maxV int
	if err := conn.QueryRow(ctx, "SELECT count(*), max(version) FROM schema_migrations").Scan(&rows, &maxV); err != nil {
		t.Fatal(err)
	}
	if rows != len(ms) || maxV != len(ms) {
		t.Fatalf("schema_migrations has %d rows up to version %d, want %d", rows, maxV, len(ms))
	}

	if _, err := conn.Exec(ctx, "INSERT INTO schema_migrations (version, name) VALUES (999, '0999_future')"); err != nil {
		t.Fatal(err)
	}
	_, err = OpenPostgres(ctx, dsn, PostgresOptions{})
	if !errors.Is(err, ErrSchemaTooNew) || !strings.Contains(err.Error(), "version 999") {
		t.Fatalf("open on a newer schema: %v, want ErrSchemaTooNew naming version 999", err)
	}
}

// TestPostgresPasswordAndUnreachable: the password comes from the options (a file or credential
// in production), an unreachable server is a clear start-up error, and no error carries the
// password.
func TestPostgresPasswordAndUnreachable(t *testing.T) {
	testenv.NeedsBackend(t, "postgres")
	ctx := context.Background()
	pg := testenv.StartPostgres(t)
	dsn := pg.NewDatabase(t)
	db, err := testenv.DatabaseOf(dsn)
	if err != nil {
		t.Fatal(err)
	}
	const pw = "pw-0f1e2d3c"
	pg.Exec(t, db, "CREATE ROLE "+testenv.PostgresPasswordRole+" LOGIN PASSWORD '"+pw+"'")
	pg.Exec(t, db, "GRANT ALL ON SCHEMA public TO "+testenv.PostgresPasswordRole)
	roleDSN := pg.DSN(testenv.PostgresPasswordRole, db)

	if _, err := OpenPostgres(ctx, roleDSN, PostgresOptions{ConnectTimeout: 5 * time.Second}); err == nil {
		t.Fatal("opened without the password: the role's password is not being checked")
	}
	_, err = OpenPostgres(ctx, roleDSN, PostgresOptions{Password: "wrong-password", ConnectTimeout: 5 * time.Second})
	if err == nil || strings.Contains(err.Error(), "wrong-password") {
		t.Fatalf("wrong password: %v, want an error without the password", err)
	}
	s, err := OpenPostgres(ctx, roleDSN, PostgresOptions{Password: pw})
	if err != nil {
		t.Fatalf("open with the password: %v", err)
	}
	if err := s.Create(ctx, "k", rec{N: 1}); err != nil {
		t.Fatal(err)
	}
	s.Close()

	pg.Stop(t)
	withPW := strings.Replace(roleDSN, testenv.PostgresPasswordRole+"@", testenv.PostgresPasswordRole+":"+pw+"@", 1)
	start := time.Now()
	_, err = OpenPostgres(ctx, withPW, PostgresOptions{ConnectTimeout: 3 * time.Second})
	if err == nil || !strings.Contains(err.Error(), "cannot reach PostgreSQL") || strings.Contains(err.Error(), pw) {
		t.Fatalf("open on a stopped server: %v, want a clear error without the password", err)
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Fatalf("open on a stopped server took %v, want it bounded by the connect timeout", d)
	}
	t.Logf("stopped server: %v", err)
}
