// Package testenv starts the real backends (Vault, local-kms, SoftHSM2) that provider tests run
// against. Helpers fail the test with a fix hint when a tool is missing; they skip only under
// `go test -short` (see NeedsBackend), because otherwise a skipped backend test is a silently
// untested provider.
package testenv

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Vault is a running `vault server -dev` on loopback.
type Vault struct {
	Addr  string // http://127.0.0.1:<port>
	Token string // root token of the dev server

	bin, listen, dir string
	mu               sync.Mutex
	cmd              *exec.Cmd
	done             chan struct{}
	log              *procLog
}

// VaultBinary returns the vault binary path: $KMSGATE_VAULT_BIN, else
// $HOME/.cache/kmsgate-tools/vault (built by tools/vault/build.sh).
func VaultBinary(t testing.TB) string {
	t.Helper()
	bin := os.Getenv("KMSGATE_VAULT_BIN")
	if bin == "" {
		home, err := os.UserHomeDir()
		if err != nil {
			t.Fatalf("testenv: cannot locate the vault binary: %v (set KMSGATE_VAULT_BIN)", err)
		}
		bin = filepath.Join(home, ".cache", "kmsgate-tools", "vault")
	}
	if st, err := os.Stat(bin); err != nil || st.IsDir() || st.Mode()&0o111 == 0 {
		t.Fatalf("testenv: vault binary not found at %s: build it with `tools/vault/build.sh` "+
			"(or `make test`, or tools/install-test-deps.sh), or point KMSGATE_VAULT_BIN at one", bin)
	}
	return bin
}

// StartVault starts a Vault dev server on a free loopback port with a random root token and stops
// it when the test ends.
func StartVault(t testing.TB) *Vault {
	t.Helper()
	NeedsBackend(t, "vault")
	var tok [16]byte
	_, _ = rand.Read(tok[:])
	v := &Vault{bin: VaultBinary(t), Token: "root-" + hex.EncodeToString(tok[:]), listen: loopbackAddr(t),
		dir: t.TempDir()}
	v.Addr = "http://" + v.listen
	t.Cleanup(v.Stop)
	v.Start(t)
	return v
}

// Start (re)starts the server on the same address and token. A dev server keeps everything in
// memory, so a restarted server is empty.
func (v *Vault) Start(t testing.TB) {
	t.Helper()
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.cmd != nil {
		t.Fatal("testenv: vault already running")
	}
	v.log = &procLog{}
	cmd := exec.Command(v.bin, "server", "-dev", "-dev-root-token-id="+v.Token,
		"-dev-listen-address="+v.listen, "-dev-no-store-token")
	// HOME points at a temp dir so nothing (token helper, plugin cache) touches the real one.
	cmd.Env = append(os.Environ(), "HOME="+v.dir, "VAULT_ADDR=", "VAULT_TOKEN=", "SKIP_SETCAP=1")
	cmd.Stdout, cmd.Stderr = v.log, v.log
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatalf("testenv: start vault: %v", err)
	}
	v.cmd, v.done = cmd, make(chan struct{})
	done := v.done
	go func() { _ = cmd.Wait(); close(done) }()
	if err := waitHealthy(v.Addr+"/v1/sys/health", done, 60*time.Second); err != nil {
		v.stopLocked()
		t.Fatalf("testenv: vault dev server did not become healthy: %v\n--- vault log ---\n%s", err, v.log.Tail())
	}
}

// Stop kills the server (idempotent); tests use it to take the backend down mid-test.
func (v *Vault) Stop() {
	v.mu.Lock()
	defer v.mu.Unlock()
	v.stopLocked()
}

func (v *Vault) stopLocked() {
	if v.cmd == nil {
		return
	}
	_ = syscall.Kill(-v.cmd.Process.Pid, syscall.SIGTERM)
	select {
	case <-v.done:
	case <-time.After(5 * time.Second):
		_ = syscall.Kill(-v.cmd.Process.Pid, syscall.SIGKILL)
		<-v.done
	}
	v.cmd = nil
	// Wait until the port is free again so a restart can bind it.
	for i := 0; i < 50; i++ {
		c, err := net.DialTimeout("tcp", v.listen, 100*time.Millisecond)
		if err != nil {
			return
		}
		c.Close()
		time.Sleep(100 * time.Millisecond)
	}
}

// Log returns the server's output so far (for failure messages).
func (v *Vault) Log() string {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.log.Tail()
}

// loopbackAddr picks a free port on 127.0.0.1. The tiny window between closing the probe
// listener and the server binding is acceptable for tests.
func loopbackAddr(t testing.TB) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("testenv: no free loopback port: %v", err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// waitHealthy polls url until it answers 200, the process exits, or timeout passes.
func waitHealthy(url string, exited <-chan struct{}, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	var last error
	for {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		resp, err := http.DefaultClient.Do(req)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
			last = fmt.Errorf("%s answered %d", url, resp.StatusCode)
		} else {
			last = err
		}
		select {
		case <-exited:
			return fmt.Errorf("process exited (last probe: %v)", last)
		case <-ctx.Done():
			return fmt.Errorf("timed out after %v (last probe: %v)", timeout, last)
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// procLog collects a server's stdout and stderr for failure messages.
type procLog struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *procLog) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

// Tail returns the last few KB of output.
func (l *procLog) Tail() string {
	if l == nil {
		return ""
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	s := l.b.String()
	if len(s) > 4000 {
		s = "…" + s[len(s)-4000:]
	}
	return s
}
