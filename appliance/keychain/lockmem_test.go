package keychain

import (
	"crypto/rand"
	"encoding/hex"
	"runtime"
	"testing"

	"github.com/kmsgate/kmsgate/internal/errs"
)

func heapInuse() uint64 {
	runtime.GC()
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.HeapInuse
}

// TestUnknownIDsDoNotGrowMemory replays the memory-exhaustion attack: a manage key sends tens of
// thousands of update/delete/rotate requests with long random ids. Each answers 404 and the heap
// stays flat (the locks must not grow with the ids requested).
func TestUnknownIDsDoNotGrowMemory(t *testing.T) {
	e := newEnv(t)
	const n = 10000 // per operation: 30,000 requests in all
	randID := func(long bool) string {
		b := make([]byte, 63)
		if long {
			b = make([]byte, 2048) // 4 KiB: far beyond the id syntax
		}
		_, _ = rand.Read(b)
		return "a" + hex.EncodeToString(b)[:len(b)*2-1]
	}
	before := heapInuse()
	for i := 0; i < n; i++ {
		long := i%2 == 0
		wantCode(t, e.svc.Update(ctx, testTenant, randID(long), UpdateRequest{Description: ptr("x")}), errs.NotFound, "key_chain_not_found")
		wantCode(t, e.svc.Delete(ctx, testTenant, randID(long)), errs.NotFound, "key_chain_not_found")
		wantCode(t, e.svc.Rotate(ctx, testTenant, randID(long), "manual"), errs.NotFound, "key_chain_not_found")
	}
	after := heapInuse()
	// The service must stay reachable while the heap is measured, or the GC frees what it holds.
	runtime.KeepAlive(e.svc)
	growth := int64(after) - int64(before)
	t.Logf("heap in use: before %d KiB, after %d KiB, growth %d KiB over %d requests", before/1024, after/1024, growth/1024, 3*n)
	if growth > 8<<20 {
		t.Fatalf("heap grew by %d KiB over %d requests with unknown ids", growth/1024, 3*n)
	}
}
