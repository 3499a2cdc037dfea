package cli_test

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/kmsgate/kmsgate/internal/keyutil"
	"github.com/kmsgate/kmsgate/internal/testenv"
)

// TestPKCS11AcrossReplicas runs two kmsgate processes on one PostgreSQL store and one SoftHSM2
// token directory (two processes on one token store, as two replicas on one network HSM): a key
// generated through replica A signs through replica B. B finds the token object once by its
// CKA_ID (one C_FindObjectsInit) and then signs from its handle cache without searching.
func TestPKCS11AcrossReplicas(t *testing.T) {
	testenv.NeedsBackend(t, "postgres")
	testenv.NeedsBackend(t, "softhsm2")
	hsm := testenv.NewSoftHSM(t, 1) // sets SOFTHSM2_CONF, which the server processes inherit
	pg := testenv.StartPostgres(t)
	dsn := pg.NewDatabase(t)
	out, err := run(t, "tenant", "create", "acme", "--store", dsn, "--data-dir", t.TempDir())
	if err != nil {
		t.Fatalf("%v %s", err, out)
	}
	var ten struct{ APIKey string }
	if err := json.Unmarshal([]byte(out), &ten); err != nil {
		t.Fatal(err)
	}
	kms := fmt.Sprintf(`{"defaultProvider":"hsm","providers":[{"id":"hsm","type":"pkcs11","library":%q,"slot":%q,"pin":"${HSM_PIN}"}]}`,
		hsm.Library, hsm.Tokens[0].Label)
	replica := func() (base string, stop func()) {
		dir := t.TempDir()
		if err := os.MkdirAll(filepath.Join(dir, "cfg"), 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, "cfg", "kms.json"), []byte(kms), 0o600); err != nil {
			t.Fatal(err)
		}
		ln, _ := net.Listen("tcp", "127.0.0.1:0")
		addr := ln.Addr().String()
		ln.Close()
		srv := startHelper(t, dir, addr, "KMSGATE_STORE="+dsn, "HSM_PIN="+hsm.Tokens[0].PIN)
		return "http://" + addr, func() { srv.Process.Signal(syscall.SIGTERM); srv.Wait() }
	}
	a, stopA := replica()
	defer stopA()
	b, stopB := replica()
	defer stopB()

	st, body := post(t, a+"/keys", ten.APIKey, map[string]string{"kid": "shared"})
	if st != 200 {
		t.Fatalf("generate on A: %d %s", st, body)
	}
	var g struct{ PublicJWK keyutil.JWK }
	if err := json.Unmarshal(body, &g); err != nil {
		t.Fatal(err)
	}
	pub, err := keyutil.ParsePublicJWK(g.PublicJWK)
	if err != nil {
		t.Fatal(err)
	}
	sign := func(i int) {
		t.Helper()
		msg := []byte("signed through replica B #" + strconv.Itoa(i))
		d := sha256.Sum256(msg)
		st, body := post(t, b+"/keys/shared/sign", ten.APIKey, map[string]string{"digest": base64.StdEncoding.EncodeToString(d[:])})
		var r struct{ Signature string }
		json.Unmarshal(body, &r)
		raw, _ := base64.RawURLEncoding.DecodeString(r.Signature)
		if st != 200 || !keyutil.VerifyRaw(pub, msg, raw) {
			t.Fatalf("sign %d on B with A's key: %d %s", i, st, strings.TrimSpace(string(body)))
		}
	}
	before := searches(t, b)
	sign(0)
	first := searches(t, b)
	for i := 1; i <= 100; i++ {
		sign(i)
	}
	after := searches(t, b)
	t.Logf("object searches on B: %v for the first signature with A's key, %v for the next 100", first-before, after-first)
	if first-before != 1 {
		t.Errorf("first signature on B made %v object searches, want exactly 1 (find by CKA_ID, then cache)", first-before)
	}
	if after != first {
		t.Errorf("100 further signatures on B made %v object searches, want 0", after-first)
	}
}

// searches reads kmsgate_pkcs11_object_searches_total of the hsm provider from /metrics.
func searches(t *testing.T, base string) float64 {
	t.Helper()
	req, _ := http.NewRequestWithContext(context.Background(), "GET", base+"/metrics", nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(line, `kmsgate_pkcs11_object_searches_total{provider="hsm"}`) {
			v, err := strconv.ParseFloat(strings.TrimSpace(line[strings.LastIndexByte(line, ' '):]), 64)
			if err != nil {
				t.Fatal(err)
			}
			return v
		}
	}
	t.Fatalf("kmsgate_pkcs11_object_searches_total{provider=\"hsm\"} not on %s/metrics", base)
	return 0
}
