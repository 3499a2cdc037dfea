package store

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"syscall"
	"testing"

	badger "github.com/dgraph-io/badger/v4"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/kmsgate/kmsgate/internal/errs"
)

// TestClassifyStoreFaults pins which failures become store_unavailable (a retryable 503) and which
// keep their own meaning.
func TestClassifyStoreFaults(t *testing.T) {
	faults := []error{
		&pgconn.PgError{Code: "53100"}, // disk full
		&pgconn.PgError{Code: "25006"}, // read-only transaction
		&pgconn.PgError{Code: "57P01"}, // admin shutdown
		&pgconn.PgError{Code: "08006"}, // connection failure
		&pgconn.PgError{Code: "58030"}, // I/O error
		badger.ErrBlockedWrites, badger.ErrDBClosed, context.DeadlineExceeded,
		&fs.PathError{Op: "open", Path: "/x", Err: syscall.ENOSPC}, syscall.EROFS,
		fmt.Errorf("%w: gone", errStoreFault),
	}
	for _, e := range faults {
		got := classify(fmt.Errorf("store put: %w", e))
		if !IsUnavailable(got) || errs.KindOf(got) != errs.Unavailable || errs.RetryAfterOf(got) == 0 {
			t.Errorf("classify(%v) = %v, want store_unavailable", e, got)
		}
	}
	keep := []error{ErrNotFound, ErrExists, context.Canceled, errs.Errorf(errs.Conflict, "mine"),
		&pgconn.PgError{Code: "23505"}, &pgconn.PgError{Code: "57014"}, &pgconn.PgError{Code: "42P01"},
		errors.New("a callback's own error")}
	for _, e := range keep {
		got := classify(e)
		if IsUnavailable(got) || !errors.Is(got, e) {
			t.Errorf("classify(%v) = %v, want it unchanged", e, got)
		}
	}
	// A layer above may wrap the classified failure in a classified error of its own.
	outer := errs.Wrap(errs.Internal, fmt.Errorf("ctx: %w", classify(badger.ErrBlockedWrites)), "read key record")
	if !IsUnavailable(outer) || !IsUnavailable(errors.Join(errors.New("x"), outer)) {
		t.Errorf("IsUnavailable misses a wrapped store fault")
	}
}
