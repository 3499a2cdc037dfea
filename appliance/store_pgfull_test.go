package appliance_test

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kmsgate/kmsgate/appliance"
	"github.com/kmsgate/kmsgate/internal/apptest"
	"github.com/kmsgate/kmsgate/internal/testenv"
)

// TestSigningSurvivesPostgresDiskFull runs PostgreSQL with its data directory on a small tmpfs and
// fills that file system under a sign loop on the contract face and the key-chain face (sign and
// JWS): PostgreSQL stays up and refuses what needs a new page (53100), writes answer 503
// store_unavailable without PostgreSQL's text, /health reports the store down (a ping alone
// still succeeds: the probe writes a small temporary file), signing with known keys never fails,
// and once the disk has room again writes succeed without restarting kmsgate and every
// acknowledged write is in the database.
func TestSigningSurvivesPostgresDiskFull(t *testing.T) {
	testenv.NeedsBackend(t, "postgres")
	// Not t.TempDir: its parents are private to root, and PostgreSQL runs as another user. The
	// mount is world-writable with the sticky bit (like /tmp), so initdb creates its data
	// directory there as that user.
	mnt, err := os.MkdirTemp("", "kmsgate-pgfull-")
	if err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=128m,mode=1777", "tmpfs", mnt).CombinedOutput(); err != nil {
		os.Remove(mnt)
		t.Fatalf("cannot mount a tmpfs here (the tests run as root in tools/netns-run.sh): %v %s", err, out)
	}
	t.Cleanup(func() {
		_ = exec.Command("umount", "-l", mnt).Run()
		_ = os.Remove(mnt)
	})
	pg := testenv.StartPostgres(t, testenv.WithDataDir(filepath.Join(mnt, "data")))
	dsn := pg.NewDatabase(t)
	srv := serveOnStore(t, dsn)
	base, key, msg := srv.base, srv.key, srv.msg
	load := srv.startSignLoad(t)

	// Fill the file system, then write until PostgreSQL refuses: a write whose rows fit in pages
	// and a WAL segment it already has still succeeds on a full disk.
	acked := []string{"known"}
	filler := filepath.Join(mnt, "filler")
	fill(t, filler)
	filled := time.Now()
	var refusal []byte
	for i := 0; refusal == nil; i++ {
		if i == 2000 {
			t.Fatalf("%d writes succeeded on a full disk", i)
		}
		kid := fmt.Sprintf("k%d", i)
		st, b, hdr := call(t, "POST", base+"/keys", key, map[string]string{"kid": kid})
		switch {
		case st == 200:
			acked = append(acked, kid)
		case st == 503 && strings.Contains(string(b), `"code":"store_unavailable"`) && hdr.Get("Retry-After") != "":
			refusal = b
		default:
			t.Fatalf("write on a full disk: %d %s, want 200 or 503 store_unavailable with Retry-After", st, b)
		}
	}
	for _, leak := range []string{"space", "extend", "device", "base/", "53100", "disk"} {
		if strings.Contains(string(refusal), leak) {
			t.Fatalf("backend text reached the caller: %s", refusal)
		}
	}
	var health string
	down := false
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline) && !down; time.Sleep(100 * time.Millisecond) {
		st, hb, _ := call(t, "GET", base+"/health", key, nil)
		health = string(hb)
		down = st == 503 && strings.Contains(health, `"store":{"backend":"postgres","ok":false`) &&
			strings.Contains(health, `"code":"store_unavailable"`)
	}
	if !down {
		t.Fatalf("/health with PostgreSQL's disk full: %s, want the store down", health)
	}
	detected := time.Since(filled)
	if st, b, _ := call(t, "POST", base+"/key-chain", key, map[string]any{"usageType": "attestation", "type": "standalone"}); st != 503 ||
		!strings.Contains(string(b), `"code":"store_unavailable"`) {
		t.Fatalf("key-chain create on a full disk: %d %s, want 503 store_unavailable", st, b)
	}
	time.Sleep(time.Second) // keep signing on the full disk a little longer
	duringFault := load.signs.Load()

	// What PostgreSQL itself did: it refuses the statement that needs a new page (53100, an
	// ERROR) and stays up; a PANIC (a WAL write failing) would restart it, which the recovery
	// below would also have to survive.
	srvlog, _ := os.ReadFile(filepath.Join(pg.Dir, "server.log"))
	panicked := strings.Contains(string(srvlog), "PANIC")
	if !strings.Contains(string(srvlog), "No space left on device") {
		t.Fatalf("PostgreSQL never reported the full disk; server log:\n%s", srvlog)
	}

	if err := os.Remove(filler); err != nil {
		t.Fatal(err)
	}
	freed := time.Now()
	var recovered time.Duration
	for {
		st, b, _ := call(t, "POST", base+"/keys", key, map[string]string{"kid": "after"})
		if st == 200 {
			recovered = time.Since(freed)
			break
		}
		if st != 503 || time.Since(freed) > 30*time.Second {
			t.Fatalf("write after the disk was freed: %d %s", st, b)
		}
		time.Sleep(50 * time.Millisecond)
	}
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		st, hb, _ := call(t, "GET", base+"/health", key, nil)
		if st == 200 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("/health after the disk was freed: %d %s", st, hb)
		}
	}
	healthy := time.Since(freed)
	load.stop()
	if n := load.errs.Load(); n != 0 || duringFault == 0 {
		t.Fatalf("signing across the full disk: %d errors in %d signatures (first: %v)", n, load.signs.Load(), load.firstErr.Load())
	}
	if st, b, _ := call(t, "POST", base+"/keys/after/sign", key, msg); st != 200 {
		t.Fatalf("sign with the key written after recovery: %d %s", st, b)
	}

	// Every write acknowledged before and during the fault is in PostgreSQL: a fresh replica,
	// which has cached nothing, reads each key and the chain, and signs with them.
	fresh := apptest.Start(t, apptest.Options{Tweak: func(o *appliance.Options) { o.Store = dsn }})
	for _, kid := range append(acked, "after") {
		if st, b := fresh.Do("GET", "/keys/"+kid, key, nil); st != 200 {
			t.Fatalf("acknowledged key %s on a fresh replica: %d %s", kid, st, b)
		}
	}
	if st, b := fresh.Do("POST", "/keys/"+acked[len(acked)-1]+"/sign", key, msg); st != 200 {
		t.Fatalf("sign on a fresh replica with the last key acknowledged on the full disk: %d %s", st, b)
	}
	if st, b := fresh.Do("POST", "/key-chain/"+srv.chainID+"/sign", key, msg); st != 200 {
		t.Fatalf("key-chain sign on a fresh replica: %d %s", st, b)
	}
	t.Logf("FIGURE postgres disk full (128 MiB tmpfs): %d writes still acknowledged on the full disk before the first 503 store_unavailable; /health reported the store down %s after the disk filled; PostgreSQL panicked: %v; %d signatures (contract sign, key-chain sign and JWS), 0 errors; first successful write %s and /health healthy %s after the filler was removed (without restarting kmsgate); all %d acknowledged keys read back on a fresh replica",
		len(acked)-1, detected.Round(time.Millisecond), panicked, load.signs.Load(), recovered.Round(time.Millisecond),
		healthy.Round(time.Millisecond), len(acked)+1)
}

// fill writes path until the file system is full.
func fill(t *testing.T, path string) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, 1<<20)
	for {
		if _, err := f.Write(buf); err != nil {
			if !errors.Is(err, syscall.ENOSPC) {
				t.Fatalf("fill: %v", err)
			}
			return
		}
	}
}
