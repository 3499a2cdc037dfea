// Package apptest starts a real kmsgate appliance in-process on a loopback port for end-to-end
// tests: real Badger store, real providers, real HTTP.
package apptest

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/kmsgate/kmsgate/appliance"
	"github.com/kmsgate/kmsgate/appliance/tenants"
	"github.com/kmsgate/kmsgate/internal/testenv"
)

// MasterKey is the fixed test master key (base64 of 32 bytes).
var MasterKey = base64.StdEncoding.EncodeToString(bytes.Repeat([]byte{7}, 32))

// Options for Start. Zero values give a fresh temp data dir and no kms.json.
type Options struct {
	DataDir   string
	ConfigDir string
	KMSJSON   string            // written to <config-dir>/kms.json when set
	Env       map[string]string // placeholder lookups (falls back to the process env)
	Tweak     func(*appliance.Options)
}

// Instance is a running appliance.
type Instance struct {
	URL       string
	DataDir   string
	ConfigDir string
	App       *appliance.Appliance
	Client    *http.Client
	t         testing.TB
	cancel    context.CancelFunc
	done      chan error
}

// StoreEnv names the variable that moves every appliance Start makes onto PostgreSQL
// (KMSGATE_TEST_STORE=postgres): `make test` runs the HTTP contract suite once more that way.
const StoreEnv = "KMSGATE_TEST_STORE"

// postgresFor returns the database of the appliance whose data dir is dataDir: a fresh one on a
// PostgreSQL server started for this test, remembered in the data dir so that a restart on the
// same data dir finds its records again.
func postgresFor(t testing.TB, dataDir string) string {
	t.Helper()
	f := filepath.Join(dataDir, "test-store-dsn")
	if b, err := os.ReadFile(f); err == nil {
		return string(b)
	}
	dsn := testenv.PostgresDSN(t)
	if err := os.WriteFile(f, []byte(dsn), 0o600); err != nil {
		t.Fatal(err)
	}
	return dsn
}

// Start opens and serves an appliance; it is stopped at test cleanup.
func Start(t testing.TB, o Options) *Instance {
	t.Helper()
	if o.DataDir == "" {
		o.DataDir = t.TempDir()
	}
	if o.ConfigDir == "" {
		o.ConfigDir = t.TempDir()
	}
	if o.KMSJSON != "" {
		if err := os.WriteFile(filepath.Join(o.ConfigDir, "kms.json"), []byte(o.KMSJSON), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	lookup := func(k string) (string, bool) {
		if v, ok := o.Env[k]; ok {
			return v, true
		}
		return os.LookupEnv(k)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	opts := appliance.Options{Listen: ln.Addr().String(), ConfigDir: o.ConfigDir, DataDir: o.DataDir,
		MasterKeyEnv: MasterKey, AdminSocket: filepath.Join(o.DataDir, "admin.sock"), Version: "test",
		Logger: slog.New(slog.NewJSONHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})),
		Lookup: lookup, PublicURL: "https://issuer.example.test", CertCountry: "DE", ShutdownGrace: 15 * time.Second}
	if os.Getenv(StoreEnv) == "postgres" {
		opts.Store = postgresFor(t, o.DataDir)
	}
	if o.Tweak != nil {
		o.Tweak(&opts)
	}
	ctx, cancel := context.WithCancel(context.Background())
	a, err := appliance.Open(ctx, opts)
	if err != nil {
		cancel()
		ln.Close()
		t.Fatalf("open appliance: %v", err)
	}
	in := &Instance{URL: "http://" + ln.Addr().String(), DataDir: o.DataDir, ConfigDir: o.ConfigDir, App: a,
		Client: &http.Client{Timeout: 30 * time.Second}, t: t, cancel: cancel, done: make(chan error, 1)}
	go func() { in.done <- a.Serve(ctx, ln) }()
	t.Cleanup(in.Stop)
	return in
}

// Stop drains and closes the appliance (idempotent).
func (in *Instance) Stop() {
	if in.cancel == nil {
		return
	}
	// A connection the client dialled but never used counts as busy for fasthttp's first 5 s
	// (as in net/http), so close ours first; the grace stays above that rule for the rest.
	in.Client.CloseIdleConnections()
	in.cancel()
	in.cancel = nil
	if err := <-in.done; err != nil {
		in.t.Errorf("serve: %v", err)
	}
	if err := in.App.Close(); err != nil {
		in.t.Errorf("close: %v", err)
	}
}

// CreateTenant creates a tenant and returns its API key.
func (in *Instance) CreateTenant(id string, roles ...string) string {
	in.t.Helper()
	res, err := in.App.CreateTenant(context.Background(), tenants.CreateTenantRequest{ID: id, Name: id + " Tenant", Roles: roles})
	if err != nil {
		in.t.Fatalf("create tenant %s: %v", id, err)
	}
	return res.APIKey
}

// Do sends a JSON request (body nil, []byte raw, or a value to marshal) and returns status and body.
func (in *Instance) Do(method, path, key string, body any) (int, []byte) {
	in.t.Helper()
	var rd io.Reader
	switch b := body.(type) {
	case nil:
	case []byte:
		rd = bytes.NewReader(b)
	case string:
		rd = bytes.NewReader([]byte(b))
	default:
		j, err := json.Marshal(b)
		if err != nil {
			in.t.Fatal(err)
		}
		rd = bytes.NewReader(j)
	}
	req, err := http.NewRequest(method, in.URL+path, rd)
	if err != nil {
		in.t.Fatal(err)
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	if key != "" {
		req.Header.Set("Authorization", "Bearer "+key)
	}
	resp, err := in.Client.Do(req)
	if err != nil {
		in.t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	out, err := io.ReadAll(resp.Body)
	if err != nil {
		in.t.Fatal(err)
	}
	return resp.StatusCode, out
}

// JSON decodes b into v or fails the test.
func JSON(t testing.TB, b []byte, v any) {
	t.Helper()
	if err := json.Unmarshal(b, v); err != nil {
		t.Fatalf("decode %s: %v", b, err)
	}
}
