package cli_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/kmsgate/kmsgate/appliance"
	"github.com/kmsgate/kmsgate/appliance/store"
)

// storeCensus opens the (stopped) server's store and counts the sealed db keys no key record or
// key-chain record references, the open key intents, and which of kids have a key record.
type census struct {
	sealed, orphans, intents int
	missing                  []string
}

func takeCensus(t *testing.T, dir string, kids []string) census {
	t.Helper()
	ctx := context.Background()
	st, err := store.Open(appliance.DBDir(dir), store.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	refs := map[string]bool{}
	// Key records and key chains both hold references as {"providerId", "externalId"} objects;
	// walking the JSON finds them whatever shape a chain record has.
	var walk func(v any)
	walk = func(v any) {
		switch x := v.(type) {
		case map[string]any:
			if p, _ := x["providerId"].(string); p == "db" {
				if id, _ := x["externalId"].(string); id != "" {
					refs[id] = true
				}
			}
			for _, c := range x {
				walk(c)
			}
		case []any:
			for _, c := range x {
				walk(c)
			}
		}
	}
	for _, prefix := range []string{"key/", "chain/", "meta/system-key"} {
		err := st.List(ctx, prefix, func(_ string, val []byte) error {
			var v any
			if err := json.Unmarshal(val, &v); err != nil {
				return err
			}
			walk(v)
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	var c census
	st.List(ctx, "dbkey/", func(k string, _ []byte) error {
		c.sealed++
		if !refs[strings.TrimPrefix(k, "dbkey/")] {
			c.orphans++
		}
		return nil
	})
	st.List(ctx, "intent/", func(string, []byte) error { c.intents++; return nil })
	for _, kid := range kids {
		var r store.KeyRef
		if err := st.Get(ctx, store.KeyRecordKey("acme", kid), &r); err != nil {
			c.missing = append(c.missing, kid)
		}
	}
	return c
}

// TestCrashLeavesNoOrphanedKeys kills the server with SIGKILL while 16 clients create db keys.
// Keys whose create was in flight exist as sealed keys without a key record; after a restart the
// intent sweep must have deleted every one of them, and every acknowledged key must still exist.
func TestCrashLeavesNoOrphanedKeys(t *testing.T) {
	if testing.Short() {
		t.Skip("starts server processes")
	}
	dir := t.TempDir()
	out, err := run(t, "tenant", "create", "acme", "--data-dir", dir)
	if err != nil {
		t.Fatalf("%v %s", err, out)
	}
	var ten struct{ APIKey string }
	json.Unmarshal([]byte(out), &ten)
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	addr := ln.Addr().String()
	ln.Close()
	base := "http://" + addr
	const maxAge = 300 * time.Millisecond
	env := []string{"KMSGATE_CREATE_RATE=-1", "KMSGATE_KEY_INTENT_MAX_AGE=" + maxAge.String()}
	client := &http.Client{Timeout: 5 * time.Second}

	var acked []string
	var before census
	for attempt := 1; ; attempt++ {
		srv := startHelper(t, dir, addr, env...)
		var mu sync.Mutex
		var n atomic.Int64
		var wg sync.WaitGroup
		stop := make(chan struct{})
		for w := 0; w < 16; w++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := 0; ; i++ {
					select {
					case <-stop:
						return
					default:
					}
					kid := fmt.Sprintf("a%d-w%d-%d", attempt, w, i)
					b, _ := json.Marshal(map[string]string{"kid": kid})
					req, _ := http.NewRequest("POST", base+"/keys", bytes.NewReader(b))
					req.Header.Set("Authorization", "Bearer "+ten.APIKey)
					req.Header.Set("Content-Type", "application/json")
					resp, err := client.Do(req)
					if err != nil {
						return // the server died
					}
					resp.Body.Close()
					if resp.StatusCode == 200 {
						n.Add(1)
						mu.Lock()
						acked = append(acked, kid)
						mu.Unlock()
					}
				}
			}()
		}
		for n.Load() < 200 {
			time.Sleep(10 * time.Millisecond)
		}
		if err := srv.Process.Signal(syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
		srv.Wait()
		close(stop)
		wg.Wait()
		mu.Lock()
		before = takeCensus(t, dir, acked)
		mu.Unlock()
		t.Logf("attempt %d after SIGKILL: %d acknowledged creates, %d sealed db keys, %d without a reference, %d open intents",
			attempt, len(acked), before.sealed, before.orphans, before.intents)
		if len(before.missing) > 0 {
			t.Fatalf("acknowledged keys lost: %v", before.missing)
		}
		if before.orphans > before.intents {
			t.Fatalf("%d unreferenced sealed keys but only %d intents: a key was created without an intent",
				before.orphans, before.intents)
		}
		if before.orphans > 0 || attempt == 5 {
			break
		}
	}
	if before.orphans == 0 {
		t.Fatal("no kill landed inside a create in 5 attempts: the test proves nothing")
	}
	time.Sleep(2 * maxAge) // the intents must be older than the maximum age at the restart

	srv := startHelper(t, dir, addr, env...) // sweeps before it listens
	if err := srv.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	srv.Wait()
	after := takeCensus(t, dir, acked)
	t.Logf("after restart and sweep: %d sealed db keys, %d without a reference, %d open intents",
		after.sealed, after.orphans, after.intents)
	if after.orphans != 0 || after.intents != 0 {
		t.Fatalf("after the sweep: %d orphaned sealed keys, %d intents; want 0 and 0", after.orphans, after.intents)
	}
	if len(after.missing) > 0 {
		t.Fatalf("acknowledged keys lost by the sweep: %v", after.missing)
	}
	if after.sealed != before.sealed-before.orphans {
		t.Fatalf("the sweep deleted %d sealed keys, want exactly the %d orphans", before.sealed-after.sealed, before.orphans)
	}
}
