package hsm

import (
	"context"
	"crypto/ecdsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/miekg/pkcs11"

	"github.com/kmsgate/kmsgate/internal/keyutil"
	"github.com/kmsgate/kmsgate/internal/testenv"
)

func openSlot(t *testing.T, cfg Config) *Slot {
	t.Helper()
	s, err := Open(context.Background(), cfg)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() {
		if err := s.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return s
}

func mustUp(t *testing.T, s *Slot) {
	t.Helper()
	if err := s.LastError(); err != nil {
		t.Fatalf("slot not up: %v", err)
	}
}

func digest(s string) []byte { d := sha256.Sum256([]byte(s)); return d[:] }

// opensslVerify checks the signature with the openssl CLI, independently of Go's crypto.
func opensslVerify(t *testing.T, pub *ecdsa.PublicKey, msg, raw []byte) {
	t.Helper()
	dir := t.TempDir()
	spki, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		t.Fatal(err)
	}
	der, err := keyutil.RawToDER(raw)
	if err != nil {
		t.Fatal(err)
	}
	write := func(name string, b []byte) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, b, 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	pubPath := write("pub.pem", pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: spki}))
	sigPath := write("sig.der", der)
	msgPath := write("msg.bin", msg)
	testenv.NeedsBackend(t, "openssl")
	out, err := exec.Command("openssl", "dgst", "-sha256", "-verify", pubPath, "-signature", sigPath, msgPath).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "Verified OK") {
		t.Fatalf("openssl rejects the signature: %v\n%s", err, out)
	}
}

func TestGenerateSignVerifyAndAttributes(t *testing.T) {
	env := testenv.NewSoftHSM(t, 1)
	s := openSlot(t, Config{Library: env.Library, Slot: env.Tokens[0].Label, PIN: env.Tokens[0].PIN, PoolSize: 2})
	mustUp(t, s)
	ctx := context.Background()
	k, pub, err := s.Generate(ctx, "kid-1")
	if err != nil {
		t.Fatal(err)
	}
	if len(k.ID) != 32 || k.Label != "kid-1" {
		t.Fatalf("unexpected key ref %+v", k)
	}
	msg := []byte("hello pkcs11")
	d := sha256.Sum256(msg)
	sig, err := s.Sign(ctx, k, d[:])
	if err != nil {
		t.Fatal(err)
	}
	if len(sig) != 64 || !keyutil.VerifyRawDigest(pub, d[:], sig) {
		t.Fatal("signature does not verify with crypto/ecdsa")
	}
	opensslVerify(t, pub, msg, sig)
	if _, err := s.Sign(ctx, Key{ID: k.ID, Label: "other-kid"}, d[:]); !errors.Is(err, ErrKeyNotFound) {
		t.Fatalf("right CKA_ID with the wrong label signed: %v", err)
	}

	got, err := s.PublicKey(ctx, k)
	if err != nil || !keyutil.SameKey(got, pub) {
		t.Fatalf("PublicKey = %v, %v; want the generated key", got, err)
	}
	priv, err := s.Attributes(ctx, k, pkcs11.CKO_PRIVATE_KEY, pkcs11.CKA_EXTRACTABLE, pkcs11.CKA_SENSITIVE,
		pkcs11.CKA_PRIVATE, pkcs11.CKA_SIGN, pkcs11.CKA_TOKEN)
	if err != nil {
		t.Fatal(err)
	}
	want := map[uint]bool{pkcs11.CKA_EXTRACTABLE: false, pkcs11.CKA_SENSITIVE: true, pkcs11.CKA_PRIVATE: true,
		pkcs11.CKA_SIGN: true, pkcs11.CKA_TOKEN: true}
	for a, v := range want {
		if got, ok := priv[a]; !ok || got != v {
			t.Errorf("private key attribute 0x%x = %v (present %v), want %v", a, got, ok, v)
		}
	}
	pubAttrs, err := s.Attributes(ctx, k, pkcs11.CKO_PUBLIC_KEY, pkcs11.CKA_VERIFY, pkcs11.CKA_TOKEN)
	if err != nil {
		t.Fatal(err)
	}
	if !pubAttrs[pkcs11.CKA_VERIFY] || !pubAttrs[pkcs11.CKA_TOKEN] {
		t.Errorf("public key attributes %v, want CKA_VERIFY and CKA_TOKEN true", pubAttrs)
	}

	// Same label twice: two distinct pairs, each signs with its own key.
	k2, pub2, err := s.Generate(ctx, "kid-1")
	if err != nil {
		t.Fatal(err)
	}
	if k2.ID == k.ID || keyutil.SameKey(pub, pub2) {
		t.Fatal("second key with the same label collided with the first")
	}
	sig2, err := s.Sign(ctx, k2, d[:])
	if err != nil || !keyutil.VerifyRawDigest(pub2, d[:], sig2) || keyutil.VerifyRawDigest(pub, d[:], sig2) {
		t.Fatalf("second key signed wrongly: %v", err)
	}

	if err := s.Delete(ctx, k); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Sign(ctx, k, d[:]); !errors.Is(err, ErrKeyNotFound) {
		t.Fatalf("sign after delete: %v, want ErrKeyNotFound", err)
	}
	if _, err := s.PublicKey(ctx, k); !errors.Is(err, ErrKeyNotFound) {
		t.Fatalf("public key after delete: %v, want ErrKeyNotFound", err)
	}
	if err := s.Delete(ctx, k); err != nil {
		t.Fatalf("second delete must be a no-op: %v", err)
	}
	if _, err := s.Sign(ctx, k2, d[:]); err != nil {
		t.Fatalf("deleting one key broke its namesake: %v", err)
	}
	if _, err := s.Sign(ctx, k2, d[:31]); err == nil {
		t.Fatal("31-byte digest accepted")
	}
}

func TestSlotSelectionAndTwoSlotsOneLibrary(t *testing.T) {
	env := testenv.NewSoftHSM(t, 2)
	byLabel := openSlot(t, Config{Library: env.Library, Slot: "  " + env.Tokens[1].Label + " ", PIN: env.Tokens[1].PIN, PoolSize: 2})
	mustUp(t, byLabel)
	if got := byLabel.Stats().Slot.TokenLabel; got != env.Tokens[1].Label {
		t.Fatalf("label selection resolved token %q", got)
	}
	// Index selection: find which index holds token 0 (SoftHSM orders slots by its own ids).
	var byIndex *Slot
	for i := 0; i < 2; i++ {
		s := openSlot(t, Config{Library: env.Library, Slot: fmt.Sprint(i), PIN: env.Tokens[0].PIN, PoolSize: 2})
		if s.Stats().Slot.TokenLabel == env.Tokens[0].Label {
			byIndex = s
		}
	}
	if byIndex == nil {
		t.Fatal("no index resolved to token 0")
	}
	mustUp(t, byIndex)
	if byIndex.mod != byLabel.mod {
		t.Fatal("two slots of one library did not share one module (one C_Initialize)")
	}
	ctx := context.Background()
	for _, s := range []*Slot{byIndex, byLabel} {
		k, pub, err := s.Generate(ctx, "shared-kid")
		if err != nil {
			t.Fatal(err)
		}
		sig, err := s.Sign(ctx, k, digest("x"))
		if err != nil || !keyutil.VerifyRawDigest(pub, digest("x"), sig) {
			t.Fatalf("slot %s: %v", s.Stats().Slot.TokenLabel, err)
		}
	}

	bad := openSlot(t, Config{Library: env.Library, Slot: "kmsgate-tset-0", PIN: "x"})
	err := bad.LastError()
	if err == nil || !strings.Contains(err.Error(), `no initialised token labelled "kmsgate-tset-0"`) || !strings.Contains(err.Error(), env.Tokens[0].Label) {
		t.Fatalf("label typo error = %v", err)
	}
	if h := bad.Health(ctx); h.OK || !strings.Contains(h.Error, "fix:") {
		t.Fatalf("label typo health = %+v", h)
	}
	oob := openSlot(t, Config{Library: env.Library, Slot: "7", PIN: "x"})
	if err := oob.LastError(); err == nil || !strings.Contains(err.Error(), "out of range") {
		t.Fatalf("index out of range error = %v", err)
	}
	if h := byLabel.Health(ctx); !h.OK {
		t.Fatalf("healthy slot reports %+v next to broken ones", h)
	}
}

func TestWrongPINStopsRetrying(t *testing.T) {
	env := testenv.NewSoftHSM(t, 2)
	good := openSlot(t, Config{Library: env.Library, Slot: env.Tokens[0].Label, PIN: env.Tokens[0].PIN, PoolSize: 2})
	const wrong = "987654-wrong"
	s := openSlot(t, Config{Library: env.Library, Slot: env.Tokens[1].Label, PIN: wrong, PoolSize: 2, MinBackoff: 10 * time.Millisecond})
	err := s.LastError()
	if err == nil || !strings.Contains(err.Error(), "wrong PIN") || !strings.Contains(err.Error(), `"pin"`) {
		t.Fatalf("wrong PIN error = %v", err)
	}
	time.Sleep(200 * time.Millisecond)
	h := s.Health(context.Background())
	if h.OK || strings.Contains(h.Error, wrong) || strings.Contains(err.Error(), wrong) {
		t.Fatalf("wrong PIN health = %+v (must be not ok and never contain the PIN)", h)
	}
	if n := s.Stats().Logins; n != 1 {
		t.Fatalf("%d login attempts with a wrong PIN, want exactly 1 (retrying would lock the token)", n)
	}
	if _, err := s.Sign(context.Background(), Key{ID: "00", Label: "k"}, digest("x")); !errors.Is(err, ErrSlotDown) {
		t.Fatalf("sign on a down slot: %v, want ErrSlotDown", err)
	}
	if h := good.Health(context.Background()); !h.OK {
		t.Fatalf("other slot on the same library is unhealthy: %+v", h)
	}
}

func TestLibraryErrors(t *testing.T) {
	testenv.NeedsBackend(t, "softhsm2")
	dir := t.TempDir()
	cases := map[string]struct {
		path string
		want string
	}{
		"missing": {filepath.Join(dir, "nope.so"), "does not exist"},
		"not elf": {filepath.Join(dir, "text.so"), "not an ELF"},
		"arch":    {filepath.Join(dir, "arm.so"), "wrong architecture"},
	}
	if err := os.WriteFile(cases["not elf"].path, []byte("hello"), 0o600); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(testenv.SoftHSMLibrary)
	if err != nil {
		t.Fatal(err)
	}
	b[18], b[19] = 0xb7, 0x00 // e_machine = EM_AARCH64 (little-endian)
	if err := os.WriteFile(cases["arch"].path, b, 0o600); err != nil {
		t.Fatal(err)
	}
	for name, c := range cases {
		t.Run(name, func(t *testing.T) {
			err := CheckLibrary(c.path)
			var le *LoadError
			if !errors.As(err, &le) || !strings.Contains(err.Error(), c.want) || le.Fix == "" {
				t.Fatalf("CheckLibrary = %v, want a LoadError containing %q with a fix", err, c.want)
			}
			s := openSlot(t, Config{Library: c.path, Slot: "0", PIN: "1234", MaxBackoff: 20 * time.Millisecond})
			if h := s.Health(context.Background()); h.OK || !strings.Contains(h.Error, c.want) {
				t.Fatalf("health = %+v", h)
			}
		})
	}
}

func TestReadOnly(t *testing.T) {
	env := testenv.NewSoftHSM(t, 1)
	rw := openSlot(t, Config{Library: env.Library, Slot: "0", PIN: env.Tokens[0].PIN, PoolSize: 1})
	k, pub, err := rw.Generate(context.Background(), "ro-kid")
	if err != nil {
		t.Fatal(err)
	}
	ro := openSlot(t, Config{Library: env.Library, Slot: "0", PIN: env.Tokens[0].PIN, PoolSize: 2, ReadOnly: true})
	mustUp(t, ro)
	if _, _, err := ro.Generate(context.Background(), "x"); !errors.Is(err, ErrReadOnly) {
		t.Fatalf("read-only generate: %v", err)
	}
	if err := ro.Delete(context.Background(), k); !errors.Is(err, ErrReadOnly) {
		t.Fatalf("read-only delete: %v", err)
	}
	sig, err := ro.Sign(context.Background(), k, digest("ro"))
	if err != nil || !keyutil.VerifyRawDigest(pub, digest("ro"), sig) {
		t.Fatalf("read-only sign: %v", err)
	}
}

// TestConcurrencyAndHotPath runs 4× the pool size in goroutines, verifies every signature, and
// checks via the counters that steady-state signing opens no session, logs in never and
// searches no object.
func TestConcurrencyAndHotPath(t *testing.T) {
	env := testenv.NewSoftHSM(t, 1)
	const pool = 3
	s := openSlot(t, Config{Library: env.Library, Slot: "0", PIN: env.Tokens[0].PIN, PoolSize: pool, AcquireTimeout: 10 * time.Second})
	ctx := context.Background()
	keys := make([]Key, 3)
	pubs := make([]*ecdsa.PublicKey, 3)
	for i := range keys {
		var err error
		if keys[i], pubs[i], err = s.Generate(ctx, fmt.Sprintf("c-%d", i)); err != nil {
			t.Fatal(err)
		}
	}
	// Warm each key's handle once (Generate already cached them), then measure.
	before := s.Stats()
	const workers, per = 4 * pool, 42 // 504 signatures
	var wg sync.WaitGroup
	var bad atomic.Int64
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < per; i++ {
				j := (w + i) % len(keys)
				d := digest(fmt.Sprintf("%d/%d", w, i))
				sig, err := s.Sign(ctx, keys[j], d)
				if err != nil || !keyutil.VerifyRawDigest(pubs[j], d, sig) {
					bad.Add(1)
					t.Errorf("worker %d sign %d: err=%v", w, i, err)
					return
				}
			}
		}()
	}
	wg.Wait()
	after := s.Stats()
	if bad.Load() != 0 {
		t.Fatalf("%d bad signatures", bad.Load())
	}
	if d := after.SessionsOpened - before.SessionsOpened; d != 0 {
		t.Errorf("%d sessions opened during %d signs", d, workers*per)
	}
	if d := after.Logins - before.Logins; d != 0 {
		t.Errorf("%d logins during %d signs", d, workers*per)
	}
	if d := after.ObjectSearches - before.ObjectSearches; d != 0 {
		t.Errorf("%d object searches during %d signs", d, workers*per)
	}
	if after.Capacity != pool || after.InUse != 0 || after.Idle != pool {
		t.Errorf("pool stats after load: %+v", after)
	}
	if after.Waits == 0 {
		t.Errorf("12 goroutines on 3 sessions never waited: the wait counter is not counting")
	}
	t.Logf("%d signatures, %d waits (%.3fs)", workers*per, after.Waits, after.WaitSeconds)
}

func TestPoolExhaustedAndContext(t *testing.T) {
	env := testenv.NewSoftHSM(t, 1)
	s := openSlot(t, Config{Library: env.Library, Slot: "0", PIN: env.Tokens[0].PIN, PoolSize: 1, AcquireTimeout: 50 * time.Millisecond})
	k, _, err := s.Generate(context.Background(), "ex")
	if err != nil {
		t.Fatal(err)
	}
	held, err := s.acquire(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if _, err := s.Sign(context.Background(), k, digest("x")); !errors.Is(err, ErrPoolExhausted) {
		t.Fatalf("sign with the only session held: %v", err)
	}
	if el := time.Since(start); el > time.Second {
		t.Fatalf("exhausted pool answered after %v", el)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Millisecond)
	defer cancel()
	if _, err := s.Sign(ctx, k, digest("x")); !errors.Is(err, ErrPoolExhausted) || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("sign under a short deadline: %v", err)
	}
	if h := s.Health(context.Background()); !h.OK {
		t.Fatalf("a busy pool is healthy, got %+v", h)
	}
	s.release(held, nil)
	if st := s.Stats(); st.Exhausted < 2 {
		t.Fatalf("exhausted counter = %d", st.Exhausted)
	}
	if _, err := s.Sign(context.Background(), k, digest("x")); err != nil {
		t.Fatal(err)
	}
}

// TestStaleHandleRefind deletes a key behind the slot's back: the cached handle goes stale, the
// slot re-finds once and reports the key as missing instead of failing the slot.
func TestStaleHandleRefind(t *testing.T) {
	env := testenv.NewSoftHSM(t, 1)
	a := openSlot(t, Config{Library: env.Library, Slot: "0", PIN: env.Tokens[0].PIN, PoolSize: 1})
	b := openSlot(t, Config{Library: env.Library, Slot: "0", PIN: env.Tokens[0].PIN, PoolSize: 1})
	ctx := context.Background()
	k, _, err := a.Generate(ctx, "stale")
	if err != nil {
		t.Fatal(err)
	}
	if err := b.Delete(ctx, k); err != nil {
		t.Fatal(err)
	}
	before := a.Stats().ObjectSearches
	if _, err := a.Sign(ctx, k, digest("x")); !errors.Is(err, ErrKeyNotFound) {
		t.Fatalf("sign with a deleted key: %v", err)
	}
	if d := a.Stats().ObjectSearches - before; d != 1 {
		t.Fatalf("%d searches after a stale handle, want exactly one re-find", d)
	}
	if !a.Up() {
		t.Fatal("a stale handle took the slot down")
	}
}

type tWriter struct{ t *testing.T }

func (w tWriter) Write(b []byte) (int, error) {
	w.t.Log(strings.TrimSpace(string(b)))
	return len(b), nil
}

// testLogger shows the slot's log in the test output (only with -v or on failure).
func testLogger(t *testing.T) *slog.Logger { return slog.New(slog.NewTextHandler(tWriter{t}, nil)) }

// TestStatsMakeNoPKCS11Call holds the library's write lock — as a stuck re-initialisation
// would — and checks that Stats still answers: it takes no path into the library.
func TestStatsMakeNoPKCS11Call(t *testing.T) {
	env := testenv.NewSoftHSM(t, 1)
	s := openSlot(t, Config{Library: env.Library, Slot: "0", PIN: env.Tokens[0].PIN, PoolSize: 2})
	mustUp(t, s)
	s.mod.life.Lock()
	done := make(chan Stats, 1)
	go func() { done <- s.Stats() }()
	select {
	case st := <-done:
		s.mod.life.Unlock()
		if !st.Up || st.Capacity != 2 {
			t.Fatalf("stats %+v", st)
		}
	case <-time.After(2 * time.Second):
		s.mod.life.Unlock()
		t.Fatal("Stats blocked on the library")
	}
	// Health must not wait behind a re-initialisation either.
	s.mod.life.Lock()
	hc := make(chan Health, 1)
	go func() { hc <- s.Health(context.Background()) }()
	select {
	case h := <-hc:
		s.mod.life.Unlock()
		if h.OK {
			t.Fatal("health ok while the library is locked for re-initialisation")
		}
	case <-time.After(2 * time.Second):
		s.mod.life.Unlock()
		t.Fatal("Health blocked on the library")
	}
	if h := s.Health(context.Background()); !h.OK {
		t.Fatalf("health after the lock: %+v", h)
	}
}

// TestOtherCurveRefused: a P-384 key on the token (made behind kmsgate's back) must fail with a
// clear error, never yield a signature the caller would take for ES256.
func TestOtherCurveRefused(t *testing.T) {
	env := testenv.NewSoftHSM(t, 1)
	s := openSlot(t, Config{Library: env.Library, Slot: "0", PIN: env.Tokens[0].PIN, PoolSize: 1})
	id := []byte{1, 2, 3, 4}
	k := Key{ID: "01020304", Label: "p384"}
	p384 := []byte{0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22}
	err := s.with(context.Background(), func(se *session) error {
		_, _, err := se.p.mod.ctx.GenerateKeyPair(se.h, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_EC_KEY_PAIR_GEN, nil)},
			[]*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true), pkcs11.NewAttribute(pkcs11.CKA_VERIFY, true),
				pkcs11.NewAttribute(pkcs11.CKA_EC_PARAMS, p384), pkcs11.NewAttribute(pkcs11.CKA_LABEL, k.Label), pkcs11.NewAttribute(pkcs11.CKA_ID, id)},
			[]*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true), pkcs11.NewAttribute(pkcs11.CKA_SIGN, true),
				pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true), pkcs11.NewAttribute(pkcs11.CKA_LABEL, k.Label), pkcs11.NewAttribute(pkcs11.CKA_ID, id)})
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Sign(context.Background(), k, digest("x")); !errors.Is(err, ErrNotP256) {
		t.Fatalf("sign with a P-384 key: %v, want ErrNotP256", err)
	}
	if _, err := s.PublicKey(context.Background(), k); !errors.Is(err, ErrBadKey) {
		t.Fatalf("public key of a P-384 key: %v, want ErrBadKey", err)
	}
	if !s.Up() {
		t.Fatal("a wrong-curve key took the slot down")
	}
}
