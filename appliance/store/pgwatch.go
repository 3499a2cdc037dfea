package store

import (
	"context"
	"encoding/hex"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
)

// notifyChannel is the PostgreSQL channel every write announces its record key on.
const notifyChannel = "kmsgate_records"

// ListenerApplicationName names the listening connection in pg_stat_activity, so an operator
// (or a test) can tell it from the pool's connections.
const ListenerApplicationName = "kmsgate-listener"

// listenPing bounds how long the listener waits for a notice before it checks that its
// connection is still alive: a server that vanished without closing the TCP connection would
// otherwise leave it waiting, and every cache stale, until the kernel gives up.
const listenPing = 15 * time.Second

func (b *pgBackend) shared() bool { return true }

// watch keeps one dedicated connection (outside the pool, which would hand it to other work)
// LISTENing on notifyChannel. After every (re)connect it reports a Reset: notices sent while it
// was not listening are lost, so the caller rebuilds its caches from the store.
func (b *pgBackend) watch(ctx context.Context, fn func(Change)) error {
	cfg := b.pool.Config().ConnConfig.Copy()
	cfg.RuntimeParams["application_name"] = ListenerApplicationName
	for failures := 0; ; failures++ {
		err := b.listen(ctx, cfg, func(c Change) {
			failures = 0
			fn(c)
		})
		if ctx.Err() != nil {
			return nil
		}
		b.log.Warn("store change listener lost its connection; reconnecting", "error", err)
		if sleepCtx(ctx, reconnectPause(failures)) != nil {
			return nil
		}
	}
}

// reconnectPause is 50ms for the first reconnect (a terminated backend or a fail-over is usually
// back at once), doubling to at most 2s while the server stays away.
func reconnectPause(failures int) time.Duration {
	return min(50*time.Millisecond<<min(failures, 6), 2*time.Second)
}

// listen runs one connection until it fails or ctx ends.
func (b *pgBackend) listen(ctx context.Context, cfg *pgx.ConnConfig, fn func(Change)) error {
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		return err
	}
	defer func() {
		cctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		_ = conn.Close(cctx)
	}()
	if _, err := conn.Exec(ctx, "LISTEN "+notifyChannel); err != nil {
		return err
	}
	fn(Change{Reset: true})
	for {
		wctx, cancel := context.WithTimeout(ctx, listenPing)
		n, err := conn.WaitForNotification(wctx)
		timedOut := wctx.Err() != nil
		cancel()
		switch {
		case err == nil:
			// A write of this process: the writer updated its caches when it wrote. Reading the
			// record again would be wasted, and harmful in an outage: the re-read fails and the
			// caller drops a cache entry that signing with a known key depends on.
			if b.own.has(n.PID) {
				continue
			}
			key, derr := hex.DecodeString(n.Payload)
			if derr != nil {
				// Not ours (someone else NOTIFYing on the channel): refresh rather than guess.
				fn(Change{Reset: true})
				continue
			}
			fn(Change{Key: string(key)})
		case ctx.Err() != nil:
			return ctx.Err()
		case timedOut && !conn.PgConn().IsClosed():
			pctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			err = conn.Ping(pctx)
			cancel()
			if err != nil {
				return err
			}
		default:
			return err
		}
	}
}

// pidSet is the set of PostgreSQL backend PIDs of this process's pool connections, so the listener
// can tell the notices of this process's writes from other replicas'.
type pidSet struct {
	mu sync.Mutex
	m  map[uint32]struct{}
}

func (p *pidSet) add(pid uint32) {
	p.mu.Lock()
	p.m[pid] = struct{}{}
	p.mu.Unlock()
}

func (p *pidSet) remove(pid uint32) {
	p.mu.Lock()
	delete(p.m, pid)
	p.mu.Unlock()
}

func (p *pidSet) has(pid uint32) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	_, ok := p.m[pid]
	return ok
}
