package store

import (
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
)

// CopyStats counts the records of a copy by kind (the key prefix up to its first "/").
type CopyStats struct {
	Records int
	ByKind  map[string]int
}

func (c CopyStats) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "%d records", c.Records)
	for _, k := range slices.Sorted(maps.Keys(c.ByKind)) {
		fmt.Fprintf(&b, ", %s %d", k, c.ByKind[k])
	}
	return b.String()
}

// ErrNotEmpty is returned by Copy when the destination already holds records: a copy never
// merges two stores.
var ErrNotEmpty = errors.New("the destination store is not empty")

// copyBatch is how many records one destination transaction writes.
const copyBatch = 500

// Copy writes every record of src into the empty store dst, byte for byte, then re-reads dst and
// checks that it holds exactly src's records. Neither store may be written to meanwhile (the
// servers using them must be stopped).
func Copy(ctx context.Context, dst, src *Store) (CopyStats, error) {
	empty := true
	if err := dst.List(ctx, "", func(string, []byte) error { empty = false; return errStop }); err != nil && !errors.Is(err, errStop) {
		return CopyStats{}, err
	}
	if !empty {
		return CopyStats{}, ErrNotEmpty
	}
	want := map[string][sha256.Size]byte{}
	stats := CopyStats{ByKind: map[string]int{}}
	type rec struct {
		k string
		v json.RawMessage
	}
	var batch []rec
	flush := func() error {
		err := dst.Update(ctx, func(tx *Txn) error {
			for _, r := range batch {
				if err := tx.tx.create(r.k, r.v); err != nil {
					return fmt.Errorf("copy %q: %w", r.k, err)
				}
			}
			return nil
		})
		batch = batch[:0]
		return err
	}
	err := src.List(ctx, "", func(key string, val []byte) error {
		want[key] = sha256.Sum256(val)
		stats.Records++
		stats.ByKind[kindOf(key)]++
		batch = append(batch, rec{key, append(json.RawMessage(nil), val...)})
		if len(batch) >= copyBatch {
			return flush()
		}
		return nil
	})
	if err == nil && len(batch) > 0 {
		err = flush()
	}
	if err != nil {
		return stats, fmt.Errorf("store copy: %w", err)
	}
	got := 0
	err = dst.List(ctx, "", func(key string, val []byte) error {
		h, ok := want[key]
		if !ok {
			return fmt.Errorf("the destination holds %q, which the source does not", key)
		}
		if sha256.Sum256(val) != h {
			return fmt.Errorf("the destination's %q differs from the source's", key)
		}
		got++
		return nil
	})
	if err != nil {
		return stats, fmt.Errorf("store copy: verify: %w", err)
	}
	if got != stats.Records {
		return stats, fmt.Errorf("store copy: verify: the destination holds %d records, the source %d", got, stats.Records)
	}
	return stats, nil
}

var errStop = errors.New("stop")

func kindOf(key string) string {
	if i := strings.IndexByte(key, '/'); i >= 0 {
		return key[:i]
	}
	return key
}
