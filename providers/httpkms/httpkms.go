// Package httpkms is the "http" provider: a remote KMS that speaks EUDIPLO's remote-KMS contract
// (eudiplo-compat.md §6), optionally with kmsgate's "digest" extension. Everything the remote
// returns is validated (the public JWK is a P-256 point, signatures are exactly 64 bytes and
// verify), because a lenient client is how a broken remote corrupts JWS and certificates.
package httpkms

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/sha256"
	"encoding/base64"
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
	p := &Provider{Base: providers.NewBase(providers.TypeHTTP, cfg.ID, cfg.Description), s: s, client: &http.Client{Transport: tr},
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
	body, err := p.call(ctx, op, http.MethodPost, p.s.keysURL, map[string]string{"kid": spec.KID, "alg": providers.ES256}, false)
	if err != nil {
		return providers.KeyRef{}, err
	}
	pub, err := p.parsePublic(op, body)
	if err != nil {
		return providers.KeyRef{}, err
	}
	p.cache.Put(spec.KID, pub)
	return providers.KeyRef{ProviderID: p.ID(), Tenant: spec.Tenant, KID: spec.KID, Alg: providers.ES256,
		ExternalID: spec.KID, Public: pub}, nil
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
	jwk, err := keyutil.PrivateJWK(priv, spec.KID, providers.ES256)
	if err != nil {
		return providers.KeyRef{}, p.fail(errs.BadInput, op, "private key is not P-256", err)
	}
	body, err := p.call(ctx, op, http.MethodPost, p.keyURL(spec.KID, "/import"),
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
	p.cache.Put(spec.KID, pub)
	return providers.KeyRef{ProviderID: p.ID(), Tenant: spec.Tenant, KID: spec.KID, Alg: providers.ES256,
		ExternalID: spec.KID, Public: pub}, nil
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
		h.Error = errs.PublicMessage(err)
		var pe *errs.Error
		if errors.As(err, &pe) && pe.Err != nil && pe.Kind == errs.Unavailable {
			h.Error += ": " + pe.Err.Error()
		}
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
				return nil, p.fail(errs.Unavailable, op, "could not obtain an OAuth2 access token", err)
			}
			select {
			case <-ctx.Done():
			case <-time.After(p.retryBackoff[attempt]):
			}
			continue
		}
		if err != nil {
			if errors.Is(err, errTokenEndpoint) {
				return nil, p.fail(errs.Unavailable, op, "could not obtain an OAuth2 access token", err)
			}
			return nil, p.fail(errs.Unavailable, op, "remote KMS unreachable", err)
		}
		if status >= 200 && status < 300 {
			return body, nil
		}
		return nil, p.statusError(op, status, hdr, body)
	}
}

var errTokenEndpoint = errors.New("oauth2 token endpoint")

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

func (p *Provider) statusError(op string, status int, hdr http.Header, body []byte) error {
	msg := fmt.Sprintf("remote KMS answered %d", status)
	if ex := excerpt(body); ex != "" {
		msg += ": " + ex
	}
	kind := errs.Internal
	switch {
	case status == http.StatusNotFound && op == "import",
		(status == http.StatusMethodNotAllowed || status == http.StatusNotImplemented) && op == "import":
		kind = errs.NotSupported
	case status == http.StatusNotFound:
		kind = errs.NotFound
	case status == http.StatusConflict:
		kind = errs.Conflict
	case status == http.StatusBadRequest || status == http.StatusUnprocessableEntity:
		kind = errs.BadInput
	case status == http.StatusUnauthorized || status == http.StatusForbidden:
		kind = errs.Forbidden
		msg += " (check the provider's credentials)"
	case status == http.StatusTooManyRequests:
		e := p.fail(errs.Throttled, op, msg, nil)
		e.RetryAfter = retryAfter(hdr, time.Second)
		return e
	case status == http.StatusServiceUnavailable || status == http.StatusBadGateway || status == http.StatusGatewayTimeout:
		e := p.fail(errs.Unavailable, op, msg, nil)
		e.RetryAfter = retryAfter(hdr, 0)
		return e
	}
	return p.fail(kind, op, msg, nil)
}

// excerpt returns the remote's {"error": "..."} message or the start of the body, truncated so a
// large or hostile body never ends up whole in logs and API errors.
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
	if resp.StatusCode != http.StatusOK {
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
