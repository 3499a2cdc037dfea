package testenv

import (
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// LocalKMS is a running nsmithuk/local-kms, the AWS KMS API server the aws-kms tests use.
type LocalKMS struct {
	Endpoint  string // http://127.0.0.1:<port>
	Region    string
	AccountID string

	bin, port, dir string
	mu             sync.Mutex
	cmd            *exec.Cmd
	done           chan struct{}
	log            *procLog
}

// LocalKMSBinary returns $KMSGATE_LOCAL_KMS_BIN, else $(go env GOPATH)/bin/local-kms.
func LocalKMSBinary(t testing.TB) string {
	t.Helper()
	const hint = "install it with `go install github.com/nsmithuk/local-kms@v0.0.0-20260228092603-2a5e92d09ab6` " +
		"(or tools/install-test-deps.sh), or point KMSGATE_LOCAL_KMS_BIN at one"
	bin := os.Getenv("KMSGATE_LOCAL_KMS_BIN")
	if bin == "" {
		gopath := os.Getenv("GOPATH")
		if gopath == "" {
			if out, err := exec.Command("go", "env", "GOPATH").Output(); err == nil {
				gopath = strings.TrimSpace(string(out))
			}
		}
		if gopath == "" {
			home, _ := os.UserHomeDir()
			gopath = filepath.Join(home, "go")
		}
		// GOPATH may be a list; go install writes to the first entry.
		bin = filepath.Join(filepath.SplitList(gopath)[0], "bin", "local-kms")
	}
	if st, err := os.Stat(bin); err != nil || st.IsDir() || st.Mode()&0o111 == 0 {
		t.Fatalf("testenv: local-kms binary not found at %s: %s", bin, hint)
	}
	return bin
}

// RequirePrivateNetNS fails the test unless the process runs in a network namespace whose only
// interface is loopback. local-kms binds every interface and has no option to bind only one, so
// outside such a namespace it would expose an unauthenticated KMS to the network.
func RequirePrivateNetNS(t testing.TB) {
	t.Helper()
	ifs, err := net.Interfaces()
	if err != nil {
		t.Fatalf("testenv: list network interfaces: %v", err)
	}
	var others []string
	for _, i := range ifs {
		if i.Flags&net.FlagLoopback == 0 {
			others = append(others, i.Name)
		}
	}
	if len(others) > 0 {
		t.Fatalf("local-kms listens on all interfaces: run these tests through `make test`, which runs them in a "+
			"private network namespace (unshare --net) (this namespace also has %s); by hand: "+
			"unshare --net sh -c 'ip link set lo up && GOPROXY=off go test -race ./providers/awskms/...'",
			strings.Join(others, ", "))
	}
}

// StartLocalKMS starts local-kms on a free port, with its data in a temp dir, and stops it when the
// test ends. It refuses to run outside a private loopback-only network namespace.
func StartLocalKMS(t testing.TB) *LocalKMS {
	t.Helper()
	NeedsBackend(t, "local-kms")
	RequirePrivateNetNS(t)
	addr := loopbackAddr(t)
	_, port, _ := net.SplitHostPort(addr)
	k := &LocalKMS{bin: LocalKMSBinary(t), port: port, dir: t.TempDir(), Region: "eu-central-1",
		AccountID: "111122223333", Endpoint: "http://" + addr}
	t.Cleanup(k.Stop)
	k.Start(t)
	return k
}

// Start (re)starts the server on the same port and data directory (keys survive a restart).
func (k *LocalKMS) Start(t testing.TB) {
	t.Helper()
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.cmd != nil {
		t.Fatal("testenv: local-kms already running")
	}
	k.log = &procLog{}
	cmd := exec.Command(k.bin)
	cmd.Env = append(os.Environ(), "PORT="+k.port, "KMS_REGION="+k.Region, "KMS_ACCOUNT_ID="+k.AccountID,
		"KMS_DATA_PATH="+filepath.Join(k.dir, "data"))
	cmd.Stdout, cmd.Stderr = k.log, k.log
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatalf("testenv: start local-kms: %v", err)
	}
	k.cmd, k.done = cmd, make(chan struct{})
	done := k.done
	go func() { _ = cmd.Wait(); close(done) }()
	deadline := time.Now().Add(30 * time.Second)
	for {
		c, err := net.DialTimeout("tcp", "127.0.0.1:"+k.port, 200*time.Millisecond)
		if err == nil {
			c.Close()
			return
		}
		select {
		case <-done:
			k.cmd = nil
			t.Fatalf("testenv: local-kms exited at start-up\n--- local-kms log ---\n%s", k.log.Tail())
		default:
		}
		if time.Now().After(deadline) {
			k.stopLocked()
			t.Fatalf("testenv: local-kms did not listen on port %s: %v\n--- log ---\n%s", k.port, err, k.log.Tail())
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// Stop kills the server (idempotent).
func (k *LocalKMS) Stop() {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.stopLocked()
}

func (k *LocalKMS) stopLocked() {
	if k.cmd == nil {
		return
	}
	_ = syscall.Kill(-k.cmd.Process.Pid, syscall.SIGTERM)
	select {
	case <-k.done:
	case <-time.After(5 * time.Second):
		_ = syscall.Kill(-k.cmd.Process.Pid, syscall.SIGKILL)
		<-k.done
	}
	k.cmd = nil
}

// Log returns the server's output so far.
func (k *LocalKMS) Log() string {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.log.Tail()
}
