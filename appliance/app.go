// Package appliance wires kmsgate together: configuration, the sealed store, the provider
// registry, the services and the HTTP listeners, and runs them until a signal asks it to drain.
package appliance

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/gofiber/fiber/v2"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/kmsgate/kmsgate/api"
	"github.com/kmsgate/kmsgate/appliance/authn"
	"github.com/kmsgate/kmsgate/appliance/config"
	"github.com/kmsgate/kmsgate/appliance/extauth"
	"github.com/kmsgate/kmsgate/appliance/keychain"
	"github.com/kmsgate/kmsgate/appliance/keys"
	"github.com/kmsgate/kmsgate/appliance/seal"
	"github.com/kmsgate/kmsgate/appliance/store"
	"github.com/kmsgate/kmsgate/appliance/tenants"
	"github.com/kmsgate/kmsgate/metrics"
	"github.com/kmsgate/kmsgate/providers"
	"github.com/kmsgate/kmsgate/providers/db"
)

// Options configure one appliance instance.
type Options struct {
	Listen    string
	ConfigDir string
	DataDir   string
	// Store is a postgres:// URL selecting the shared PostgreSQL store; empty keeps Badger under
	// DataDir. StorePasswordFile holds its password (else the systemd credential store-password).
	Store             string
	StorePasswordFile string
	Dev               bool
	MasterKeyEnv      string
	MasterKeyFile     string
	CredsDir          string
	AdminSocket       string // "" = <data-dir>/admin.sock; "-" disables it
	PublicURL         string
	// CertCountry is the C= of generated certificate subjects.
	CertCountry string
	// ConfigImportForce re-imports key chains from the config folder even when they exist.
	ConfigImportForce bool
	// RotationCheckInterval is how often the scheduler looks for due key chains (default 1h).
	RotationCheckInterval time.Duration
	// RotationGrace is how long a rotated-out key stays published and usable (default 30 days).
	RotationGrace time.Duration
	Version       string
	Commit        string
	Logger        *slog.Logger
	Out           io.Writer // where dev-mode banners go
	Lookup        config.LookupFunc
	ShutdownGrace time.Duration
	// TLSCert and TLSKey enable HTTPS on the listener. The listener then asks every client for a
	// certificate without requiring one: a certificate bound to a tenant (tenant add-cert)
	// authenticates, and a client without one sends an API key or token instead. TLSClientCA
	// names the CA whose certificates are accepted as "verified but unbound" in require-mode.
	TLSCert     string
	TLSKey      string
	TLSClientCA string
	// TLSRequireClientCert refuses, in the handshake, a client whose certificate is neither bound
	// to a tenant nor issued by TLSClientCA, and one that sends none.
	TLSRequireClientCert bool
	// Tokens verifies bearer tokens that are not kmsgate API keys (access tokens); nil refuses them.
	Tokens api.TokenVerifier
	// MaxConns and MaxConnsPerIP cap concurrent connections on the listener, in total and per
	// client IP (0: DefaultMaxConns / DefaultMaxConnsPerIP; negative: no cap).
	MaxConns      int
	MaxConnsPerIP int
	// HealthInterval is how often providers are probed in the background (default 15s).
	HealthInterval time.Duration
	// CreateRate and CreateBurst bound key and key-chain creation per credential (0: 10/s burst
	// 50; a negative rate: no limit). SignRate bounds signing per credential (0: no limit) with
	// SignBurst (0: one second's worth).
	CreateRate  float64
	CreateBurst int
	SignRate    float64
	SignBurst   int
	// MetricsListen, when set, serves /metrics on this address only (not on Listen).
	MetricsListen string
	// MaxChainsPerTenant caps the key chains of one tenant (0: DefaultMaxChainsPerTenant;
	// negative: no cap).
	MaxChainsPerTenant int
	// MaxKeysPerTenant caps a tenant's keys across both faces (0: keys.DefaultMaxKeysPerTenant;
	// negative: no cap).
	MaxKeysPerTenant int
	// KeyIntentMaxAge is the age after which an unfinished key create counts as abandoned and its
	// backend key is swept (0: DefaultKeyIntentMaxAge).
	KeyIntentMaxAge time.Duration
	// CacheRefreshInterval is how often a replica on a shared store rebuilds its caches from the
	// store, the safety net under change notifications (0: DefaultCacheRefreshInterval; negative:
	// never).
	CacheRefreshInterval time.Duration
	// SystemKeyProvider holds the system key that signs access tokens ("": the default provider).
	SystemKeyProvider string
	// TokenTTL is the lifetime of issued access tokens (0: authn.DefaultTokenTTL; more than 60s).
	TokenTTL time.Duration
	// KeyChainLegacyStatus answers /key-chain PUT, DELETE and rotate with the older EUDIPLO API's
	// 200, 200 and 201 instead of 204, for clients written against it.
	KeyChainLegacyStatus bool
}

// Appliance is a running kmsgate.
type Appliance struct {
	opts     Options
	log      *slog.Logger
	kms      *config.KMS
	store    *store.Store
	sealer   *seal.Sealer
	registry *providers.Registry
	metrics  *metrics.Metrics
	tenants  *tenants.Service
	keys     *keys.Service
	health   *healthMonitor
	app      *fiber.App
	admin    *fiber.App

	keyChains    *keychain.Service
	extIssuers   []extauth.Issuer  // from auth.json
	extTokens    *extauth.Verifier // external issuers' bearer tokens
	intentsSwept *prometheus.CounterVec
	dbProvs      []*db.Provider // to evict sealed keys deleted through another replica
	systemKey    *authn.SystemKey
	tokens       *authn.Tokens

	mu          sync.Mutex
	metricsAddr string

	closeOnce sync.Once
	closeErr  error
}

// DBDir is where Badger lives under the data dir.
func DBDir(dataDir string) string { return filepath.Join(dataDir, "db") }

// SocketPath is the admin socket path for opts.
func (o Options) SocketPath() string {
	if o.AdminSocket == "" {
		return filepath.Join(o.DataDir, "admin.sock")
	}
	return o.AdminSocket
}

func (o Options) storeOptions() StoreOptions {
	return StoreOptions{URL: o.Store, PasswordFile: o.StorePasswordFile, CredsDir: o.CredsDir, DataDir: o.DataDir,
		Logger: o.Logger}
}

// masterKeyCheck is a sealed constant stored once, so a wrong master key is caught at start-up with
// a clear message instead of failing on the first signature.
const masterKeyCheck = "kmsgate master key check"

// Open builds the appliance: config, master key, store, providers, services.
func Open(ctx context.Context, o Options) (*Appliance, error) {
	if o.Logger == nil {
		o.Logger = slog.New(slog.NewJSONHandler(os.Stderr, nil))
	}
	if o.Lookup == nil {
		o.Lookup = os.LookupEnv
	}
	if o.Out == nil {
		o.Out = os.Stderr
	}
	a := &Appliance{opts: o, log: o.Logger}
	kms, err := config.LoadKMS(o.ConfigDir, o.Lookup, ProviderCatalog())
	if err != nil {
		return nil, err
	}
	a.kms = kms
	if err := a.loadExternalIssuers(); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(o.DataDir, 0o700); err != nil {
		return nil, fmt.Errorf("create data dir: %w", err)
	}
	key, src, err := seal.LoadKey(seal.LoadOptions{EnvValue: o.MasterKeyEnv, File: o.MasterKeyFile, CredsDir: o.CredsDir,
		DataDir: o.DataDir, DevMode: o.Dev, Generated: func(p string) {
			a.log.Warn("DEVELOPMENT MODE: generated a master key on disk next to the data; never use this in production",
				"path", p)
		}})
	if err != nil {
		return nil, err
	}
	a.log.Info("master key loaded", "source", string(src))
	if a.sealer, err = seal.New(key); err != nil {
		return nil, err
	}
	clear(key)
	if a.store, err = OpenStore(ctx, o.storeOptions()); err != nil {
		return nil, err
	}
	if err := a.checkMasterKey(ctx); err != nil {
		a.store.Close()
		return nil, err
	}
	a.metrics = metrics.New(o.Version, o.Commit)
	a.metrics.RegisterStoreQueries(store.Ops, a.store.Queries)
	a.registry, err = providers.NewRegistry(ctx, kms.Providers, kms.DefaultProvider, a.factories(),
		func(id string) providers.Observer { return a.metrics.ProviderRecorder(id) })
	if err != nil {
		a.store.Close()
		return nil, err
	}
	a.registerProviderMetrics()
	if a.tenants, err = tenants.New(ctx, a.store, tenants.WithProviders(func() ([]string, error) { return a.registry.IDs(), nil })); err != nil {
		a.Close()
		return nil, err
	}
	if err := a.setupExternalTokens(ctx); err != nil {
		a.Close()
		return nil, err
	}
	lc := keys.NewLifecycleWith(keys.LifecycleConfig{Store: a.store, Log: a.log, MaxKeysPerTenant: o.MaxKeysPerTenant})
	a.keys = keys.NewWithLifecycle(a.store, a.registry, lc, a.log)
	if err := lc.Backfill(ctx); err != nil {
		a.Close()
		return nil, err
	}
	a.intentsSwept = newIntentsSwept()
	a.metrics.Registry.MustRegister(a.intentsSwept)
	a.health = newHealthMonitor(a.registry, a.metrics, a.log)
	a.health.watchStore(a.store, o.storeOptions().Backend())
	deps := api.Deps{Tenants: a.tenants, Keys: a.keys, Registry: a.registry, Health: a.health, Metrics: a.metrics,
		Logger: a.log, MetricsElsewhere: o.MetricsListen != "", Limits: o.rateLimits(), Tokens: a.tokenVerifier(nil, ""),
		KeyChainLegacyStatus: o.KeyChainLegacyStatus}
	if err := a.setupKeyChains(ctx, &deps); err != nil {
		a.Close()
		return nil, err
	}
	if err := a.setupOAuth(ctx, &deps); err != nil {
		a.Close()
		return nil, err
	}
	deps.CreateTenant = a.CreateTenant
	a.app = api.New(deps)
	a.admin = api.NewAdmin(deps)
	return a, nil
}

func (a *Appliance) checkMasterKey(ctx context.Context) error {
	var sealed []byte
	aad := seal.AAD("check", "", "")
	err := a.store.Get(ctx, store.MetaKey("master-key-check"), &sealed)
	if errors.Is(err, store.ErrNotFound) {
		s, err := a.sealer.Seal([]byte(masterKeyCheck), aad)
		if err != nil {
			return err
		}
		return a.store.Put(ctx, store.MetaKey("master-key-check"), s)
	}
	if err != nil {
		return err
	}
	if _, err := a.sealer.Open(sealed, aad); err != nil {
		return fmt.Errorf("the master key does not match the one the store %s was created with: "+
			"start with the original KMSGATE_MASTER_KEY / master-key file", a.opts.storeOptions().Location())
	}
	return nil
}

// MetricsAddr is the address /metrics is served on when MetricsListen is set, once Serve has
// opened it ("" before).
func (a *Appliance) MetricsAddr() string {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.metricsAddr
}

// App is the public HTTP app (tests drive it with app.Test).
func (a *Appliance) App() *fiber.App { return a.app }

// Tenants exposes the tenant service (dev bootstrap, tests).
func (a *Appliance) Tenants() *tenants.Service { return a.tenants }

// Registry exposes the providers.
func (a *Appliance) Registry() *providers.Registry { return a.registry }

// Run serves until ctx is cancelled, then drains in-flight requests.
func (a *Appliance) Run(ctx context.Context) error {
	ln, err := net.Listen("tcp", a.opts.Listen)
	if err != nil {
		return fmt.Errorf("listen %s: %w", a.opts.Listen, err)
	}
	return a.Serve(ctx, ln)
}

// tlsConfig builds the listener's TLS configuration, or nil for plain HTTP.
// pinned reports whether a client certificate's public key is bound to a tenant.
func (o Options) tlsConfig(pinned func(*x509.Certificate) bool) (*tls.Config, error) {
	if o.TLSCert == "" && o.TLSKey == "" {
		if o.TLSClientCA != "" || o.TLSRequireClientCert {
			return nil, errors.New("--tls-client-ca and --tls-require-client-cert need --tls-cert and --tls-key")
		}
		return nil, nil
	}
	cert, err := tls.LoadX509KeyPair(o.TLSCert, o.TLSKey)
	if err != nil {
		return nil, fmt.Errorf("load TLS certificate: %w", err)
	}
	// TLS 1.2 offers AEAD suites with forward secrecy only (no CBC, no SHA-1 MAC, no RSA key
	// exchange); TLS 1.3 suites are all AEAD and not configurable.
	cfg := &tls.Config{MinVersion: tls.VersionTLS12, Certificates: []tls.Certificate{cert}, CipherSuites: []uint16{
		tls.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256, tls.TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
		tls.TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256, tls.TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
		tls.TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384, tls.TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256}}
	// The pool stays out of tls.Config.ClientCAs: the server would then name its CAs in the
	// certificate request, and a Go client (kmsgate's own http provider among them) sends no
	// certificate that another CA issued, so a pinned self-signed certificate would never arrive.
	var clientCAs *x509.CertPool
	if o.TLSClientCA != "" {
		pem, err := os.ReadFile(o.TLSClientCA)
		if err != nil {
			return nil, fmt.Errorf("read TLS client CA: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("TLS client CA %s holds no PEM certificate", o.TLSClientCA)
		}
		clientCAs = pool
	}
	// Go's own chain verification would reject a pinned self-signed certificate, so the
	// handshake only asks for a certificate (and checks the client holds its key); whether it
	// authenticates is decided per request by its pin, which sees revocations at once.
	cfg.ClientAuth = tls.RequestClientCert
	if o.TLSRequireClientCert {
		cfg.ClientAuth = tls.RequireAnyClientCert
		cfg.VerifyPeerCertificate = func(raw [][]byte, _ [][]*x509.Certificate) error {
			return verifyClientCert(raw, clientCAs, pinned)
		}
	}
	return cfg, nil
}

// verifyClientCert accepts, in require-mode, a client certificate bound to a tenant, or one that
// chains to the client CA pool (verified but unbound: the request must still carry a key or token).
func verifyClientCert(raw [][]byte, roots *x509.CertPool, pinned func(*x509.Certificate) bool) error {
	if len(raw) == 0 {
		return errors.New("client certificate required")
	}
	leaf, err := x509.ParseCertificate(raw[0])
	if err != nil {
		return fmt.Errorf("client certificate: %w", err)
	}
	if pinned != nil && pinned(leaf) {
		return nil
	}
	if roots == nil {
		return errors.New("client certificate is not bound to a tenant")
	}
	inter := x509.NewCertPool()
	for _, r := range raw[1:] {
		if c, err := x509.ParseCertificate(r); err == nil {
			inter.AddCert(c)
		}
	}
	_, err = leaf.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter,
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}})
	if err != nil {
		return fmt.Errorf("client certificate is neither bound to a tenant nor issued by the client CA: %w", err)
	}
	return nil
}

// Serve serves on ln until ctx is cancelled. Every listener it was handed or opened is closed
// when it returns, also when start-up fails half-way, so a failed start never keeps the port.
func (a *Appliance) Serve(ctx context.Context, ln net.Listener) error {
	tcfg, err := a.opts.tlsConfig(func(c *x509.Certificate) bool {
		pin := tenants.SPKIPin(c)
		return a.tenants.AuthenticateCert(pin[:]) != nil
	})
	if err != nil {
		ln.Close()
		return err
	}
	var sockLn net.Listener
	if a.opts.AdminSocket != "-" {
		p := a.opts.SocketPath()
		_ = os.Remove(p) // a stale socket from a crash; Badger's lock already proved we are alone
		l, err := listenUnixPrivate(p)
		if err != nil {
			ln.Close()
			return fmt.Errorf("admin socket %s: %w", p, err)
		}
		sockLn = l
	}
	var metricsLn net.Listener
	if a.opts.MetricsListen != "" {
		l, err := net.Listen("tcp", a.opts.MetricsListen)
		if err != nil {
			ln.Close()
			if sockLn != nil {
				sockLn.Close()
			}
			return fmt.Errorf("metrics listener %s: %w", a.opts.MetricsListen, err)
		}
		metricsLn = l
		a.mu.Lock()
		a.metricsAddr = l.Addr().String()
		a.mu.Unlock()
	}
	ln = newCapListener(lingerListener{ln}, orDefault(a.opts.MaxConns, DefaultMaxConns),
		orDefault(a.opts.MaxConnsPerIP, DefaultMaxConnsPerIP))
	if tcfg != nil {
		ln = tls.NewListener(ln, tcfg)
	}
	bg, stopBG := context.WithCancel(context.Background())
	defer stopBG()
	a.startupSweep(ctx)
	go a.intentSweepLoop(bg)
	healthEvery := a.opts.HealthInterval
	if healthEvery <= 0 {
		healthEvery = DefaultHealthInterval
	}
	go a.health.run(bg, healthEvery)
	go a.health.runStore(bg, StoreProbeInterval)
	go a.gcLoop(bg)
	go a.startKeyChainScheduler(bg)
	if a.store.Shared() {
		go a.syncCaches(bg)
	}

	errc := make(chan error, 3)
	if sockLn != nil {
		go func() { errc <- a.admin.Listener(sockLn) }()
	}
	var metricsSrv *http.Server
	if metricsLn != nil {
		mux := http.NewServeMux()
		mux.Handle("GET /metrics", a.metrics.Handler())
		metricsSrv = &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second, ReadTimeout: 30 * time.Second,
			WriteTimeout: 30 * time.Second, IdleTimeout: 120 * time.Second}
		go func() {
			err := metricsSrv.Serve(metricsLn)
			if errors.Is(err, http.ErrServerClosed) {
				err = nil
			}
			errc <- err
		}()
	}
	a.log.Info("kmsgate serving", "listen", ln.Addr().String(), "providers", a.registry.IDs(),
		"defaultProvider", a.registry.DefaultID(), "version", a.opts.Version)
	go func() { errc <- a.app.Listener(ln) }()
	var serveErr error
	select {
	case <-ctx.Done():
	case serveErr = <-errc:
		// One server stopped on its own: shut the others down too rather than leave them serving.
		if serveErr != nil {
			serveErr = fmt.Errorf("http server: %w", serveErr)
		}
	}
	grace := a.opts.ShutdownGrace
	if grace == 0 {
		grace = 30 * time.Second
	}
	a.log.Info("shutting down: draining in-flight requests", "grace", grace.String())
	err = a.app.ShutdownWithTimeout(grace)
	if sockLn != nil {
		_ = a.admin.ShutdownWithTimeout(grace)
		_ = os.Remove(a.opts.SocketPath())
	}
	if metricsSrv != nil {
		sctx, cancel := context.WithTimeout(context.Background(), grace)
		_ = metricsSrv.Shutdown(sctx)
		cancel()
	}
	return errors.Join(serveErr, err)
}

// Default per-credential creation rate: far above what an issuer does by hand or at start-up, low
// enough that one leaked key cannot fill an HSM in seconds.
const (
	DefaultCreateRate  = 10
	DefaultCreateBurst = 50
)

func (o Options) rateLimits() api.RateLimits {
	l := api.RateLimits{CreateRate: o.CreateRate, CreateBurst: o.CreateBurst, SignRate: o.SignRate, SignBurst: o.SignBurst}
	if l.CreateRate == 0 {
		l.CreateRate = DefaultCreateRate
	}
	if l.CreateBurst == 0 {
		l.CreateBurst = DefaultCreateBurst
	}
	if l.SignBurst == 0 {
		l.SignBurst = int(math.Ceil(l.SignRate))
	}
	return l
}

// orDefault maps 0 to def and a negative value to 0 (no limit).
func orDefault(v, def int) int {
	switch {
	case v == 0:
		return def
	case v < 0:
		return 0
	}
	return v
}

func (a *Appliance) gcLoop(ctx context.Context) {
	t := time.NewTicker(10 * time.Minute)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			a.store.RunGC()
		}
	}
}

// StoreCloseTimeout bounds closing the store at shutdown. With the default 30 s drain it keeps a
// stop well inside the systemd unit's TimeoutStopSec (45 s), so a store that cannot flush ends in
// a non-zero exit the service manager reports, not in a SIGKILL after a hang.
const StoreCloseTimeout = 10 * time.Second

// Close releases providers and the store. An error means the store was not cleanly closed: the
// caller should exit non-zero (acknowledged writes are durable either way).
func (a *Appliance) Close() error {
	var failures []error
	if a.registry != nil {
		failures = append(failures, a.registry.Close())
	}
	if a.store != nil {
		failures = append(failures, a.closeStore(StoreCloseTimeout))
	}
	return errors.Join(failures...)
}

// closeStore closes the store in the background and gives up after timeout: a close that hangs
// (an engine retrying a flush that cannot succeed) must not keep the process from exiting.
func (a *Appliance) closeStore(timeout time.Duration) error {
	a.closeOnce.Do(func() {
		done := make(chan error, 1)
		go func() { done <- a.store.Close() }()
		t := time.NewTimer(timeout)
		defer t.Stop()
		select {
		case a.closeErr = <-done:
		case <-t.C:
			a.closeErr = fmt.Errorf("store close did not finish within %s", timeout)
		}
		if a.closeErr != nil {
			a.log.Error("store not closed cleanly", "error", a.closeErr)
			a.closeErr = fmt.Errorf("close store: %w", a.closeErr)
		}
	})
	return a.closeErr
}

// DevBootstrap creates the dev tenant once and prints its API key, which is kept in the data dir
// so that every `make run` prints the same key.
func (a *Appliance) DevBootstrap(ctx context.Context) error {
	keyFile := filepath.Join(a.opts.DataDir, "dev-api-key")
	if _, err := a.tenants.Tenant(ctx, "dev"); errors.Is(err, tenants.ErrTenantNotFound) {
		res, err := a.CreateTenant(ctx, tenants.CreateTenantRequest{ID: "dev", Name: "Development Tenant",
			Roles: []string{tenants.RoleManage, tenants.RoleSign, tenants.RoleExport}})
		if err != nil {
			return fmt.Errorf("create dev tenant: %w", err)
		}
		if err := os.WriteFile(keyFile, []byte(res.APIKey+"\n"), 0o600); err != nil {
			return fmt.Errorf("write dev api key: %w", err)
		}
	} else if err != nil {
		return err
	}
	key, err := os.ReadFile(keyFile)
	if err != nil {
		return fmt.Errorf("dev tenant exists but %s is unreadable: %w", keyFile, err)
	}
	fmt.Fprintf(a.opts.Out, "\n*** kmsgate DEVELOPMENT MODE ***\n  tenant:  dev\n  API key: %s  (also in %s)\n  listen:  http://%s\n\n",
		strings.TrimSpace(string(key)), keyFile, a.opts.Listen)
	return nil
}
