package cli_test

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kmsgate/kmsgate/appliance/cli"
	"github.com/kmsgate/kmsgate/internal/apptest"
	"github.com/kmsgate/kmsgate/internal/keyutil"
)

// TestHelperServe is not a test: it is the server process TestCrashKeepsAcknowledgedWrites starts
// (and kills) by re-running this test binary. It does nothing in a normal run.
func TestHelperServe(t *testing.T) {
	dir, addr := os.Getenv("KMSGATE_HELPER_DATA"), os.Getenv("KMSGATE_HELPER_LISTEN")
	if dir == "" {
		return
	}
	cmd := cli.NewRootCmd(cli.BuildInfo{Version: "crash-test"})
	cmd.SetArgs([]string{"serve", "--data-dir", dir, "--config-dir", filepath.Join(dir, "cfg"), "--listen", addr,
		"--log-level", "error"})
	if err := cmd.Execute(); err != nil {
		t.Fatal(err)
	}
}

func startHelper(t *testing.T, dir, addr string, env ...string) *exec.Cmd {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^TestHelperServe$")
	cmd.Env = append(os.Environ(), "KMSGATE_HELPER_DATA="+dir, "KMSGATE_HELPER_LISTEN="+addr,
		"KMSGATE_MASTER_KEY="+apptest.MasterKey)
	cmd.Env = append(cmd.Env, env...)
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 200; i++ {
		if resp, err := http.Get("http://" + addr + "/healthz"); err == nil {
			resp.Body.Close()
			return cmd
		}
		time.Sleep(50 * time.Millisecond)
	}
	cmd.Process.Kill()
	t.Fatal("helper server did not start")
	return nil
}

func post(t *testing.T, url, key string, body any) (int, []byte) {
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
	return resp.StatusCode, out
}

// TestCrashKeepsAcknowledgedWrites kills the server with SIGKILL right after it acknowledged a
// generate and an import: after a restart both keys must sign (Badger writes are synced before
// the API answers).
func TestCrashKeepsAcknowledgedWrites(t *testing.T) {
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

	srv := startHelper(t, dir, addr)
	st, body := post(t, base+"/keys", ten.APIKey, map[string]string{"kid": "generated"})
	if st != 200 {
		t.Fatalf("generate: %d %s", st, body)
	}
	var g struct{ PublicJWK keyutil.JWK }
	json.Unmarshal(body, &g)
	genPub, err := keyutil.ParsePublicJWK(g.PublicJWK)
	if err != nil {
		t.Fatal(err)
	}
	priv, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	jwk, _ := keyutil.PrivateJWK(priv, "", "ES256")
	if st, body := post(t, base+"/keys/imported/import", ten.APIKey, map[string]any{"privateJwk": jwk}); st != 200 {
		t.Fatalf("import: %d %s", st, body)
	}
	// No graceful shutdown: the process dies the instant after its last acknowledgement.
	if err := srv.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	srv.Wait()
	// A crash leaves the admin socket behind; the restart must cope with that too.
	srv = startHelper(t, dir, addr)
	defer func() { srv.Process.Signal(syscall.SIGTERM); srv.Wait() }()
	for kid, pub := range map[string]*ecdsa.PublicKey{"generated": genPub, "imported": &priv.PublicKey} {
		msg := []byte(fmt.Sprintf("after the crash: %s", kid))
		st, body := post(t, base+"/keys/"+kid+"/sign", ten.APIKey, map[string]string{"data": base64.StdEncoding.EncodeToString(msg)})
		var r struct{ Signature string }
		json.Unmarshal(body, &r)
		raw, _ := base64.RawURLEncoding.DecodeString(r.Signature)
		if st != 200 || !keyutil.VerifyRaw(pub, msg, raw) {
			t.Fatalf("key %s lost or wrong after SIGKILL: %d %s", kid, st, strings.TrimSpace(string(body)))
		}
	}
}
