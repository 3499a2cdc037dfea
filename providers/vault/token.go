package vault

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"strings"
	"sync"
	"time"
)

// tokenState tracks the token file (re-read when it changes, e.g. when Vault Agent rewrites its
// sink) and the renewer's last problem. Token values never leave this file except into the
// Vault client.
type tokenState struct {
	file       string
	checkEvery time.Duration

	mu        sync.Mutex
	lastCheck time.Time
	modTime   time.Time
	size      int64
	fileErr   string
	renewErr  string
}

// refreshTokenFile re-reads the token file when its mtime or size changed, at most every
// checkEvery (force skips the rate limit). It is called before operations, so a rotated token is
// picked up without a restart.
func (p *Provider) refreshTokenFile(force bool) {
	t := &p.tok
	if t.file == "" {
		return
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	now := time.Now()
	if !force && now.Sub(t.lastCheck) < t.checkEvery {
		return
	}
	t.lastCheck = now
	st, err := os.Stat(t.file)
	if err != nil {
		t.fileErr = fmt.Sprintf("vault token file unreadable: %v", err)
		return
	}
	if !force && t.fileErr == "" && st.ModTime().Equal(t.modTime) && st.Size() == t.size {
		return
	}
	b, err := os.ReadFile(t.file)
	if err != nil {
		t.fileErr = fmt.Sprintf("vault token file unreadable: %v", err)
		return
	}
	tok := strings.TrimSpace(string(b))
	if tok == "" {
		t.fileErr = "vault token file " + t.file + " is empty"
		return
	}
	p.client.SetToken(tok)
	t.modTime, t.size, t.fileErr = st.ModTime(), st.Size(), ""
	if !force {
		p.log.Info("vault token file changed; using the new token", "file", t.file)
	}
}

func (p *Provider) tokenFileError() string {
	p.refreshTokenFile(false)
	p.tok.mu.Lock()
	defer p.tok.mu.Unlock()
	return p.tok.fileErr
}

func (p *Provider) renewError() string {
	p.tok.mu.Lock()
	defer p.tok.mu.Unlock()
	return p.tok.renewErr
}

func (p *Provider) setRenewError(s string) {
	p.tok.mu.Lock()
	p.tok.renewErr = s
	p.tok.mu.Unlock()
}

// renewLoop keeps a renewable token alive: it looks the token up, renews it once less than half
// of its creation TTL is left, and sleeps until the next such point. Non-renewable and root tokens
// are only re-checked, so Health learns about expiry.
func (p *Provider) renewLoop(ctx context.Context) {
	defer close(p.stopped)
	for {
		wait := p.renewOnce(ctx)
		select {
		case <-ctx.Done():
			return
		case <-time.After(wait):
		}
	}
}

func (p *Provider) renewOnce(ctx context.Context) time.Duration {
	const (
		minWait = 500 * time.Millisecond
		maxWait = 5 * time.Minute
		errWait = 5 * time.Second
	)
	clamp := func(d time.Duration) time.Duration { return min(max(d, minWait), maxWait) }
	p.refreshTokenFile(false)
	cctx, cancel := context.WithTimeout(ctx, p.timeout)
	defer cancel()
	sec, err := p.client.Auth().Token().LookupSelfWithContext(cctx)
	if err != nil {
		if ctx.Err() != nil {
			return minWait
		}
		if s, msg := statusOf(err); s == http.StatusForbidden || s == http.StatusUnauthorized {
			p.setRenewError("vault token expired or revoked: " + msg)
		}
		// Unreachable Vault is Health's business, not the token's.
		return errWait
	}
	ttl, _ := sec.TokenTTL()
	renewable, _ := sec.TokenIsRenewable()
	var creation time.Duration
	if n, ok := sec.Data["creation_ttl"].(json.Number); ok {
		if v, err := n.Int64(); err == nil {
			creation = time.Duration(v) * time.Second
		}
	}
	if ttl == 0 { // root or periodic-less non-expiring token
		p.setRenewError("")
		return maxWait
	}
	if !renewable {
		p.setRenewError("")
		return clamp(ttl / 2)
	}
	if creation == 0 {
		creation = ttl
	}
	if ttl > creation/2 {
		p.setRenewError("")
		return clamp(ttl - creation/2)
	}
	rs, err := p.client.Auth().Token().RenewSelfWithContext(cctx, int(creation/time.Second))
	if err != nil {
		_, msg := statusOf(err)
		if msg == "" {
			msg = err.Error()
		}
		p.setRenewError("vault token renewal failed: " + msg)
		p.log.Warn("vault token renewal failed", "error", msg)
		return clamp(min(errWait, ttl/4))
	}
	p.setRenewError("")
	newTTL := creation
	if rs != nil && rs.Auth != nil && rs.Auth.LeaseDuration > 0 {
		newTTL = time.Duration(rs.Auth.LeaseDuration) * time.Second
	}
	p.log.Debug("vault token renewed", "ttl", newTTL)
	return clamp(newTTL / 2)
}
