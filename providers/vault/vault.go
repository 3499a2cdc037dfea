// Package vault is the "vault" provider: ECDSA P-256 keys in HashiCorp Vault's Transit engine,
// one transit mount per tenant (<mountPrefix><tenant>, created on first use). Signatures are
// requested with marshaling_algorithm=jws, so Vault returns the raw r‖s that JOSE needs.
package vault

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/vault/api"

	"github.com/kmsgate/kmsgate/internal/errs"
	"github.com/kmsgate/kmsgate/providers"
	"github.com/kmsgate/kmsgate/providers/jwkcache"
)

// Config is the kms.json entry of a vault provider.
type Config struct {
	providers.Common
	VaultURL string `json:"vaultUrl"`
	// VaultToken or VaultTokenFile (e.g. a Vault Agent sink) authenticates; exactly one is required.
	VaultToken     string `json:"vaultToken,omitempty" secret:"true"`
	VaultTokenFile string `json:"vaultTokenFile,omitempty"`
	// MountPrefix is prepended to the tenant to name its transit mount (default "kmsgate-"; ""
	// gives EUDIPLO's mount-per-tenant naming).
	MountPrefix *string `json:"mountPrefix,omitempty"`
	// Timeout bounds every call, as a Go duration ("10s").
	Timeout string `json:"timeout,omitempty"`
}

const (
	// DefaultMountPrefix keeps per-tenant mounts apart from Vault's own (sys, auth, secret…).
	DefaultMountPrefix = "kmsgate-"
	DefaultTimeout     = 10 * time.Second
	// tokenFileCheckEvery bounds how often the token file is stat'ed.
	tokenFileCheckEvery = 5 * time.Second
)

// Provider is one configured vault provider.
type Provider struct {
	providers.Base
	client      *api.Client
	mountPrefix string
	timeout     time.Duration
	log         *slog.Logger
	cache       *jwkcache.Cache

	mountsMu sync.Mutex
	mounts   map[string]bool // mounts known to exist

	tok tokenState

	stop    context.CancelFunc
	stopped chan struct{}
}

// New builds the provider and starts the token renewer. It fails only on configuration errors:
// an unreachable Vault or an unreadable token file shows up in Health. The standard VAULT_CACERT /
// VAULT_CLIENT_CERT environment variables configure TLS, as for the vault CLI.
func New(ctx context.Context, cfg providers.Config, logger *slog.Logger) (*Provider, error) {
	var c Config
	if err := providers.DecodeStrict(cfg, &c); err != nil {
		return nil, err
	}
	bad := cfg.Errorf
	if c.VaultURL == "" {
		return nil, bad("vaultUrl is required")
	}
	if (c.VaultToken == "") == (c.VaultTokenFile == "") {
		return nil, bad("exactly one of vaultToken and vaultTokenFile is required")
	}
	timeout, err := providers.ParseTimeout(c.Timeout, DefaultTimeout)
	if err != nil {
		return nil, bad("%v", err)
	}
	prefix := DefaultMountPrefix
	if c.MountPrefix != nil {
		prefix = strings.Trim(*c.MountPrefix, " ")
		if strings.HasPrefix(prefix, "/") || strings.Contains(prefix, "//") || strings.ContainsAny(prefix, " ?#%") {
			return nil, bad("mountPrefix %q is not a usable Vault path prefix", prefix)
		}
	}
	vc := api.DefaultConfig()
	if vc.Error != nil {
		return nil, bad("vault client configuration from environment: %v", vc.Error)
	}
	vc.Address = strings.TrimRight(c.VaultURL, "/")
	vc.Timeout = timeout
	// Retries with Vault's 1-second waits would hold a signing request far beyond its deadline;
	// the gateway reports failures to its callers instead.
	vc.MaxRetries = 0
	if tr, ok := vc.HttpClient.Transport.(*http.Transport); ok {
		tr.MaxIdleConnsPerHost = 64
	}
	client, err := api.NewClient(vc)
	if err != nil {
		return nil, bad("vault client: %v", err)
	}
	client.ClearToken() // never fall back to an ambient VAULT_TOKEN
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	p := &Provider{Base: providers.NewBase(providers.TypeVault, cfg.ID, cfg.Description), client: client, mountPrefix: prefix, timeout: timeout,
		log: logger.With("provider", cfg.ID, "type", providers.TypeVault), cache: jwkcache.New(),
		mounts: map[string]bool{}, stopped: make(chan struct{})}
	p.tok.file, p.tok.checkEvery = c.VaultTokenFile, tokenFileCheckEvery
	if c.VaultToken != "" {
		client.SetToken(c.VaultToken)
	} else {
		p.refreshTokenFile(true)
	}
	rctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	p.stop = cancel
	go p.renewLoop(rctx)
	return p, nil
}

// Capabilities: import is off because Vault BYOK needs the key wrapped with Vault's wrapping key.
func (p *Provider) Capabilities() providers.Capabilities {
	return providers.Capabilities{CanCreate: true, CanImport: false, CanDelete: true, CanSignDigest: true,
		CanSignMessage: true, SupportedAlgs: []string{providers.ES256}, DefaultAlg: providers.ES256}
}

// Close stops the token renewer.
func (p *Provider) Close() error {
	p.stop()
	<-p.stopped
	return nil
}

func (p *Provider) fail(kind errs.Kind, op, msg string, cause error) *errs.Error {
	return &errs.Error{Kind: kind, Provider: p.ID(), Op: op, Msg: msg, Err: cause}
}

// locate returns the mount and key name of a reference (ExternalID "mount/key", else derived).
func (p *Provider) locate(ref providers.KeyRef) (mount, key string, err error) {
	if ref.ExternalID != "" {
		if m, k, ok := splitExternalID(ref.ExternalID); ok {
			return m, k, nil
		}
		return "", "", p.fail(errs.BadInput, "locate", fmt.Sprintf("external id %q is not mount/key", ref.ExternalID), nil)
	}
	return p.names(providers.KeySpec{Tenant: ref.Tenant, KID: ref.KID})
}

func (p *Provider) names(spec providers.KeySpec) (mount, key string, err error) {
	if spec.Tenant == "" || spec.KID == "" {
		return "", "", p.fail(errs.BadInput, "locate", "tenant and kid are required", nil)
	}
	mount, key = mountFor(p.mountPrefix, spec.Tenant), encodeName(spec.KID)
	if spec.ExternalID != "" {
		if !providers.ValidHint(spec.ExternalID) {
			return "", "", p.fail(errs.BadInput, "locate", "invalid key id hint", nil)
		}
		// A hinted key is named after the hint. The NUL prefix encodes to "_00", which no kid can
		// produce (kids never hold control characters), so hinted and kid-named keys never meet.
		key = encodeName("\x00" + spec.ExternalID)
	}
	if len(mount) > maxEncodedName || len(key) > maxEncodedName {
		return "", "", p.fail(errs.BadInput, "locate", "tenant or kid is too long for a Vault path", nil)
	}
	return mount, key, nil
}

// ExternalIDFor implements providers.Namer: "mount/key" of the key a hinted Generate creates.
func (p *Provider) ExternalIDFor(spec providers.KeySpec) (string, error) {
	if spec.ExternalID == "" {
		return "", nil
	}
	mount, key, err := p.names(spec)
	if err != nil {
		return "", err
	}
	return mount + "/" + key, nil
}

// vaultErr is a Vault error reduced to what classification needs.
func statusOf(err error) (int, string) {
	var re *api.ResponseError
	if errors.As(err, &re) {
		return re.StatusCode, strings.Join(re.Errors, "; ")
	}
	return 0, ""
}

// classify maps a Vault error to a provider error. Vault's messages name paths and keys, never
// the token, so they are safe to keep.
func (p *Provider) classify(op string, err error) error {
	if err == nil {
		return nil
	}
	status, msg := statusOf(err)
	lmsg := strings.ToLower(msg)
	switch {
	case status == 0 && (errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled)):
		return p.fail(errs.Unavailable, op, "vault did not answer in time", err)
	case status == 0:
		return p.fail(errs.Unavailable, op, "vault unreachable", err)
	case status == http.StatusNotFound, status == http.StatusBadRequest && strings.Contains(lmsg, "not found"),
		status == http.StatusBadRequest && strings.Contains(lmsg, "no existing key"):
		return p.fail(errs.NotFound, op, "key not found in vault", err)
	case status == http.StatusForbidden:
		return p.fail(errs.Forbidden, op, "vault denied the request (token expired or revoked, or policy): "+msg, err)
	case status == http.StatusTooManyRequests:
		e := p.fail(errs.Throttled, op, "vault rate limit reached", err)
		e.RetryAfter = time.Second
		return e
	case status == http.StatusBadRequest:
		return p.fail(errs.BadInput, op, "vault rejected the request: "+msg, err)
	case status == http.StatusServiceUnavailable || status == http.StatusBadGateway || status == http.StatusGatewayTimeout:
		return p.fail(errs.Unavailable, op, fmt.Sprintf("vault unavailable (%d): %s", status, msg), err)
	}
	return p.fail(errs.Internal, op, fmt.Sprintf("vault answered %d: %s", status, msg), err)
}

// ensureMount creates the tenant's transit mount once per provider. Answers meaning "already
// mounted" count as success; other failures (a token that may not mount) are only logged, because
// an operator may have created the mount beforehand and the operation itself will tell.
func (p *Provider) ensureMount(ctx context.Context, mount string) error {
	p.mountsMu.Lock()
	known := p.mounts[mount]
	p.mountsMu.Unlock()
	if known {
		return nil
	}
	err := p.client.Sys().MountWithContext(ctx, mount, &api.MountInput{Type: "transit",
		Description: "kmsgate keys for one tenant"})
	if err != nil {
		status, msg := statusOf(err)
		lmsg := strings.ToLower(msg)
		already := status == http.StatusConflict || (status == http.StatusBadRequest &&
			(strings.Contains(lmsg, "already in use") || strings.Contains(lmsg, "existing mount") || strings.Contains(lmsg, "already mounted")))
		if !already {
			if status == 0 {
				return p.classify("mount", err)
			}
			p.log.Warn("could not create transit mount; assuming it exists", "mount", mount, "error", msg)
			return nil
		}
	}
	p.mountsMu.Lock()
	p.mounts[mount] = true
	p.mountsMu.Unlock()
	return nil
}

// withMount runs fn and, when Vault answers 404 (the mount is missing: first use, or Vault was
// rebuilt), creates the mount and runs fn once more.
func (p *Provider) withMount(ctx context.Context, mount string, fn func() error) error {
	err := fn()
	if status, _ := statusOf(err); status != http.StatusNotFound {
		return err
	}
	p.mountsMu.Lock()
	delete(p.mounts, mount)
	p.mountsMu.Unlock()
	if merr := p.ensureMount(ctx, mount); merr != nil {
		return err
	}
	return fn()
}

func (p *Provider) Generate(ctx context.Context, spec providers.KeySpec) (providers.KeyRef, error) {
	const op = "generate"
	mount, key, err := p.names(spec)
	if err != nil {
		return providers.KeyRef{}, err
	}
	p.refreshTokenFile(false)
	ctx, cancel := context.WithTimeout(ctx, p.timeout)
	defer cancel()
	if err := p.ensureMount(ctx, mount); err != nil {
		return providers.KeyRef{}, err
	}
	// Transit's create is an upsert that returns an existing key unchanged; refuse instead, so a
	// stale key (a restored database, a reused kid) is never silently shared.
	resp, err := p.client.Logical().ReadRawWithContext(ctx, mount+"/keys/"+key)
	if resp != nil {
		resp.Body.Close()
	}
	if err == nil {
		return providers.KeyRef{}, p.fail(errs.Conflict, op, "a vault key named "+mount+"/"+key+" already exists", nil)
	}
	if status, _ := statusOf(err); status != http.StatusNotFound {
		return providers.KeyRef{}, p.classify(op, err)
	}
	err = p.withMount(ctx, mount, func() error {
		_, err := p.client.Logical().WriteWithContext(ctx, mount+"/keys/"+key,
			map[string]any{"type": "ecdsa-p256", "exportable": false, "allow_plaintext_backup": false})
		return err
	})
	if err != nil {
		return providers.KeyRef{}, p.classify(op, err)
	}
	ext := mount + "/" + key
	pub, err := p.readPublic(ctx, mount, key)
	if err != nil {
		return providers.KeyRef{}, err
	}
	p.cache.Put(ext, pub)
	return providers.KeyRef{ProviderID: p.ID(), Tenant: spec.Tenant, KID: spec.KID, Alg: providers.ES256,
		ExternalID: ext, Public: pub}, nil
}

// Import is refused: Vault's BYOK import needs the key wrapped with the mount's wrapping key
// (RSA-OAEP + AES-KWP), which EUDIPLO's plain import never did and which kmsgate does not do yet.
func (p *Provider) Import(context.Context, providers.KeySpec, *ecdsa.PrivateKey) (providers.KeyRef, error) {
	return providers.KeyRef{}, p.fail(errs.NotSupported, "import",
		"Vault Transit imports only keys wrapped with Vault's wrapping key (BYOK); create the key in Vault instead", nil)
}

// Delete allows deletion, then deletes; a key or mount that is already gone counts as deleted.
func (p *Provider) Delete(ctx context.Context, ref providers.KeyRef) error {
	const op = "delete"
	mount, key, err := p.locate(ref)
	if err != nil {
		return err
	}
	p.cache.Delete(mount + "/" + key)
	p.refreshTokenFile(false)
	ctx, cancel := context.WithTimeout(ctx, p.timeout)
	defer cancel()
	_, err = p.client.Logical().WriteWithContext(ctx, mount+"/keys/"+key+"/config", map[string]any{"deletion_allowed": true})
	if err == nil {
		_, err = p.client.Logical().DeleteWithContext(ctx, mount+"/keys/"+key)
	}
	if err = p.classify(op, err); errs.KindOf(err) == errs.NotFound {
		return nil
	}
	return err
}

func (p *Provider) PublicKey(ctx context.Context, ref providers.KeyRef) (*ecdsa.PublicKey, error) {
	mount, key, err := p.locate(ref)
	if err != nil {
		return nil, err
	}
	return p.cache.GetOrFetch(ctx, mount+"/"+key, func(ctx context.Context) (*ecdsa.PublicKey, error) {
		p.refreshTokenFile(false)
		ctx, cancel := context.WithTimeout(ctx, p.timeout)
		defer cancel()
		return p.readPublic(ctx, mount, key)
	})
}

// readPublic returns the public key of the key's latest version.
func (p *Provider) readPublic(ctx context.Context, mount, key string) (*ecdsa.PublicKey, error) {
	const op = "public key"
	var sec *api.Secret
	err := p.withMount(ctx, mount, func() error {
		resp, err := p.client.Logical().ReadRawWithContext(ctx, mount+"/keys/"+key)
		if resp != nil && resp.StatusCode == http.StatusNotFound && err != nil {
			return err // missing mount: withMount creates it and retries
		}
		sec, err = p.client.Logical().ParseRawResponseAndCloseBody(resp, err)
		return err
	})
	if err != nil {
		return nil, p.classify(op, err)
	}
	if sec == nil || sec.Data == nil {
		return nil, p.fail(errs.NotFound, op, "key not found in vault", nil)
	}
	var d struct {
		Type          string `json:"type"`
		LatestVersion int    `json:"latest_version"`
		Keys          map[string]struct {
			PublicKey string `json:"public_key"`
		} `json:"keys"`
	}
	if b, err := json.Marshal(sec.Data); err != nil || json.Unmarshal(b, &d) != nil {
		return nil, p.fail(errs.Internal, op, "unexpected key description from vault", err)
	}
	if d.Type != "ecdsa-p256" {
		return nil, p.fail(errs.NotSupported, op, fmt.Sprintf("vault key is %q, not ecdsa-p256", d.Type), nil)
	}
	v, ok := d.Keys[strconv.Itoa(d.LatestVersion)]
	if !ok {
		return nil, p.fail(errs.Internal, op, fmt.Sprintf("vault key has no version %d", d.LatestVersion), nil)
	}
	blk, _ := pem.Decode([]byte(v.PublicKey))
	if blk == nil {
		return nil, p.fail(errs.Internal, op, "vault public key is not PEM", nil)
	}
	k, err := x509.ParsePKIXPublicKey(blk.Bytes)
	pub, isEC := k.(*ecdsa.PublicKey)
	if err != nil || !isEC || pub.Curve != elliptic.P256() {
		return nil, p.fail(errs.Internal, op, "vault public key is not a P-256 key", err)
	}
	return pub, nil
}

func (p *Provider) SignMessage(ctx context.Context, ref providers.KeyRef, alg string, msg []byte) ([]byte, error) {
	return p.sign(ctx, "sign", ref, msg, false)
}

func (p *Provider) SignDigest(ctx context.Context, ref providers.KeyRef, alg string, digest []byte) ([]byte, error) {
	const op = "sign digest"
	if len(digest) != sha256.Size {
		return nil, p.fail(errs.BadInput, op, fmt.Sprintf("digest must be %d bytes, got %d", sha256.Size, len(digest)), nil)
	}
	return p.sign(ctx, op, ref, digest, true)
}

func (p *Provider) sign(ctx context.Context, op string, ref providers.KeyRef, input []byte, prehashed bool) ([]byte, error) {
	mount, key, err := p.locate(ref)
	if err != nil {
		return nil, err
	}
	p.refreshTokenFile(false)
	ctx, cancel := context.WithTimeout(ctx, p.timeout)
	defer cancel()
	var sec *api.Secret
	err = p.withMount(ctx, mount, func() error {
		var err error
		// The hash goes in the path; prehashed tells Vault the input already is its output.
		sec, err = p.client.Logical().WriteWithContext(ctx, mount+"/sign/"+key+"/sha2-256", map[string]any{
			"input": base64.StdEncoding.EncodeToString(input), "marshaling_algorithm": "jws", "prehashed": prehashed})
		return err
	})
	if err != nil {
		return nil, p.classify(op, err)
	}
	if sec == nil || sec.Data == nil {
		return nil, p.fail(errs.Internal, op, "vault returned no signature", nil)
	}
	s, _ := sec.Data["signature"].(string)
	version, raw, err := parseSignature(s)
	if err != nil {
		return nil, p.fail(errs.Internal, op, "vault returned an unusable signature", err)
	}
	p.log.Debug("signed", "mount", mount, "key", key, "key_version", version)
	return raw, nil
}

// parseSignature strips "vault:v<N>:" and decodes the JWS-marshalled r‖s, which must be exactly
// 64 bytes.
func parseSignature(s string) (version int, raw []byte, err error) {
	rest, ok := strings.CutPrefix(s, "vault:v")
	if !ok {
		return 0, nil, fmt.Errorf("signature does not start with vault:v")
	}
	vs, b64, ok := strings.Cut(rest, ":")
	if !ok {
		return 0, nil, fmt.Errorf("signature has no version separator")
	}
	version, err = strconv.Atoi(vs)
	if err != nil || version < 1 {
		return 0, nil, fmt.Errorf("signature version %q is not a positive integer", vs)
	}
	for _, enc := range []*base64.Encoding{base64.RawURLEncoding, base64.URLEncoding, base64.StdEncoding, base64.RawStdEncoding} {
		if raw, err = enc.DecodeString(b64); err == nil {
			break
		}
	}
	if err != nil {
		return 0, nil, fmt.Errorf("signature is not base64: %w", err)
	}
	if len(raw) != 64 {
		return 0, nil, fmt.Errorf("signature is %d bytes, want 64 (raw r||s; was marshaling_algorithm=jws ignored?)", len(raw))
	}
	return version, raw, nil
}

// Health reports Vault's own state (GET /v1/sys/health: sealed, standby… are down) and whether
// the token still works, so an expired or revoked token is visible before signing fails.
func (p *Provider) Health(ctx context.Context) providers.Health {
	start := time.Now()
	h := providers.Health{}
	defer func() { h.LatencyMs = time.Since(start).Milliseconds() }()
	ctx, cancel := context.WithTimeout(ctx, p.timeout)
	defer cancel()
	resp, err := p.client.Logical().ReadRawWithContext(ctx, "sys/health")
	if resp != nil {
		resp.Body.Close()
	}
	status := 0
	if resp != nil {
		status = resp.StatusCode
	}
	if s, _ := statusOf(err); s != 0 {
		status = s
	}
	if status < 200 || status > 299 {
		if status == 0 {
			// The network error names Vault's address: it goes to the log, the health answer only
			// says what is wrong.
			p.log.Warn("vault health probe failed", "provider", p.ID(), "error", errString(err))
			h.Error = "vault unreachable"
		} else {
			h.Error = fmt.Sprintf("vault is not serving requests: %s (sys/health answered %d)", healthState(status), status)
		}
		return h
	}
	if ferr := p.tokenFileError(); ferr != "" {
		h.Error = ferr
		return h
	}
	if _, err := p.client.Auth().Token().LookupSelfWithContext(ctx); err != nil {
		if s, msg := statusOf(err); s == http.StatusForbidden || s == http.StatusUnauthorized {
			p.log.Warn("vault token lookup refused", "provider", p.ID(), "error", msg)
			h.Error = "vault token expired or revoked"
		} else {
			p.log.Warn("vault token lookup failed", "provider", p.ID(), "error", errString(err))
			h.Error = "vault token lookup failed"
		}
		return h
	}
	if rerr := p.renewError(); rerr != "" {
		h.Error = rerr
		return h
	}
	h.OK = true
	return h
}

func errString(err error) string {
	if err == nil {
		return "no answer"
	}
	if _, msg := statusOf(err); msg != "" {
		return msg
	}
	return err.Error()
}

func healthState(status int) string {
	switch status {
	case 429:
		return "standby node"
	case 472:
		return "disaster-recovery secondary"
	case 473:
		return "performance standby"
	case 474:
		return "standby node that cannot reach the active node"
	case 501:
		return "not initialized"
	case 503:
		return "sealed"
	case 530:
		return "removed from its cluster"
	}
	return "unhealthy"
}

// SecretFields lists the config fields (JSON names) that hold secrets, for redacted output.
func SecretFields() []string { return providers.SecretFields(Config{}) }
