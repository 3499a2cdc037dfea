package store

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
)

// PostgresOptions configure the PostgreSQL engine.
type PostgresOptions struct {
	// Password, when set, overrides any password in the URL (it comes from a file or a systemd
	// credential, so it never has to appear in a command line or a unit file).
	Password string
	// ConnectTimeout bounds the start-up connection and migrations (default 10s).
	ConnectTimeout time.Duration
	Logger         *slog.Logger
}

// IsPostgresURL reports whether s selects the PostgreSQL engine rather than a Badger directory.
func IsPostgresURL(s string) bool {
	return strings.HasPrefix(s, "postgres://") || strings.HasPrefix(s, "postgresql://")
}

// RedactURL returns a PostgreSQL URL fit for logs and errors: the password, in the user info or
// as a query parameter, is replaced.
func RedactURL(dsn string) string {
	u, err := url.Parse(dsn)
	if err != nil {
		return "postgres://(unparseable URL)"
	}
	if q := u.Query(); q.Has("password") {
		q.Set("password", "xxxxx")
		u.RawQuery = q.Encode()
	}
	return u.Redacted()
}

// pgBackend is the shared engine: every replica of a deployment uses the same database.
type pgBackend struct {
	pool *pgxpool.Pool
	ops  pgOps
	log  *slog.Logger
	own  *pidSet // backend PIDs of this process's pool connections
}

// OpenPostgres connects to the database at dsn (a postgres:// URL) and migrates its schema. An
// unreachable server or a schema newer than this binary is an error, so a replica that cannot use
// the store never starts serving.
func OpenPostgres(ctx context.Context, dsn string, o PostgresOptions) (*Store, error) {
	red := RedactURL(dsn)
	if !IsPostgresURL(dsn) {
		return nil, fmt.Errorf("store: %s is not a postgres:// URL", red)
	}
	cfg, err := pgxpool.ParseConfig(dsn)
	if err != nil {
		// pgx redacts the password in its own message too.
		return nil, fmt.Errorf("store: invalid PostgreSQL URL %s: %w", red, err)
	}
	if o.Password != "" {
		cfg.ConnConfig.Password = o.Password
	}
	// pgx sizes the pool by CPU count (4 on small hosts). Signing never waits on the store, but
	// a burst of admin writes, each a transaction plus the reads around it, would queue behind
	// 4 connections; pool_max_conns in the URL still overrides this.
	if !strings.Contains(dsn, "pool_max_conns") && cfg.MaxConns < 16 {
		cfg.MaxConns = 16
	}
	if o.ConnectTimeout <= 0 {
		o.ConnectTimeout = 10 * time.Second
	}
	if cfg.ConnConfig.ConnectTimeout == 0 || cfg.ConnConfig.ConnectTimeout > o.ConnectTimeout {
		cfg.ConnConfig.ConnectTimeout = o.ConnectTimeout
	}
	own := &pidSet{m: map[uint32]struct{}{}}
	cfg.AfterConnect = func(_ context.Context, c *pgx.Conn) error {
		own.add(c.PgConn().PID())
		return nil
	}
	cfg.BeforeClose = func(c *pgx.Conn) { own.remove(c.PgConn().PID()) }
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("store: PostgreSQL at %s: %w", red, err)
	}
	sctx, cancel := context.WithTimeout(ctx, o.ConnectTimeout)
	defer cancel()
	if err := pool.Ping(sctx); err != nil {
		pool.Close()
		return nil, fmt.Errorf("store: cannot reach PostgreSQL at %s: %w", red, err)
	}
	if err := migrate(sctx, pool); err != nil {
		pool.Close()
		return nil, fmt.Errorf("store: PostgreSQL at %s: %w", red, err)
	}
	log := o.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Store{b: &pgBackend{pool: pool, ops: pgOps{q: pool}, log: log, own: own}}, nil
}

func (b *pgBackend) close() error { b.pool.Close(); return nil }

// gc: PostgreSQL's autovacuum reclaims space on its own.
func (b *pgBackend) gc() {}

func (b *pgBackend) get(ctx context.Context, key string) ([]byte, error) {
	return b.ops.get(ctx, key)
}
func (b *pgBackend) put(ctx context.Context, key string, val []byte) error {
	return b.ops.put(ctx, key, val)
}
func (b *pgBackend) create(ctx context.Context, key string, val []byte) error {
	return b.ops.create(ctx, key, val)
}
func (b *pgBackend) del(ctx context.Context, key string) error { return b.ops.del(ctx, key) }

// listPage is how many rows one List query fetches. Paging keeps memory bounded and, unlike
// streaming one cursor, holds no connection while the callback runs (which may itself use the
// store). The price: a List is not one snapshot across pages, only each page is.
const listPage = 256

func (b *pgBackend) list(ctx context.Context, prefix string, fn func(key string, val []byte) error) error {
	hi := prefixEnd([]byte(prefix))
	var after []byte
	for {
		conds := []string{"key >= $1"}
		args := []any{[]byte(prefix)}
		if after != nil {
			conds[0], args[0] = "key > $1", after
		}
		if hi != nil {
			conds = append(conds, fmt.Sprintf("key < $%d", len(args)+1))
			args = append(args, hi)
		}
		q := fmt.Sprintf("SELECT key, value FROM records WHERE %s ORDER BY key LIMIT %d", strings.Join(conds, " AND "), listPage)
		rows, err := b.pool.Query(ctx, q, args...)
		if err != nil {
			return fmt.Errorf("store list: %w", err)
		}
		type kv struct{ k, v []byte }
		var page []kv
		for rows.Next() {
			var r kv
			if err := rows.Scan(&r.k, &r.v); err != nil {
				rows.Close()
				return fmt.Errorf("store list: %w", err)
			}
			page = append(page, r)
		}
		if err := rows.Err(); err != nil {
			return fmt.Errorf("store list: %w", err)
		}
		for _, r := range page {
			if err := fn(string(r.k), r.v); err != nil {
				return err
			}
		}
		if len(page) < listPage {
			return nil
		}
		after = page[len(page)-1].k
	}
}

// prefixEnd is the smallest key greater than every key starting with p, or nil when there is
// none (p empty or all 0xff): the exclusive upper bound of a prefix scan in byte order.
func prefixEnd(p []byte) []byte {
	end := append([]byte(nil), p...)
	for i := len(end) - 1; i >= 0; i-- {
		if end[i] < 0xff {
			end[i]++
			return end[:i+1]
		}
	}
	return nil
}

// update runs fn in a SERIALIZABLE transaction and re-runs it when PostgreSQL aborted it for a
// serialisation failure or a deadlock: the transaction lost a race, nothing was written, and
// running it again on the new state is what a serial execution would have done.
func (b *pgBackend) update(ctx context.Context, fn func(tx backendTxn) error) error {
	for i := 0; ; i++ {
		t := &pgTxn{ctx: ctx}
		err := pgx.BeginTxFunc(ctx, b.pool, pgx.TxOptions{IsoLevel: pgx.Serializable}, func(tx pgx.Tx) error {
			t.ops = pgOps{q: tx}
			return fn(t)
		})
		// fn may have swallowed the failure of one statement (the transaction is then aborted
		// and its commit fails), so a retryable error seen inside also counts.
		if err == nil || !(retryable(err) || t.sawRetryable) || i >= maxConflictRetries {
			return err
		}
		if err := sleepCtx(ctx, retryPause(i)); err != nil {
			return err
		}
	}
}

// retryable reports a serialisation failure, a deadlock, or a unique violation (which a
// SERIALIZABLE insert racing another can report instead of a serialisation failure).
func retryable(err error) bool {
	var pe *pgconn.PgError
	if !errors.As(err, &pe) {
		return false
	}
	switch pe.Code {
	case "40001", "40P01", "23505":
		return true
	}
	return false
}

// querier is what a pool and a transaction have in common.
type querier interface {
	Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error)
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
}

// notifyWritten completes a statement whose CTE w returns the keys it wrote or deleted: it
// announces each on notifyChannel, inside the statement's transaction, so PostgreSQL delivers
// the notice only once that transaction commits (and drops it on a rollback). Keys contain NUL,
// which a notice payload cannot carry, hence hex. Its row count is the number of keys written.
const notifyWritten = "SELECT pg_notify('" + notifyChannel + "', encode(key, 'hex')) FROM w"

// pgOps are the single-record statements, on the pool (autocommit) or inside a transaction.
type pgOps struct{ q querier }

func (o pgOps) get(ctx context.Context, key string) ([]byte, error) {
	var v []byte
	err := o.q.QueryRow(ctx, "SELECT value FROM records WHERE key = $1", []byte(key)).Scan(&v)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, ErrNotFound
	}
	if err != nil {
		return nil, fmt.Errorf("store get: %w", err)
	}
	return v, nil
}

func (o pgOps) put(ctx context.Context, key string, val []byte) error {
	_, err := o.q.Exec(ctx, `WITH w AS (INSERT INTO records (key, value) VALUES ($1, $2)
		ON CONFLICT (key) DO UPDATE SET value = excluded.value, version = records.version + 1, updated_at = now()
		RETURNING key) `+notifyWritten, []byte(key), val)
	if err != nil {
		return fmt.Errorf("store put: %w", err)
	}
	return nil
}

func (o pgOps) create(ctx context.Context, key string, val []byte) error {
	tag, err := o.q.Exec(ctx, `WITH w AS (INSERT INTO records (key, value) VALUES ($1, $2)
		ON CONFLICT (key) DO NOTHING RETURNING key) `+notifyWritten, []byte(key), val)
	if err != nil {
		return fmt.Errorf("store create: %w", err)
	}
	if tag.RowsAffected() == 0 {
		return ErrExists
	}
	return nil
}

func (o pgOps) del(ctx context.Context, key string) error {
	if _, err := o.q.Exec(ctx, `WITH w AS (DELETE FROM records WHERE key = $1 RETURNING key) `+notifyWritten,
		[]byte(key)); err != nil {
		return fmt.Errorf("store delete: %w", err)
	}
	return nil
}

// pgTxn is one attempt of an Update transaction.
type pgTxn struct {
	ctx          context.Context
	ops          pgOps
	sawRetryable bool
}

func (t *pgTxn) note(err error) error {
	if err != nil && retryable(err) {
		t.sawRetryable = true
	}
	return err
}

func (t *pgTxn) get(key string) ([]byte, error) {
	v, err := t.ops.get(t.ctx, key)
	return v, t.note(err)
}
func (t *pgTxn) put(key string, val []byte) error    { return t.note(t.ops.put(t.ctx, key, val)) }
func (t *pgTxn) create(key string, val []byte) error { return t.note(t.ops.create(t.ctx, key, val)) }
func (t *pgTxn) del(key string) error                { return t.note(t.ops.del(t.ctx, key)) }
