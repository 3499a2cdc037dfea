package store

import (
	"context"
	"errors"
	"io"
	"io/fs"
	"net"
	"syscall"
	"time"

	badger "github.com/dgraph-io/badger/v4"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/kmsgate/kmsgate/internal/errs"
)

// CodeUnavailable is the stable API code of a request that failed because the store could not be
// read or written (PostgreSQL down or out of space, the data directory gone, full or read-only).
const CodeUnavailable = "store_unavailable"

// unavailableRetryAfter is the retry hint sent with store_unavailable: a restarted PostgreSQL or a
// freed disk is usually back within seconds, and a shorter hint would only add load to a sick store.
const unavailableRetryAfter = 5 * time.Second

// unavailable classifies a store I/O failure. The cause stays for the log; callers see a stable
// code and a message without the engine's own text (paths, host names, SQL states).
func unavailable(cause error) error {
	return &errs.Error{Kind: errs.Unavailable, Msg: "the store is unavailable; retry later", Err: cause,
		Code: CodeUnavailable, RetryAfter: unavailableRetryAfter}
}

// IsUnavailable reports whether err is, or anywhere wraps, a classified store I/O failure: a layer
// above may have wrapped it in a classified error of its own (errs.CodeOf sees only the outermost).
func IsUnavailable(err error) bool {
	for err != nil {
		if e, ok := err.(*errs.Error); ok && e.Code == CodeUnavailable {
			return true
		}
		switch u := err.(type) {
		case interface{ Unwrap() []error }:
			for _, e := range u.Unwrap() {
				if IsUnavailable(e) {
					return true
				}
			}
			return false
		case interface{ Unwrap() error }:
			err = u.Unwrap()
		default:
			return false
		}
	}
	return false
}

// classify turns an engine's I/O failure into the store_unavailable kind and leaves every other
// error alone: the store's own sentinels, errors already classified (a callback's own), a caller's
// cancellation and decode errors keep their meaning.
func classify(err error) error {
	if err == nil || errors.Is(err, ErrNotFound) || errors.Is(err, ErrExists) || errors.Is(err, context.Canceled) {
		return err
	}
	var ce *errs.Error
	if errors.As(err, &ce) {
		return err
	}
	if isFault(err) {
		return unavailable(err)
	}
	return err
}

// isFault recognises the failures of a store that cannot currently serve, as opposed to a bug or a
// bad record: the engine is closed or blocks writes, the file system refuses (gone, full,
// read-only, I/O error), or PostgreSQL is unreachable, shutting down, out of resources, read-only
// or too slow.
func isFault(err error) bool {
	if errors.Is(err, errStoreFault) || errors.Is(err, badger.ErrBlockedWrites) || errors.Is(err, badger.ErrDBClosed) ||
		errors.Is(err, context.DeadlineExceeded) ||
		errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, net.ErrClosed) {
		return true
	}
	var pe *pgconn.PgError
	if errors.As(err, &pe) {
		return pgFaultCode(pe.Code)
	}
	var (
		pathErr *fs.PathError
		errno   syscall.Errno
		netErr  net.Error
		connErr *pgconn.ConnectError
	)
	return errors.As(err, &pathErr) || errors.As(err, &errno) || errors.As(err, &netErr) ||
		errors.As(err, &connErr) || pgconn.Timeout(err)
}

// pgFaultCode reports the SQLSTATEs of a server that cannot serve now: connection exceptions
// (08), insufficient resources (53: disk full 53100, out of memory, too many connections),
// operator intervention (57: admin shutdown, crash shutdown, cannot connect now, but not 57014, a
// cancelled statement), system errors (58: I/O), and a read-only transaction (25006, a standby or
// default_transaction_read_only).
func pgFaultCode(code string) bool {
	if len(code) != 5 {
		return false
	}
	switch code[:2] {
	case "08", "53", "58":
		return true
	case "57":
		return code != "57014"
	}
	return code == "25006"
}

// errStoreFault marks a write refused because the store was already found faulty.
var errStoreFault = errors.New("store fault")
