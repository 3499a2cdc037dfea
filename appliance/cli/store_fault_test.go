package cli_test

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/kmsgate/kmsgate/appliance"
)

// stopBound is how long SIGTERM may take under a store fault: well inside the systemd unit's
// TimeoutStopSec (45 s), so the service manager sees our exit status rather than its SIGKILL.
const stopBound = 10 * time.Second

// mountTmpfs mounts a small tmpfs at a new directory and unmounts it when the test ends. It skips
// the test where mounting is not allowed (not root, no CAP_SYS_ADMIN).
func mountTmpfs(t *testing.T, size string) string {
	t.Helper()
	dir := t.TempDir()
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size="+size+",mode=0700", "tmpfs", dir).CombinedOutput(); err != nil {
		t.Fatalf("cannot mount a tmpfs here (the tests run as root in tools/netns-run.sh): %v %s", err, out)
	}
	t.Cleanup(func() { exec.Command("umount", "-l", dir).Run() })
	return dir
}

func mustRun(t *testing.T, name string, args ...string) {
	t.Helper()
	if out, err := exec.Command(name, args...).CombinedOutput(); err != nil {
		t.Fatalf("%s %v: %v %s", name, args, err, out)
	}
}

type problemBody struct {
	Code string `json:"code"`
}

// TestBadgerStoreFaults injects each file-system fault under a running server: writes answer 503
// store_unavailable, /health reports the store down, signing with a known key goes on, SIGTERM
// ends the process within stopBound with a non-zero status (the store could not be flushed), and
// after the fault is cleared a restart has every acknowledged write.
func TestBadgerStoreFaults(t *testing.T) {
	if testing.Short() {
		t.Skip("starts server processes")
	}
	faults := []struct {
		name string
		// inject breaks the store under dir (the data dir) and returns what clears the fault.
		inject func(t *testing.T, dir string) (clear func())
	}{
		{"directory removed", func(t *testing.T, dir string) func() {
			// Renamed away rather than deleted, so that "clearing the fault" (restoring the
			// directory) can show that no acknowledged write was lost.
			db, gone := appliance.DBDir(dir), appliance.DBDir(dir)+".removed"
			if err := os.Rename(db, gone); err != nil {
				t.Fatal(err)
			}
			return func() {
				if err := os.Rename(gone, db); err != nil {
					t.Fatal(err)
				}
			}
		}},
		{"file system full", func(t *testing.T, dir string) func() {
			fill := filepath.Join(dir, "filler")
			f, err := os.Create(fill)
			if err != nil {
				t.Fatal(err)
			}
			buf := make([]byte, 1<<20)
			for {
				if _, err := f.Write(buf); err != nil {
					if !errors.Is(err, syscall.ENOSPC) {
						t.Fatalf("fill: %v", err)
					}
					break
				}
			}
			f.Close()
			return func() {
				if err := os.Remove(fill); err != nil {
					t.Fatal(err)
				}
			}
		}},
		{"read-only remount", func(t *testing.T, dir string) func() {
			// A remount of the tmpfs itself fails with EBUSY while Badger holds files open for
			// writing (Linux refuses to make a mount with writers read-only). A read-only bind
			// mount over the database directory gives what a remount gives the process: new files
			// cannot be created and statfs reports the mount read-only.
			db := appliance.DBDir(dir)
			mustRun(t, "mount", "--bind", db, db)
			mustRun(t, "mount", "-o", "remount,ro,bind", db)
			return func() { mustRun(t, "umount", db) }
		}},
	}
	for _, fc := range faults {
		t.Run(fc.name, func(t *testing.T) {
			dir := mountTmpfs(t, "64m")
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

			srv := startHelper(t, dir, addr)
			if st, body := post(t, base+"/keys", ten.APIKey, map[string]string{"kid": "before"}); st != 200 {
				t.Fatalf("generate: %d %s", st, body)
			}
			sign := func(kid string) (int, []byte) {
				return post(t, base+"/keys/"+kid+"/sign", ten.APIKey, map[string]string{"data": base64.StdEncoding.EncodeToString([]byte("m"))})
			}
			if st, body := sign("before"); st != 200 {
				t.Fatalf("sign: %d %s", st, body)
			}

			var signs, signErrs atomic.Int64
			stop := make(chan struct{})
			var wg sync.WaitGroup
			wg.Add(1)
			go func() {
				defer wg.Done()
				for {
					select {
					case <-stop:
						return
					default:
					}
					if st, _ := sign("before"); st != 200 {
						signErrs.Add(1)
					}
					signs.Add(1)
				}
			}()

			clear := fc.inject(t, dir)
			t.Cleanup(func() {
				if clear != nil {
					clear()
				}
			})

			st, body, hdr := postH(t, base+"/keys", ten.APIKey, map[string]string{"kid": "during"})
			var p problemBody
			json.Unmarshal(body, &p)
			if st != 503 || p.Code != "store_unavailable" || hdr.Get("Retry-After") == "" {
				t.Fatalf("write under the fault: %d %s (Retry-After %q), want 503 store_unavailable", st, body, hdr.Get("Retry-After"))
			}
			waitStoreDown(t, base)
			time.Sleep(500 * time.Millisecond) // let the sign loop run under the fault
			close(stop)
			wg.Wait()
			if signErrs.Load() != 0 || signs.Load() == 0 {
				t.Fatalf("signing under the fault: %d errors in %d signatures", signErrs.Load(), signs.Load())
			}

			start := time.Now()
			srv.Process.Signal(syscall.SIGTERM)
			exited := make(chan error, 1)
			go func() { exited <- srv.Wait() }()
			select {
			case err = <-exited:
			case <-time.After(stopBound):
				srv.Process.Kill()
				<-exited
				t.Fatalf("SIGTERM under the fault: still running after %s", stopBound)
			}
			took := time.Since(start)
			var ee *exec.ExitError
			if !errors.As(err, &ee) || ee.ExitCode() == 0 {
				t.Fatalf("SIGTERM under the fault: exit %v, want a non-zero status (store not flushed)", err)
			}
			t.Logf("FIGURE badger fault %q: %d signatures, 0 errors; SIGTERM exit after %s with status %d",
				fc.name, signs.Load(), took.Round(time.Millisecond), ee.ExitCode())

			clear()
			clear = nil
			srv = startHelper(t, dir, addr)
			if st, body := sign("before"); st != 200 {
				t.Fatalf("acknowledged key lost after the fault: %d %s", st, body)
			}
			if st, body := post(t, base+"/keys", ten.APIKey, map[string]string{"kid": "after"}); st != 200 {
				t.Fatalf("write after the fault: %d %s", st, body)
			}
			srv.Process.Signal(syscall.SIGTERM)
			if err := srv.Wait(); err != nil {
				t.Fatalf("clean stop after recovery: %v", err)
			}
		})
	}
}

func postH(t *testing.T, url, key string, body any) (int, []byte, http.Header) {
	t.Helper()
	b, _ := json.Marshal(body)
	req, _ := http.NewRequest("POST", url, bytes.NewReader(b))
	req.Header.Set("Authorization", "Bearer "+key)
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	out, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, out, resp.Header
}

// waitStoreDown polls /health until it reports the store down with store_unavailable.
func waitStoreDown(t *testing.T, base string) {
	t.Helper()
	var last string
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		resp, err := http.Get(base + "/health")
		if err != nil {
			t.Fatal(err)
		}
		var h struct {
			OK    bool
			Store struct {
				OK   bool
				Code string
			}
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		json.Unmarshal(b, &h)
		last = string(b)
		if resp.StatusCode == 503 && !h.OK && !h.Store.OK && h.Store.Code == "store_unavailable" {
			return
		}
	}
	t.Fatalf("/health never reported the store down: %s", last)
}
