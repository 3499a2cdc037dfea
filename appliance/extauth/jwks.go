package extauth

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"sync"
	"time"

	jose "github.com/go-jose/go-jose/v4"
)

const (
	// maxJWKSBytes bounds a JWKS response: a real key set is a few KB, and an issuer (or whoever
	// answers in its place) must not make us buffer an unbounded body.
	maxJWKSBytes = 1 << 20
	// fetchTimeout bounds one JWKS fetch; a slow issuer only delays the tokens that need a refresh.
	fetchTimeout = 10 * time.Second
	// DefaultRefreshInterval is the least time between two fetches of one issuer's JWKS: tokens
	// with made-up kids must not turn kmsgate into a request amplifier against the issuer.
	DefaultRefreshInterval = 10 * time.Second
)

// keySet is one issuer's cached JWKS. It is fetched on first use and refreshed when a token names
// a kid it does not hold, at most once per interval, by one caller at a time.
type keySet struct {
	url      string
	client   *http.Client
	interval time.Duration
	now      func() time.Time

	// sem serialises refreshes (single flight): a waiter re-checks the cache after acquiring it,
	// so a burst of tokens with a new kid causes one fetch. A channel rather than a mutex so a
	// waiter can give up when its request is cancelled.
	sem chan struct{}

	mu      sync.RWMutex
	keys    []jose.JSONWebKey
	fetched time.Time // zero until the first fetch attempt
}

func newKeySet(url string, client *http.Client, interval time.Duration, now func() time.Time) *keySet {
	return &keySet{url: url, client: client, interval: interval, now: now, sem: make(chan struct{}, 1)}
}

// lookup returns the keys with the given kid ("" matches every key), refreshing the set when none
// is cached and the rate limit allows. errFetch wraps fetch failures for the log; the caller
// refuses the token either way.
func (k *keySet) lookup(ctx context.Context, kid string) ([]jose.JSONWebKey, error) {
	if ks := k.cached(kid); len(ks) > 0 {
		return ks, nil
	}
	select {
	case k.sem <- struct{}{}:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	defer func() { <-k.sem }()
	// Another caller may have refreshed while we waited.
	if ks := k.cached(kid); len(ks) > 0 {
		return ks, nil
	}
	k.mu.RLock()
	last := k.fetched
	k.mu.RUnlock()
	if !last.IsZero() && k.now().Sub(last) < k.interval {
		return nil, nil
	}
	k.mu.Lock()
	k.fetched = k.now()
	k.mu.Unlock()
	// The fetch outlives a cancelled caller: the waiters queued behind it want its result too.
	fctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), fetchTimeout)
	defer cancel()
	keys, err := k.fetch(fctx)
	if err != nil {
		// Keep the previous keys: an issuer outage must not revoke tokens signed with known keys.
		return nil, err
	}
	k.mu.Lock()
	k.keys = keys
	k.mu.Unlock()
	return k.cached(kid), nil
}

func (k *keySet) cached(kid string) []jose.JSONWebKey {
	k.mu.RLock()
	defer k.mu.RUnlock()
	var out []jose.JSONWebKey
	for _, key := range k.keys {
		if kid == "" || key.KeyID == kid {
			out = append(out, key)
		}
	}
	return out
}

var errFetch = errors.New("fetch JWKS")

func (k *keySet) fetch(ctx context.Context) ([]jose.JSONWebKey, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, k.url, nil)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", errFetch, err)
	}
	req.Header.Set("Accept", "application/json")
	resp, err := k.client.Do(req)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", errFetch, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, maxJWKSBytes))
		return nil, fmt.Errorf("%w: %s answered %d", errFetch, k.url, resp.StatusCode)
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxJWKSBytes+1))
	if err != nil {
		return nil, fmt.Errorf("%w: read body: %w", errFetch, err)
	}
	if len(body) > maxJWKSBytes {
		return nil, fmt.Errorf("%w: response larger than %d bytes", errFetch, maxJWKSBytes)
	}
	var set jose.JSONWebKeySet
	if err := json.Unmarshal(body, &set); err != nil {
		return nil, fmt.Errorf("%w: decode: %w", errFetch, err)
	}
	// Keep only public signature keys: a symmetric or private key in a JWKS is a misconfiguration
	// we refuse to verify with, and encryption keys are not for signatures.
	keys := set.Keys[:0]
	for _, key := range set.Keys {
		if key.Valid() && key.IsPublic() && key.Use != "enc" {
			keys = append(keys, key)
		}
	}
	return keys, nil
}

// newHTTPClient builds the JWKS client: bounded time, and redirects only within the same host so a
// compromised path cannot send us to fetch keys elsewhere.
func newHTTPClient() *http.Client {
	return &http.Client{
		Timeout: fetchTimeout,
		CheckRedirect: func(req *http.Request, via []*http.Request) error {
			if len(via) >= 3 {
				return errors.New("too many redirects")
			}
			if req.URL.Host != via[0].URL.Host || (via[0].URL.Scheme == "https" && req.URL.Scheme != "https") {
				return fmt.Errorf("redirect to another host or scheme (%s) refused", req.URL.Redacted())
			}
			return nil
		},
	}
}
