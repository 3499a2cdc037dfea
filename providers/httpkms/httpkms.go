// Package httpkms is the "http" provider: a remote KMS that speaks EUDIPLO's remote-KMS contract
// (POST /keys, POST /keys/{kid}/sign, POST /keys/{kid}/import, DELETE /keys/{kid},
// GET /health), optionally with kmsgate's "digest" extension. Everything the remote
// returns is validated (the public JWK is a P-256 point, signatures are exactly 64 bytes and
// verify), because a lenient client is how a broken remote corrupts JWS and certificates.
package httpkms

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/kmsgate/kmsgate/internal/errs"
	"github.com/kmsgate/kmsgate/internal/keyutil"
	"github.com/kmsgate/kmsgate/providers"
	"github.com/kmsgate/kmsgate/providers/jwkcache"
)

const (
	maxBody       = 1 << 20
	maxErrExcerpt = 200
	// remoteNamePrefix marks the tenant-scoped names this provider gives keys on the remote.
	remoteNamePrefix = "t-"
	// ExtensionDigest is the health-response extension that lets SignDigest send a digest.
	ExtensionDigest = "digest"
)

// Provider is one configured http provider.
type Provider struct {
	providers.Base
	s      *settings
	client *http.Client
	log    *slog.Logger
	cache  *jwkcache.Cache
	digest atomic.Bool
	tokens *tokenSource
	// retryBackoff is the pause before retry n (1-based); bounded so a call never doubles its
	// timeout budget.
	retryBackoff []time.Duration
}

// New builds the provider. It fails only on configuration errors; an unreachable remote yields a
// provider whose Health says so. The digest extension is probed once here (best effort) and again
// on every health check.
func New(ctx context.Context, cfg providers.Config, logger *slog.Logger) (*Provider, error) {
	var c Config
	if err := providers.DecodeStrict(cfg, &c); err != nil {
		return nil, err
	}
	s, err := c.validate()
	if err != nil {
		return nil, fmt.Errorf("provider %q (type http): %w", cfg.ID, err)
	}
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.MaxIdleConnsPerHost = 64
	if s.tls != nil {
		tr.TLSClientConfig = s.tls
	}
	// A redirect would re-send the credential header and the body (a private JWK on import) to a
	// host nobody configured: the first response is final, and a 3xx is an error (remote_redirect).
	client := &http.Client{Transport: tr, CheckRedirect: func(*http.Request, []*http.Request) error {
		return http.ErrUseLastResponse
	}}
	p := &Provider{Base: providers.NewBase(providers.TypeHTTP, cfg.ID, cfg.Description), s: s, client: client,
		log: logger.With("provider", cfg.ID, "type", providers.TypeHTTP), cache: jwkcache.New(),
		retryBackoff: []time.Duration{100 * time.Millisecond, 300 * time.Millisecond}}
	if s.oauth != nil {
		p.tokens = &tokenSource{cfg: s.oauth, client: p.client, timeout: s.timeout}
	}
	p.digest.Store(s.digestFlag)
	pctx, cancel := context.WithTimeout(ctx, min(s.timeout, 3*time.Second))
	defer cancel()
	if h := p.Health(pctx); !h.OK {
		p.log.Warn("remote KMS not reachable at start-up", "error", h.Error)
	}
	return p, nil
}

// Capabilities: the contract has no digest signing, so CanSignDigest is true only when the
// remote advertised kmsgate's digest extension (or the config forces it).
func (p *Provider) Capabilities() providers.Capabilities {
	return providers.Capabilities{CanCreate: true, CanImport: p.s.canImport, CanDelete: true,
		CanSignDigest: p.digest.Load(), CanSignMessage: true,
		SupportedAlgs: []string{providers.ES256}, DefaultAlg: providers.ES256}
}

func (p *Provider) fail(kind errs.Kind, op, msg string, cause error) *errs.Error {
	return &errs.Error{Kind: kind, Provider: p.ID(), Op: op, Msg: msg, Err: cause}
}

// RemoteName is the name a tenant's key gets on the remote KMS. The remote contract has no
// tenant, so the raw kid would put every tenant in one namespace (one tenant could then detect,
// overwrite or delete another's key, and key-chain kids are public in JWS headers). The name is a
// hash of the length-prefixed tenant and the kid: it cannot collide across tenants, reveals
// neither to the remote, and is plain ASCII that any remote accepts as a kid. It is deterministic,
// so a forced re-import of the same tenant and kid overwrites in place, as the contract expects.
func RemoteName(tenant, kid string) string {
	h := sha256.New()
	var n [8]byte
	binary.BigEndian.PutUint64(n[:], uint64(len(tenant)))
	h.Write(n[:])
	h.Write([]byte(tenant))
	h.Write([]byte(kid))
	sum := h.Sum(nil)
	return remoteNamePrefix + hex.EncodeToString(sum[:20])
}

// ExternalIDFor implements providers.Namer: the remote name a Generate or Import of spec uses.
func (p *Provider) ExternalIDFor(spec providers.KeySpec) (string, error) {
	if spec.ExternalID == "" {
		return "", nil
	}
	return p.nameFor(spec)
}

// nameFor is the remote name of a new key. It stays RemoteName(tenant, kid) with or without an
// identity hint, so that a forced re-import overwrites in place as the contract expects: it is
// already known before the create, which is all a sweep needs (the appliance never deletes a
// predicted name that a stored reference still uses).
func (p *Provider) nameFor(spec providers.KeySpec) (string, error) {
	if spec.ExternalID != "" && !providers.ValidHint(spec.ExternalID) {
		return "", p.fail(errs.BadInput, "generate", "invalid key id hint", nil)
	}
	return RemoteName(spec.Tenant, spec.KID), nil
}

// remoteID is the remote name of a stored key. Keys created before names were tenant-scoped
// carry the raw kid as ExternalID, or none at all: they keep that name.
func remoteID(ref providers.KeyRef) string {
	if ref.ExternalID != "" {
		return ref.ExternalID
	}
	return ref.KID
}

// keyURL percent-encodes the kid as one path segment; "." and ".." are escaped too, because
// PathEscape leaves them alone and servers would resolve them as dot-segments.
func (p *Provider) keyURL(kid, suffix string) string {
	seg := url.PathEscape(kid)
	if kid == "." || kid == ".." {
		seg = strings.ReplaceAll(kid, ".", "%2E")
	}
	return p.s.keysURL + "/" + seg + suffix
}

type jwkResponse struct {
	PublicJWK *keyutil.JWK `json:"publicJwk"`
}

func (p *Provider) parsePublic(op string, body []byte) (*ecdsa.PublicKey, error) {
	var r jwkResponse
	if err := json.Unmarshal(body, &r); err != nil || r.PublicJWK == nil {
		return nil, p.fail(errs.Internal, op, "remote response has no publicJwk", err)
	}
	// kid/alg on the remote JWK are advisory (EUDIPLO overwrites them); only the point matters.
	pub, err := keyutil.ParsePublicJWK(keyutil.JWK{Kty: r.PublicJWK.Kty, Crv: r.PublicJWK.Crv, X: r.PublicJWK.X, Y: r.PublicJWK.Y})
	if err != nil {
		return nil, p.fail(errs.Internal, op, "remote returned an invalid P-256 public key", err)
	}
	return pub, nil
}

// Generate is never retried: a lost response to a generate that did succeed would make the retry
// fail with a conflict or, worse, silently replace the key.
func (p *Provider) Generate(ctx context.Context, spec providers.KeySpec) (providers.KeyRef, error) {
	const op = "generate"
	if spec.KID == "" {
		return providers.KeyRef{}, p.fail(errs.BadInput, op, "kid is required", nil)
	}
	name, err := p.nameFor(spec)
	if err != nil {
		return providers.KeyRef{}, err
	}
	body, err := p.call(ctx, op, http.MethodPost, p.s.keysURL, map[string]string{"kid": name, "alg": providers.ES256}, false)
	if err != nil {
		return providers.KeyRef{}, err
	}
	pub, err := p.parsePublic(op, body)
	if err != nil {
		return providers.KeyRef{}, err
	}
	p.cache.Put(name, pub)
	return providers.KeyRef{ProviderID: p.ID(), Tenant: spec.Tenant, KID: spec.KID, Alg: providers.ES256,
		ExternalID: name, Public: pub}, nil
}

// Import is never retried (same reason as Generate) and checks the remote kept the key it got.
func (p *Provider) Import(ctx context.Context, spec providers.KeySpec, priv *ecdsa.PrivateKey) (providers.KeyRef, error) {
	const op = "import"
	if !p.s.canImport {
		return providers.KeyRef{}, p.fail(errs.NotSupported, op,
			"this http provider is configured without import (canImport:false)", nil)
	}
	if spec.KID == "" || priv == nil {
		return providers.KeyRef{}, p.fail(errs.BadInput, op, "kid and private key are required", nil)
	}
	name, err := p.nameFor(spec)
	if err != nil {
		return providers.KeyRef{}, err
	}
	jwk, err := keyutil.PrivateJWK(priv, name, providers.ES256)
	if err != nil {
		return providers.KeyRef{}, p.fail(errs.BadInput, op, "private key is not P-256", err)
	}
	body, err := p.call(ctx, op, http.MethodPost, p.keyURL(name, "/import"),
		map[string]any{"privateJwk": jwk, "alg": providers.ES256}, false)
	if err != nil {
		return providers.KeyRef{}, err
	}
	pub, err := p.parsePublic(op, body)
	if err != nil {
		return providers.KeyRef{}, err
	}
	if !keyutil.SameKey(pub, &priv.PublicKey) {
		return providers.KeyRef{}, p.fail(errs.Internal, op, "remote answered import with a different public key", nil)
	}
	p.cache.Put(name, pub)
	return providers.KeyRef{ProviderID: p.ID(), Tenant: spec.Tenant, KID: spec.KID, Alg: providers.ES256,
		ExternalID: name, Public: pub}, nil
}

// Delete treats 404 as success: the key is gone either way.
func (p *Provider) Delete(ctx context.Context, ref providers.KeyRef) error {
	const op = "delete"
	kid := remoteID(ref)
	p.cache.Delete(kid)
	if kid == "" {
		return nil
	}
	_, err := p.call(ctx, op, http.MethodDelete, p.keyURL(kid, ""), nil, true)
	if errs.KindOf(err) == errs.NotFound {
		return nil
	}
	return err
}

// PublicKey: the contract has no public-key endpoint, so this answers from the cache filled at
// generate/import, else from the reference the appliance persisted.
func (p *Provider) PublicKey(_ context.Context, ref providers.KeyRef) (*ecdsa.PublicKey, error) {
	if pub, ok := p.cache.Get(remoteID(ref)); ok {
		return pub, nil
	}
	if ref.Public != nil {
		return ref.Public, nil
	}
	return nil, p.fail(errs.NotSupported, "public key",
		"the http contract has no public-key endpoint and the reference holds no public key", nil)
}

func (p *Provider) SignMessage(ctx context.Context, ref providers.KeyRef, alg string, msg []byte) ([]byte, error) {
	const op = "sign"
	d := sha256.Sum256(msg)
	return p.sign(ctx, op, ref, map[string]string{"data": base64.StdEncoding.EncodeToString(msg), "alg": providers.ES256}, d[:])
}

func (p *Provider) SignDigest(ctx context.Context, ref providers.KeyRef, alg string, digest []byte) ([]byte, error) {
	const op = "sign digest"
	if !p.digest.Load() {
		return nil, p.fail(errs.NotSupported, op,
			"the remote KMS does not advertise kmsgate's digest extension; send the whole message", nil)
	}
	if len(digest) != sha256.Size {
		return nil, p.fail(errs.BadInput, op, fmt.Sprintf("digest must be %d bytes, got %d", sha256.Size, len(digest)), nil)
	}
	return p.sign(ctx, op, ref, map[string]string{"digest": base64.StdEncoding.EncodeToString(digest), "alg": providers.ES256}, digest)
}

func (p *Provider) sign(ctx context.Context, op string, ref providers.KeyRef, req map[string]string, digest []byte) ([]byte, error) {
	kid := remoteID(ref)
	if kid == "" {
		return nil, p.fail(errs.BadInput, op, "key reference has no kid", nil)
	}
	body, err := p.call(ctx, op, http.MethodPost, p.keyURL(kid, "/sign"), req, true)
	if err != nil {
		return nil, err
	}
	var r struct {
		Signature string `json:"signature"`
	}
	if err := json.Unmarshal(body, &r); err != nil || r.Signature == "" {
		return nil, p.fail(errs.Internal, op, "remote response has no signature", err)
	}
	sig, err := decodeB64(r.Signature)
	if err != nil {
		return nil, p.fail(errs.Internal, op, "remote signature is neither base64url nor base64", err)
	}
	if len(sig) != 64 {
		return nil, p.fail(errs.Internal, op,
			fmt.Sprintf("remote returned a %d-byte signature; the contract requires raw r||s (64 bytes), never DER", len(sig)), nil)
	}
	// A signature that does not verify would end up in a JWS or certificate nobody can verify;
	// checking costs far less than the round trip.
	if ref.Public != nil && !keyutil.VerifyRawDigest(ref.Public, digest, sig) {
		return nil, p.fail(errs.Internal, op, "remote signature does not verify with the key's public key", nil)
	}
	return sig, nil
}

func decodeB64(s string) ([]byte, error) {
	var firstErr error
	for _, enc := range []*base64.Encoding{base64.RawURLEncoding, base64.URLEncoding, base64.StdEncoding, base64.RawStdEncoding} {
		b, err := enc.DecodeString(s)
		if err == nil {
			return b, nil
		}
		if firstErr == nil {
			firstErr = err
		}
	}
	return nil, firstErr
}

// Health is any 2xx from healthPath; the body, when it is JSON, may also advertise extensions.
func (p *Provider) Health(ctx context.Context) providers.Health {
	start := time.Now()
	body, err := p.call(ctx, "health", http.MethodGet, p.s.healthURL, nil, true)
	h := providers.Health{LatencyMs: time.Since(start).Milliseconds()}
	if err != nil {
		// Health results are shown to tenants: the safe message only; call logged the details.
		h.Error = errs.PublicMessage(err)
		return h
	}
	var r struct {
		OK         *bool    `json:"ok"`
		Extensions []string `json:"extensions"`
	}
	if json.Unmarshal(body, &r) == nil {
		if r.OK != nil && !*r.OK {
			h.Error = "remote KMS reports ok:false"
			return h
		}
		has := false
		for _, e := range r.Extensions {
			has = has || e == ExtensionDigest
		}
		p.digest.Store(p.s.digestFlag || has)
	}
	h.OK = true
	return h
}

// Close releases idle connections.
func (p *Provider) Close() error {
	p.client.CloseIdleConnections()
	return nil
}

// call performs one logical operation: at most 1+len(retryBackoff) attempts when retryable (only
// on connection errors and 502/503/504), each bounded by the configured timeout.
func (p *Provider) call(ctx context.Context, op, method, target string, reqBody any, retryable bool) ([]byte, error) {
	var payload []byte
	if reqBody != nil {
		var err error
		if payload, err = json.Marshal(reqBody); err != nil {
			return nil, p.fail(errs.Internal, op, "encode request", err)
		}
	}
	authRetried := false
	for attempt := 0; ; attempt++ {
		status, hdr, body, err := p.once(ctx, method, target, payload)
		if err == nil && status == http.StatusUnauthorized && p.tokens != nil && !authRetried {
			// The cached OAuth2 token may have been revoked early: fetch a new one once.
			p.tokens.invalidate()
			authRetried = true
			attempt--
			continue
		}
		transient := err != nil || status == http.StatusBadGateway || status == http.StatusServiceUnavailable ||
			status == http.StatusGatewayTimeout
		if transient && retryable && attempt < len(p.retryBackoff) && ctx.Err() == nil {
			if errors.Is(err, errTokenEndpoint) {
				return nil, p.transportError(op, err)
			}
			select {
			case <-ctx.Done():
			case <-time.After(p.retryBackoff[attempt]):
			}
			continue
		}
		if err != nil {
			return nil, p.transportError(op, err)
		}
		if status >= 200 && status < 300 {
			return body, nil
		}
		return nil, p.statusError(op, status, hdr, body)
	}
}

var errTokenEndpoint = errors.New("oauth2 token endpoint")

// transportError classifies a call that got no HTTP answer. The cause (a *url.Error naming the
// remote's URL and address, or the token endpoint's status) is logged and kept as the wrapped
// cause for logs; the caller-safe message names neither.
func (p *Provider) transportError(op string, err error) error {
	p.log.Warn("remote KMS call failed", "op", op, "error", err)
	if errors.Is(err, errTokenEndpoint) {
		return p.fail(errs.Unavailable, op, "could not obtain an OAuth2 access token", err).WithCode("remote_auth_failed")
	}
	return p.fail(errs.Unavailable, op, "remote KMS unreachable", err).WithCode("remote_unreachable")
}

func (p *Provider) once(ctx context.Context, method, target string, payload []byte) (int, http.Header, []byte, error) {
	ctx, cancel := context.WithTimeout(ctx, p.s.timeout)
	defer cancel()
	var rd io.Reader
	if payload != nil {
		rd = bytes.NewReader(payload)
	}
	req, err := http.NewRequestWithContext(ctx, method, target, rd)
	if err != nil {
		return 0, nil, nil, err
	}
	if payload != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	req.Header.Set("Accept", "application/json")
	switch {
	case p.tokens != nil:
		tok, err := p.tokens.token(ctx)
		if err != nil {
			return 0, nil, nil, fmt.Errorf("%w: %w", errTokenEndpoint, err)
		}
		req.Header.Set("Authorization", "Bearer "+tok)
	case p.s.header != "":
		req.Header.Set(p.s.header, p.s.headerVal)
	}
	resp, err := p.client.Do(req)
	if err != nil {
		// url.Error carries the URL only (no headers), so it holds no credential.
		return 0, nil, nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxBody))
	if err != nil {
		return 0, nil, nil, fmt.Errorf("read response: %w", err)
	}
	return resp.StatusCode, resp.Header, body, nil
}

// statusError classifies a non-2xx answer. The remote's own text (a 409 naming a key, a 500 with
// internals) is logged for the operator and never put in the error: the caller gets a stable code
// and a fixed message that says only what the status means.
func (p *Provider) statusError(op string, status int, hdr http.Header, body []byte) error {
	var e *errs.Error
	switch {
	case status >= 300 && status < 400:
		e = p.fail(errs.Unavailable, op, fmt.Sprintf("remote KMS answered %d with a redirect, which is refused", status), nil).
			WithCode("remote_redirect")
	case (status == http.StatusNotFound || status == http.StatusMethodNotAllowed || status == http.StatusNotImplemented) &&
		op == "import":
		e = p.fail(errs.NotSupported, op, "the remote KMS does not support import", nil).WithCode("remote_import_not_supported")
	case status == http.StatusNotFound:
		e = p.fail(errs.NotFound, op, "the key does not exist on the remote KMS", nil).WithCode("remote_key_not_found")
	case status == http.StatusConflict:
		e = p.fail(errs.Conflict, op, "the remote KMS already holds a key under this name", nil).WithCode("remote_conflict")
	case status == http.StatusBadRequest || status == http.StatusUnprocessableEntity:
		e = p.fail(errs.BadInput, op, fmt.Sprintf("remote KMS rejected the request (%d)", status), nil).
			WithCode("remote_rejected")
	case status == http.StatusUnauthorized || status == http.StatusForbidden:
		e = p.fail(errs.Forbidden, op, fmt.Sprintf("remote KMS refused the provider's credentials (%d)", status), nil).
			WithCode("remote_auth_failed")
	case status == http.StatusTooManyRequests:
		e = p.fail(errs.Throttled, op, "remote KMS is throttling requests", nil).WithCode("remote_throttled")
		e.RetryAfter = retryAfter(hdr, time.Second)
	case status == http.StatusServiceUnavailable || status == http.StatusBadGateway || status == http.StatusGatewayTimeout:
		e = p.fail(errs.Unavailable, op, fmt.Sprintf("remote KMS unavailable (%d)", status), nil).WithCode("remote_unavailable")
		e.RetryAfter = retryAfter(hdr, 0)
	default:
		e = p.fail(errs.Internal, op, fmt.Sprintf("remote KMS answered %d", status), nil).WithCode("remote_error")
	}
	level := slog.LevelWarn
	if e.Kind == errs.NotFound || e.Kind == errs.Conflict {
		level = slog.LevelInfo // routine: a delete of a gone key, a duplicate kid
	}
	attrs := []any{"op", op, "remote_status", status, "code", e.Code}
	if ex := excerpt(body); ex != "" {
		attrs = append(attrs, "remote_error", ex)
	}
	if loc := hdr.Get("Location"); loc != "" && e.Code == "remote_redirect" {
		attrs = append(attrs, "location", excerpt([]byte(loc)))
	}
	p.log.Log(context.Background(), level, "remote KMS answered with an error", attrs...)
	return e
}

// excerpt returns the remote's {"error": "..."} message or the start of the body, truncated so a
// large or hostile body never ends up whole in the logs (the only place it goes).
func excerpt(body []byte) string {
	var e struct {
		Error string `json:"error"`
	}
	s := ""
	if json.Unmarshal(body, &e) == nil && e.Error != "" {
		s = e.Error
	} else {
		s = string(bytes.TrimSpace(body))
	}
	if len(s) > maxErrExcerpt {
		s = s[:maxErrExcerpt] + "…(truncated)"
	}
	q := strconv.QuoteToGraphic(s) // neutralises control characters (log injection)
	return q[1 : len(q)-1]
}

func retryAfter(h http.Header, def time.Duration) time.Duration {
	if v := h.Get("Retry-After"); v != "" {
		if n, err := strconv.Atoi(v); err == nil && n >= 0 {
			return time.Duration(n) * time.Second
		}
		if t, err := http.ParseTime(v); err == nil {
			if d := time.Until(t); d > 0 {
				return d
			}
		}
	}
	return def
}

// tokenSource fetches and caches OAuth2 client-credentials tokens until expires_in − 30 s.
type tokenSource struct {
	cfg     *AuthConfig
	client  *http.Client
	timeout time.Duration

	mu      sync.Mutex
	tok     string
	expires time.Time
}

func (ts *tokenSource) invalidate() {
	ts.mu.Lock()
	ts.tok = ""
	ts.mu.Unlock()
}

// token holds the lock across the fetch so that concurrent callers share one token request
// instead of stampeding the token endpoint.
func (ts *tokenSource) token(ctx context.Context) (string, error) {
	ts.mu.Lock()
	defer ts.mu.Unlock()
	if ts.tok != "" && time.Now().Before(ts.expires) {
		return ts.tok, nil
	}
	form := url.Values{"grant_type": {"client_credentials"}, "client_id": {ts.cfg.ClientID},
		"client_secret": {ts.cfg.ClientSecret}}
	if ts.cfg.Scope != "" {
		form.Set("scope", ts.cfg.Scope)
	}
	ctx, cancel := context.WithTimeout(ctx, ts.timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, ts.cfg.TokenURL, bytes.NewBufferString(form.Encode()))
	if err != nil {
		return "", err
	}
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	req.Header.Set("Accept", "application/json")
	resp, err := ts.client.Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, maxBody))
	// Any 2xx, as EUDIPLO's adapter takes it: EUDIPLO's own token endpoint (and kmsgate's at the
	// same path) answers 201.
	if resp.StatusCode < 200 || resp.StatusCode > 299 {
		// The body is not echoed: some servers reflect the submitted form, secret included.
		return "", fmt.Errorf("token endpoint answered %d", resp.StatusCode)
	}
	var r struct {
		AccessToken string          `json:"access_token"`
		TokenType   string          `json:"token_type"`
		ExpiresIn   json.RawMessage `json:"expires_in"`
	}
	if err := json.Unmarshal(body, &r); err != nil || r.AccessToken == "" {
		return "", errors.New("token endpoint response has no access_token")
	}
	exp := 3600 * time.Second
	if len(r.ExpiresIn) > 0 {
		var n json.Number
		if json.Unmarshal(r.ExpiresIn, &n) == nil {
			if f, err := n.Float64(); err == nil && f > 0 {
				exp = time.Duration(f) * time.Second
			}
		} else {
			var s string
			if json.Unmarshal(r.ExpiresIn, &s) == nil {
				if n, err := strconv.Atoi(s); err == nil && n > 0 {
					exp = time.Duration(n) * time.Second
				}
			}
		}
	}
	margin := 30 * time.Second
	if exp <= 2*margin {
		margin = exp / 2
	}
	ts.tok, ts.expires = r.AccessToken, time.Now().Add(exp-margin)
	return ts.tok, nil
}
