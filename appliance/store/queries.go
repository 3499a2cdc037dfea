package store

import "sync/atomic"

// Store operations counted by Queries: a closed set, so the metric built on it has a fixed number
// of series.
const (
	OpGet    = "get"
	OpPut    = "put"
	OpCreate = "create"
	OpDelete = "delete"
	OpList   = "list"
	OpUpdate = "update" // one attempt of a read-write transaction; its reads and writes count on their own
)

// Ops lists every operation Queries counts.
var Ops = []string{OpGet, OpPut, OpCreate, OpDelete, OpList, OpUpdate}

// queryCounts counts store operations by kind. Plain atomics: the counters sit on every store
// call, and a metrics library call per operation would tie the store to it.
type queryCounts struct {
	get, put, create, del, list, update atomic.Uint64
}

func (q *queryCounts) counter(op string) *atomic.Uint64 {
	switch op {
	case OpGet:
		return &q.get
	case OpPut:
		return &q.put
	case OpCreate:
		return &q.create
	case OpDelete:
		return &q.del
	case OpList:
		return &q.list
	case OpUpdate:
		return &q.update
	}
	return nil
}

func (q *queryCounts) inc(op string) { q.counter(op).Add(1) }

// Queries returns how many operations of kind op (one of Ops) this store has run since it was
// opened, on either engine. Each is one round trip to PostgreSQL (a List of more than one page
// counts once), so a path that leaves these counters alone does not depend on the database.
func (s *Store) Queries(op string) uint64 {
	if c := s.q.counter(op); c != nil {
		return c.Load()
	}
	return 0
}
