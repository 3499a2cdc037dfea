package cli

import (
	"bytes"
	"context"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/kmsgate/kmsgate/appliance"
	"github.com/kmsgate/kmsgate/appliance/authn"
	"github.com/kmsgate/kmsgate/appliance/config"
	"github.com/kmsgate/kmsgate/appliance/keychain"
	"github.com/kmsgate/kmsgate/appliance/keys"
	"github.com/kmsgate/kmsgate/appliance/store"
	"github.com/kmsgate/kmsgate/appliance/tenants"
)

// BuildInfo is stamped into the binary by the linker.
type BuildInfo struct {
	Version string
	Commit  string
}

func envOr(name, def string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return def
}

// envInt reads an integer variable; a malformed value is ignored so the flag default applies and
// the flag parser reports nothing surprising.
func envInt(name string, def int) int {
	if v, err := strconv.Atoi(os.Getenv(name)); err == nil {
		return v
	}
	return def
}

func envDuration(name string, def time.Duration) time.Duration {
	if v, err := time.ParseDuration(os.Getenv(name)); err == nil {
		return v
	}
	return def
}

func envFloat(name string, def float64) float64 {
	if v, err := strconv.ParseFloat(os.Getenv(name), 64); err == nil {
		return v
	}
	return def
}

func envBool(name string) bool {
	v := strings.ToLower(os.Getenv(name))
	return v == "1" || v == "true" || v == "yes"
}

// envBoolStrict reads a boolean variable (unset or empty: false). A value that is not a boolean
// is an error, which serve reports before it starts: a switch that changes what clients read
// must not fall back to its default on a typo.
func envBoolStrict(name string) (bool, error) {
	v := strings.TrimSpace(os.Getenv(name))
	if v == "" {
		return false, nil
	}
	b, err := strconv.ParseBool(strings.ToLower(v))
	if err != nil {
		return false, fmt.Errorf("%s=%q is not a boolean (use true or false, 1 or 0)", name, v)
	}
	return b, nil
}

// globalFlags are shared by every command that touches config or data.
type globalFlags struct {
	configDir string
	dataDir   string
	logLevel  string
	// store is --store; the environment fallback is read at run time, not used as the flag's
	// default, so `--help` never prints a URL that may hold a password.
	store             string
	storePasswordFile string
}

func (g *globalFlags) storeOptions(logger *slog.Logger) appliance.StoreOptions {
	u := g.store
	if u == "" {
		u = os.Getenv("KMSGATE_STORE")
	}
	return appliance.StoreOptions{URL: u, PasswordFile: g.storePasswordFile, CredsDir: os.Getenv("CREDENTIALS_DIRECTORY"),
		DataDir: g.dataDir, Logger: logger}
}

// NewRootCmd builds the kmsgate command tree.
func NewRootCmd(bi BuildInfo) *cobra.Command {
	g := &globalFlags{}
	root := &cobra.Command{
		Use:           "kmsgate",
		Short:         "PKCS#11-first HSM signing gateway with one HTTP API over every key backend",
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.PersistentFlags().StringVar(&g.configDir, "config-dir", envOr("KMSGATE_CONFIG_DIR", "/etc/kmsgate"),
		"directory holding kms.json and <tenant>/key-chains/ (env KMSGATE_CONFIG_DIR)")
	root.PersistentFlags().StringVar(&g.dataDir, "data-dir", envOr("KMSGATE_DATA_DIR", "/var/lib/kmsgate"),
		"directory of the embedded store (env KMSGATE_DATA_DIR)")
	root.PersistentFlags().StringVar(&g.store, "store", "",
		"postgres:// URL of a shared PostgreSQL store; unset: the embedded store under --data-dir (env KMSGATE_STORE)")
	root.PersistentFlags().StringVar(&g.storePasswordFile, "store-password-file", os.Getenv("KMSGATE_STORE_PASSWORD_FILE"),
		"file holding the PostgreSQL password (default: the systemd credential store-password; env KMSGATE_STORE_PASSWORD_FILE)")
	root.PersistentFlags().StringVar(&g.logLevel, "log-level", envOr("KMSGATE_LOG_LEVEL", "info"), "debug, info, warn or error")
	loadKMS := func() (*config.KMS, error) {
		return config.LoadKMS(g.configDir, os.LookupEnv, appliance.ProviderCatalog())
	}
	root.AddCommand(newServeCmd(g, bi), newVersionCmd(bi), newConfigCmd(loadKMS), newTenantCmd(g), newAdminCmd(g),
		newHSMCmd(), newDoctorCmd(loadKMS), newStoreCmd(g), newSystemKeyCmd(g))
	return root
}

func (g *globalFlags) logger(w io.Writer) *slog.Logger {
	var lvl slog.Level
	if err := lvl.UnmarshalText([]byte(g.logLevel)); err != nil {
		lvl = slog.LevelInfo
	}
	return slog.New(slog.NewJSONHandler(w, &slog.HandlerOptions{Level: lvl}))
}

func newVersionCmd(bi BuildInfo) *cobra.Command {
	return &cobra.Command{Use: "version", Short: "Print the version", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			_, err := fmt.Fprintf(cmd.OutOrStdout(), "kmsgate %s (commit %s)\n", bi.Version, bi.Commit)
			return err
		}}
}

func newServeCmd(g *globalFlags, bi BuildInfo) *cobra.Command {
	o := appliance.Options{}
	legacyStatus, legacyStatusErr := envBoolStrict("KMSGATE_KEYCHAIN_LEGACY_STATUS")
	cmd := &cobra.Command{
		Use:   "serve",
		Short: "Run the signing gateway",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) (err error) {
			if legacyStatusErr != nil {
				return legacyStatusErr
			}
			o.ConfigDir, o.DataDir = g.configDir, g.dataDir
			so := g.storeOptions(nil)
			o.Store, o.StorePasswordFile = so.URL, so.PasswordFile
			o.Version, o.Commit = bi.Version, bi.Commit
			o.Logger = g.logger(cmd.ErrOrStderr())
			o.Out = cmd.OutOrStdout()
			o.MasterKeyEnv = os.Getenv("KMSGATE_MASTER_KEY")
			// Scrub it once read: the environment is inherited by children and readable in
			// /proc/<pid>/environ for the process's whole life.
			if err := os.Unsetenv("KMSGATE_MASTER_KEY"); err != nil {
				return fmt.Errorf("scrub KMSGATE_MASTER_KEY from the environment: %w", err)
			}
			o.CredsDir = os.Getenv("CREDENTIALS_DIRECTORY")
			ctx, stop := signal.NotifyContext(cmd.Context(), syscall.SIGINT, syscall.SIGTERM)
			defer stop()
			a, err := appliance.Open(ctx, o)
			if err != nil {
				return err
			}
			// A store that could not be closed cleanly is an error: the exit status tells the
			// service manager, and the next start replays the store's log.
			defer func() { err = errors.Join(err, a.Close()) }()
			if o.Dev {
				if err := a.DevBootstrap(ctx); err != nil {
					return err
				}
			}
			return a.Run(ctx)
		},
	}
	f := cmd.Flags()
	f.StringVar(&o.Listen, "listen", envOr("KMSGATE_LISTEN", "127.0.0.1:8080"), "address to serve HTTP on (env KMSGATE_LISTEN)")
	f.BoolVar(&o.Dev, "dev", envBool("KMSGATE_DEV"), "development mode: generate a master key in the data dir and a dev tenant (env KMSGATE_DEV)")
	f.StringVar(&o.MasterKeyFile, "master-key-file", os.Getenv("KMSGATE_MASTER_KEY_FILE"), "file holding the base64 master key (env KMSGATE_MASTER_KEY_FILE)")
	f.StringVar(&o.AdminSocket, "admin-socket", os.Getenv("KMSGATE_ADMIN_SOCKET"), `admin Unix socket (default <data-dir>/admin.sock; "-" disables it)`)
	f.StringVar(&o.PublicURL, "public-url", envOr("KMSGATE_PUBLIC_URL", "http://localhost:8080"), "public URL whose host goes into certificate SANs (env KMSGATE_PUBLIC_URL)")
	f.StringVar(&o.CertCountry, "cert-country", envOr("KMSGATE_CERT_COUNTRY", "DE"), "C= of generated certificate subjects (env KMSGATE_CERT_COUNTRY)")
	f.BoolVar(&o.ConfigImportForce, "config-import-force", envBool("KMSGATE_CONFIG_IMPORT_FORCE"), "re-import key chains from <config-dir>/<tenant>/key-chains even when they exist (env KMSGATE_CONFIG_IMPORT_FORCE)")
	f.DurationVar(&o.RotationCheckInterval, "rotation-check-interval", time.Hour, "how often the scheduler looks for key chains due for rotation")
	f.DurationVar(&o.RotationGrace, "rotation-grace", 30*24*time.Hour, "how long a rotated-out key stays published and usable before it is deleted")
	f.StringVar(&o.TLSCert, "tls-cert", os.Getenv("KMSGATE_TLS_CERT"), "PEM certificate for HTTPS (env KMSGATE_TLS_CERT)")
	f.StringVar(&o.TLSKey, "tls-key", os.Getenv("KMSGATE_TLS_KEY"), "PEM private key for HTTPS (env KMSGATE_TLS_KEY)")
	f.StringVar(&o.TLSClientCA, "tls-client-ca", os.Getenv("KMSGATE_TLS_CLIENT_CA"), "PEM CA whose client certificates --tls-require-client-cert admits without a binding (env KMSGATE_TLS_CLIENT_CA)")
	f.BoolVar(&o.TLSRequireClientCert, "tls-require-client-cert", envBool("KMSGATE_TLS_REQUIRE_CLIENT_CERT"),
		"refuse TLS clients without a certificate that is bound (tenant add-cert) or issued by --tls-client-ca (env KMSGATE_TLS_REQUIRE_CLIENT_CERT)")
	f.DurationVar(&o.ShutdownGrace, "shutdown-grace", 30*time.Second, "how long SIGTERM waits for in-flight requests")
	f.StringVar(&o.MetricsListen, "metrics-listen", os.Getenv("KMSGATE_METRICS_LISTEN"),
		"serve /metrics only on this address (e.g. 127.0.0.1:9090) instead of the main listener (env KMSGATE_METRICS_LISTEN)")
	f.Float64Var(&o.CreateRate, "create-rate", envFloat("KMSGATE_CREATE_RATE", appliance.DefaultCreateRate),
		"key and key-chain creations per second per API key (negative: no limit; env KMSGATE_CREATE_RATE)")
	f.IntVar(&o.CreateBurst, "create-burst", envInt("KMSGATE_CREATE_BURST", appliance.DefaultCreateBurst),
		"creations an API key may make at once before --create-rate applies (env KMSGATE_CREATE_BURST)")
	f.Float64Var(&o.SignRate, "sign-rate", envFloat("KMSGATE_SIGN_RATE", 0),
		"signing requests per second per API key (0: no limit; env KMSGATE_SIGN_RATE)")
	f.IntVar(&o.SignBurst, "sign-burst", envInt("KMSGATE_SIGN_BURST", 0),
		"signing requests an API key may make at once (0: one second's worth of --sign-rate; env KMSGATE_SIGN_BURST)")
	f.IntVar(&o.MaxConns, "max-conns", envInt("KMSGATE_MAX_CONNS", appliance.DefaultMaxConns),
		"cap on concurrent connections; further ones are closed at once (negative: no cap; env KMSGATE_MAX_CONNS)")
	f.IntVar(&o.MaxConnsPerIP, "max-conns-per-ip", envInt("KMSGATE_MAX_CONNS_PER_IP", appliance.DefaultMaxConnsPerIP),
		"cap on concurrent connections from one client IP (negative: no cap; env KMSGATE_MAX_CONNS_PER_IP)")
	f.DurationVar(&o.CacheRefreshInterval, "cache-refresh-interval", envDuration("KMSGATE_CACHE_REFRESH_INTERVAL", appliance.DefaultCacheRefreshInterval),
		"with a shared store: how often caches are rebuilt from it besides change notices (negative: never; env KMSGATE_CACHE_REFRESH_INTERVAL)")
	f.IntVar(&o.MaxChainsPerTenant, "max-chains-per-tenant", envInt("KMSGATE_MAX_CHAINS_PER_TENANT", appliance.DefaultMaxChainsPerTenant),
		"key chains one tenant may hold; more answer 403 quota_exceeded (-1: no cap; env KMSGATE_MAX_CHAINS_PER_TENANT)")
	f.IntVar(&o.MaxKeysPerTenant, "max-keys-per-tenant", envInt("KMSGATE_MAX_KEYS_PER_TENANT", keys.DefaultMaxKeysPerTenant),
		"keys a tenant may hold, /keys and key-chain keys together (-1: no cap; env KMSGATE_MAX_KEYS_PER_TENANT)")
	f.DurationVar(&o.KeyIntentMaxAge, "key-intent-max-age", envDuration("KMSGATE_KEY_INTENT_MAX_AGE", appliance.DefaultKeyIntentMaxAge),
		"age after which an unfinished key create is abandoned and its backend key deleted by the sweep; "+
			"keep it well above the provider timeouts (env KMSGATE_KEY_INTENT_MAX_AGE)")
	f.StringVar(&o.SystemKeyProvider, "system-key-provider", os.Getenv("KMSGATE_SYSTEM_KEY_PROVIDER"),
		"provider holding the system key that signs access tokens (default: kms.json defaultProvider; env KMSGATE_SYSTEM_KEY_PROVIDER)")
	f.DurationVar(&o.TokenTTL, "token-ttl", envDuration("KMSGATE_TOKEN_TTL", authn.DefaultTokenTTL),
		"lifetime of access tokens from /oauth2/token; more than 60s (env KMSGATE_TOKEN_TTL)")
	f.BoolVar(&o.KeyChainLegacyStatus, "keychain-legacy-status", legacyStatus,
		"answer /key-chain PUT, DELETE and rotate with the older API's 200, 200, 201 instead of 204 (env KMSGATE_KEYCHAIN_LEGACY_STATUS)")
	return cmd
}

func newConfigCmd(loadKMS func() (*config.KMS, error)) *cobra.Command {
	c := &cobra.Command{Use: "config", Short: "Inspect configuration"}
	c.AddCommand(&cobra.Command{Use: "check", Short: "Validate kms.json and print the effective config, secrets redacted",
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			k, err := loadKMS()
			if err != nil {
				return err
			}
			b, err := k.Redacted()
			if err != nil {
				return err
			}
			_, err = fmt.Fprintf(cmd.OutOrStdout(), "%s\nconfig OK\n", b)
			return err
		}})
	return c
}

// adminClient talks to a running server's admin socket, or reports that none is listening.
type adminClient struct{ http *http.Client }

func dialAdmin(socket string) (*adminClient, bool) {
	conn, err := net.DialTimeout("unix", socket, time.Second)
	if err != nil {
		return nil, false
	}
	conn.Close()
	return &adminClient{http: &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", socket)
		}}}}, true
}

func (c *adminClient) do(method, path string, body, out any) error {
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return err
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequest(method, "http://kmsgate"+path, rd)
	if err != nil {
		return err
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return fmt.Errorf("admin socket: %w", err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if resp.StatusCode >= 300 {
		var p struct{ Error, Code string }
		if json.Unmarshal(b, &p) == nil && p.Error != "" {
			return fmt.Errorf("%s (%s)", p.Error, p.Code)
		}
		return fmt.Errorf("admin socket: HTTP %d", resp.StatusCode)
	}
	return json.Unmarshal(b, out)
}

// withOffline opens the store directly when no server's admin socket answers: a stopped data dir,
// or the shared PostgreSQL store that running replicas use too.
func withOffline(g *globalFlags, fn func(ctx context.Context, ts *tenants.Service) error) error {
	ctx := context.Background()
	st, err := appliance.OpenStore(ctx, g.storeOptions(g.logger(io.Discard)))
	if errors.Is(err, store.ErrLocked) {
		return fmt.Errorf("%w, but its admin socket is not reachable: pass --data-dir of the running server "+
			"or check the socket's permissions", err)
	}
	if err != nil {
		return err
	}
	defer st.Close()
	ts, err := tenants.New(ctx, st, tenants.WithProviders(func() ([]string, error) {
		k, err := config.LoadKMS(g.configDir, os.LookupEnv, appliance.ProviderCatalog())
		if err != nil {
			return nil, err
		}
		ids := make([]string, 0, len(k.Providers))
		for _, p := range k.Providers {
			ids = append(ids, p.ID)
		}
		return ids, nil
	}))
	if err != nil {
		return err
	}
	return fn(ctx, ts)
}

func printJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func newTenantCmd(g *globalFlags) *cobra.Command {
	var socket string
	c := &cobra.Command{Use: "tenant", Short: "Manage tenants and their API keys (through the running server's admin socket, or directly on a stopped data dir)"}
	c.PersistentFlags().StringVar(&socket, "admin-socket", os.Getenv("KMSGATE_ADMIN_SOCKET"), "admin socket (default <data-dir>/admin.sock)")
	sock := func() string { return appliance.Options{DataDir: g.dataDir, AdminSocket: socket}.SocketPath() }

	var name, roles, allowed, defProv string
	create := &cobra.Command{Use: "create ID", Short: "Create a tenant and print its API key (shown once)", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			req := tenants.CreateTenantRequest{ID: args[0], Name: name, DefaultProvider: defProv}
			if roles != "" {
				req.Roles = strings.Split(roles, ",")
			}
			if allowed != "" {
				req.AllowedProviders = strings.Split(allowed, ",")
			}
			var res struct {
				tenants.CreateTenantResult
				Bootstrap *keychain.BootstrapReport `json:"bootstrap"`
			}
			online := false
			if cl, ok := dialAdmin(sock()); ok {
				online = true
				if err := cl.do(http.MethodPost, "/admin/tenants", req, &res); err != nil {
					return err
				}
			} else if err := withOffline(g, func(ctx context.Context, ts *tenants.Service) error {
				r, err := ts.CreateTenant(ctx, req)
				if err == nil {
					res.CreateTenantResult = *r
				}
				return err
			}); err != nil {
				return err
			}
			out := map[string]any{"id": res.ID, "apiKey": res.APIKey, "roles": res.Roles}
			if res.Bootstrap != nil {
				out["bootstrap"] = res.Bootstrap
			}
			if err := printJSON(cmd.OutOrStdout(), out); err != nil {
				return err
			}
			return reportBootstrap(cmd.ErrOrStderr(), res.ID, online, res.Bootstrap)
		}}
	create.Flags().StringVar(&name, "name", "", "display name (goes into certificate subjects; default: the id)")
	create.Flags().StringVar(&roles, "roles", "", "comma-separated roles of the key: manage,sign,export (default manage,sign)")
	create.Flags().StringVar(&allowed, "providers", "", "comma-separated provider ids the tenant may use (default: all)")
	create.Flags().StringVar(&defProv, "default-provider", "", "the tenant's default provider id")

	list := &cobra.Command{Use: "list", Short: "List tenants and their credential ids", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			var res []tenants.TenantInfo
			if cl, ok := dialAdmin(sock()); ok {
				if err := cl.do(http.MethodGet, "/admin/tenants", nil, &res); err != nil {
					return err
				}
			} else if err := withOffline(g, func(ctx context.Context, ts *tenants.Service) error {
				var err error
				res, err = ts.List(ctx)
				return err
			}); err != nil {
				return err
			}
			if res == nil {
				res = []tenants.TenantInfo{}
			}
			return printJSON(cmd.OutOrStdout(), res)
		}}

	var revokeTenant, revokeCred bool
	revoke := &cobra.Command{Use: "revoke TENANT|CREDENTIAL_ID",
		Short: "Revoke all credentials (API keys, certificate bindings) of a tenant, or one by its credential id (--tenant/--credential say which when an id is both)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if revokeTenant && revokeCred {
				return errors.New("--tenant and --credential exclude each other")
			}
			target, path := tenants.RevokeAny, "/admin/tenants/"+url.PathEscape(args[0])+"/revoke"
			switch {
			case revokeTenant:
				target, path = tenants.RevokeTenant, path+"?target=tenant"
			case revokeCred:
				target, path = tenants.RevokeCredential, "/admin/credentials/"+url.PathEscape(args[0])+"/revoke"
			}
			var res struct {
				Revoked []string `json:"revoked"`
			}
			if cl, ok := dialAdmin(sock()); ok {
				if err := cl.do(http.MethodPost, path, map[string]any{}, &res); err != nil {
					return err
				}
			} else if err := withOffline(g, func(ctx context.Context, ts *tenants.Service) error {
				var err error
				res.Revoked, err = ts.Revoke(ctx, args[0], target)
				return err
			}); err != nil {
				return err
			}
			return printJSON(cmd.OutOrStdout(), res)
		}}
	revoke.Flags().BoolVar(&revokeTenant, "tenant", false, "the id is a tenant id: revoke all its API keys")
	revoke.Flags().BoolVar(&revokeCred, "credential", false, "the id is a credential id: revoke that one key")

	var keyRoles string
	addKey := &cobra.Command{Use: "add-key TENANT", Short: "Mint another API key for a tenant", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			var rs []string
			if keyRoles != "" {
				rs = strings.Split(keyRoles, ",")
			}
			var res tenants.NewKeyResult
			if cl, ok := dialAdmin(sock()); ok {
				if err := cl.do(http.MethodPost, "/admin/tenants/"+args[0]+"/keys", map[string]any{"roles": rs}, &res); err != nil {
					return err
				}
			} else if err := withOffline(g, func(ctx context.Context, ts *tenants.Service) error {
				r, err := ts.AddKey(ctx, args[0], rs, "")
				if err == nil {
					res = *r
				}
				return err
			}); err != nil {
				return err
			}
			return printJSON(cmd.OutOrStdout(), res)
		}}
	addKey.Flags().StringVar(&keyRoles, "roles", "", "comma-separated roles (default manage,sign)")
	var certFile, certRoles, certName string
	addCert := &cobra.Command{Use: "add-cert TENANT --cert FILE",
		Short: "Bind a client certificate (by its public key's SHA-256 pin) to a tenant; it then authenticates over TLS without an API key",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			data, err := os.ReadFile(certFile)
			if err != nil {
				return fmt.Errorf("read certificate: %w", err)
			}
			// Parse here too, so a wrong file fails before anything is contacted, and the PEM
			// sent to the server is the certificate whatever form the file had.
			cert, err := tenants.ParseCertificate(data)
			if err != nil {
				return err
			}
			var rs []string
			if certRoles != "" {
				rs = strings.Split(certRoles, ",")
			}
			var res tenants.CertBinding
			if cl, ok := dialAdmin(sock()); ok {
				body := map[string]any{"certificate": string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert.Raw})),
					"roles": rs, "name": certName}
				if err := cl.do(http.MethodPost, "/admin/tenants/"+url.PathEscape(args[0])+"/certs", body, &res); err != nil {
					return err
				}
			} else if err := withOffline(g, func(ctx context.Context, ts *tenants.Service) error {
				r, err := ts.AddCert(ctx, args[0], cert.Raw, rs, certName)
				if err == nil {
					res = *r
				}
				return err
			}); err != nil {
				return err
			}
			return printJSON(cmd.OutOrStdout(), res)
		}}
	addCert.Flags().StringVar(&certFile, "cert", "", "the client certificate, PEM or DER")
	addCert.Flags().StringVar(&certRoles, "roles", "", "comma-separated roles (default manage,sign)")
	addCert.Flags().StringVar(&certName, "name", "", "a label shown by tenant list (default: the certificate's common name)")
	_ = addCert.MarkFlagRequired("cert")
	c.AddCommand(create, list, revoke, addKey, addCert)
	return c
}

// reportBootstrap tells the operator, on stderr, what the tenant's key-chain bootstrap did not do.
// The tenant and its key exist either way (the exit status stays 0 so a script keeps the key it
// was just shown); failed usage types are retried by the server until they succeed.
func reportBootstrap(w io.Writer, tenant string, online bool, rep *keychain.BootstrapReport) error {
	var err error
	switch {
	case !online:
		_, err = fmt.Fprintf(w, "note: no server is running on this data dir; tenant %s gets its default key chains "+
			"when kmsgate next starts\n", tenant)
	case rep == nil:
		_, err = fmt.Fprintf(w, "note: the server made no key-chain bootstrap for tenant %s\n", tenant)
	default:
		for _, c := range rep.Chains {
			switch c.Status {
			case keychain.BootFailed:
				_, err = fmt.Fprintf(w, "WARNING: tenant %s: the %s key chain was NOT created: %s (%s)\n",
					tenant, c.UsageType, c.Reason, c.Code)
			case keychain.BootSkipped:
				_, err = fmt.Fprintf(w, "note: tenant %s: no %s key chain: %s\n", tenant, c.UsageType, c.Reason)
			}
			if err != nil {
				return err
			}
		}
		if f := rep.Failed(); len(f) > 0 {
			_, err = fmt.Fprintf(w, "WARNING: tenant %s was created, but %d of its default key chains are missing; "+
				"the server retries them on every rotation check and at start-up\n", tenant, len(f))
		}
	}
	return err
}

func newAdminCmd(g *globalFlags) *cobra.Command {
	c := &cobra.Command{Use: "admin", Short: "Administrator credentials"}
	c.AddCommand(&cobra.Command{Use: "create-key", Short: "Mint an admin API key for the /admin HTTP API (run on a stopped data dir)",
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return withOffline(g, func(ctx context.Context, ts *tenants.Service) error {
				r, err := ts.AddKey(ctx, "", nil, "admin")
				if err != nil {
					return err
				}
				return printJSON(cmd.OutOrStdout(), r)
			})
		}})
	return c
}
