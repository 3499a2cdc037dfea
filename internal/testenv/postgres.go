package testenv

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net/url"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"sort"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// PostgresUser is the system user PostgreSQL runs as when the tests run as root: the server
// refuses to start as root, so the tests create this user (without a home or a login shell).
const PostgresUser = "kmsgate-pg"

// PostgresPasswordRole is a role that must authenticate with a password (SCRAM), for tests of
// password handling; every other role is trusted on the private socket. Tests create the role.
const PostgresPasswordRole = "kmsgate_pw"

const postgresPort = 5432

// Postgres is a private PostgreSQL server: its own cluster in a temporary directory, listening
// only on a Unix socket in that directory (no TCP port, so parallel test binaries never collide).
type Postgres struct {
	BinDir    string
	Dir       string // cluster root: the socket, the server log and (by default) data/
	DataDir   string // the data directory: Dir/data unless WithDataDir gave another
	SocketDir string

	mu      sync.Mutex
	running bool
	cred    *syscall.Credential // nil: run as ourselves
}

// PostgresBinDir finds the Debian server binaries (/usr/lib/postgresql/<major>/bin), newest major
// first.
func PostgresBinDir(t testing.TB) string {
	t.Helper()
	dirs, _ := filepath.Glob("/usr/lib/postgresql/*/bin")
	sort.Slice(dirs, func(i, j int) bool { return majorOf(dirs[i]) > majorOf(dirs[j]) })
	for _, d := range dirs {
		if _, err := os.Stat(filepath.Join(d, "initdb")); err == nil {
			return d
		}
	}
	t.Fatalf("testenv: PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin: " +
		"install them with `apt-get install -y postgresql` (tools/setup-test-env.sh does)")
	return ""
}

func majorOf(binDir string) int {
	n, _ := strconv.Atoi(filepath.Base(filepath.Dir(binDir)))
	return n
}

// PostgresOption changes how StartPostgres sets up the cluster.
type PostgresOption func(*Postgres)

// WithDataDir puts the data directory at dir (which must not exist yet, or be empty) instead of
// under the cluster root, e.g. on a small file system a test fills up. The socket and the server
// log stay in the cluster root, so the log keeps what the server says about the full disk. The
// caller owns dir's parent: it is not removed, and when the tests run as root it must be
// writable by PostgresUser.
func WithDataDir(dir string) PostgresOption { return func(p *Postgres) { p.DataDir = dir } }

// StartPostgres initialises a fresh cluster and starts it; the server is stopped and its
// directory removed when the test ends. Use NewDatabase for a database of one's own.
func StartPostgres(t testing.TB, opts ...PostgresOption) *Postgres {
	t.Helper()
	NeedsBackend(t, "postgres")
	p := &Postgres{BinDir: PostgresBinDir(t)}
	for _, o := range opts {
		o(p)
	}
	// Not t.TempDir: its parents are private to root, and the server may run as another user.
	// A short path also keeps the socket path under the 107-byte limit.
	dir, err := os.MkdirTemp("", "kmsgate-pg-")
	if err != nil {
		t.Fatal(err)
	}
	p.Dir, p.SocketDir = dir, dir
	if p.DataDir == "" {
		p.DataDir = filepath.Join(dir, "data")
	}
	t.Cleanup(func() {
		p.Stop(t)
		_ = os.RemoveAll(dir)
	})
	if os.Geteuid() == 0 {
		p.cred = postgresCredential(t)
		if err := os.Chown(dir, int(p.cred.Uid), int(p.cred.Gid)); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Chmod(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	data := p.DataDir
	p.run(t, "initdb", "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions")
	hba := fmt.Sprintf("local all %s scram-sha-256\nlocal all all trust\n", PostgresPasswordRole)
	if err := os.WriteFile(filepath.Join(data, "pg_hba.conf"), []byte(hba), 0o600); err != nil {
		t.Fatal(err)
	}
	if p.cred != nil {
		if err := os.Chown(filepath.Join(data, "pg_hba.conf"), int(p.cred.Uid), int(p.cred.Gid)); err != nil {
			t.Fatal(err)
		}
	}
	p.Start(t)
	return p
}

// postgresCredential returns the uid/gid of PostgresUser, creating the user when missing.
func postgresCredential(t testing.TB) *syscall.Credential {
	t.Helper()
	for attempt := 0; ; attempt++ {
		if u, err := user.Lookup(PostgresUser); err == nil {
			uid, _ := strconv.Atoi(u.Uid)
			gid, _ := strconv.Atoi(u.Gid)
			return &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}
		}
		// Parallel test binaries may race to create the user, or find /etc/passwd locked for a
		// moment; the lookup above settles both.
		out, err := exec.Command("useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent",
			"--shell", "/usr/sbin/nologin", PostgresUser).CombinedOutput()
		if err != nil && attempt >= 5 {
			t.Fatalf("testenv: PostgreSQL refuses to run as root and creating the user %s failed: %v\n%s",
				PostgresUser, err, out)
		}
		if err != nil {
			time.Sleep(200 * time.Millisecond)
		}
	}
}

func (p *Postgres) run(t testing.TB, prog string, args ...string) {
	t.Helper()
	cmd := exec.Command(filepath.Join(p.BinDir, prog), args...)
	cmd.Env = append(os.Environ(), "LC_ALL=C")
	cmd.Dir = p.Dir
	if p.cred != nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: p.cred}
	}
	if out, err := cmd.CombinedOutput(); err != nil {
		log, _ := os.ReadFile(filepath.Join(p.Dir, "server.log"))
		t.Fatalf("testenv: %s %v: %v\n%s\nserver log:\n%s", prog, args, err, out, log)
	}
}

// Start starts the (stopped) server and waits until it accepts connections. fsync is off: the
// tests never survive a machine crash, and it makes them several times faster.
func (p *Postgres) Start(t testing.TB) {
	t.Helper()
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.running {
		t.Fatal("testenv: postgres already running")
	}
	opts := fmt.Sprintf("-F -p %d -k %s -c listen_addresses='' -c max_connections=100 -c shared_buffers=16MB", postgresPort, p.SocketDir)
	p.run(t, "pg_ctl", "start", "-w", "-t", "60", "-D", p.DataDir, "-l", filepath.Join(p.Dir, "server.log"), "-o", opts)
	p.running = true
}

// Stop stops the server at once (immediate mode: what a crash or a kill looks like to clients).
func (p *Postgres) Stop(t testing.TB) {
	t.Helper()
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.running {
		return
	}
	p.run(t, "pg_ctl", "stop", "-w", "-m", "immediate", "-D", p.DataDir)
	p.running = false
}

// DSN is the URL of database db as role user (trusted on the socket unless it is
// PostgresPasswordRole).
func (p *Postgres) DSN(user, db string) string {
	return fmt.Sprintf("postgres://%s@/%s?host=%s&port=%d&sslmode=disable", url.PathEscape(user), url.PathEscape(db),
		url.QueryEscape(p.SocketDir), postgresPort)
}

// NewDatabase creates an empty database for one test and returns its superuser URL.
func (p *Postgres) NewDatabase(t testing.TB) string {
	t.Helper()
	var b [6]byte
	_, _ = rand.Read(b[:])
	name := "t_" + hex.EncodeToString(b[:])
	p.Exec(t, "postgres", "CREATE DATABASE "+name)
	return p.DSN("postgres", name)
}

// Exec runs one SQL statement as the superuser in database db.
func (p *Postgres) Exec(t testing.TB, db, sql string, args ...any) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, p.DSN("postgres", db))
	if err != nil {
		t.Fatalf("testenv: connect to postgres: %v", err)
	}
	defer conn.Close(ctx)
	if _, err := conn.Exec(ctx, sql, args...); err != nil {
		t.Fatalf("testenv: %s: %v", sql, err)
	}
}

// PostgresDSN starts a server for this test and returns the URL of a fresh database on it.
func PostgresDSN(t testing.TB) string {
	t.Helper()
	return StartPostgres(t).NewDatabase(t)
}

// DatabaseOf returns the database name in a URL made by DSN or NewDatabase.
func DatabaseOf(dsn string) (string, error) {
	u, err := url.Parse(dsn)
	if err != nil {
		return "", err
	}
	if len(u.Path) < 2 {
		return "", errors.New("no database in URL")
	}
	return u.Path[1:], nil
}
