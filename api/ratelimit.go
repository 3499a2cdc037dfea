package api

import (
	"strconv"
	"sync"
	"time"

	"github.com/gofiber/fiber/v2"
	"golang.org/x/time/rate"
)

// RateLimits are per-credential request rates, scoped by tenant and credential. A rate <= 0 means
// no limit; a burst <= 0 means one request.
type RateLimits struct {
	// CreateRate bounds key and key-chain creation (generate, import, rotate) per second.
	CreateRate  float64
	CreateBurst int
	// SignRate bounds signing requests per second (off by default: signing is the product).
	SignRate  float64
	SignBurst int
}

type limiterKey struct{ tenant, credential string }

// limiterSet holds one token bucket per credential. Its size is bounded by the number of
// credentials that were busy recently: buckets that have refilled are dropped.
type limiterSet struct {
	limit rate.Limit
	burst int

	mu      sync.Mutex
	m       map[limiterKey]*rate.Limiter
	sweepAt int
}

// minSweep is the map size below which refilled buckets are not worth looking for.
const minSweep = 1024

func newLimiterSet(r float64, burst int) *limiterSet {
	if r <= 0 {
		return nil
	}
	return &limiterSet{limit: rate.Limit(r), burst: max(burst, 1), m: map[limiterKey]*rate.Limiter{}, sweepAt: minSweep}
}

// take spends one token of k's bucket, or returns how long until one is available.
func (l *limiterSet) take(k limiterKey, now time.Time) time.Duration {
	l.mu.Lock()
	lim := l.m[k]
	if lim == nil {
		if len(l.m) >= l.sweepAt {
			l.sweep(now)
		}
		lim = rate.NewLimiter(l.limit, l.burst)
		l.m[k] = lim
	}
	l.mu.Unlock()
	r := lim.ReserveN(now, 1)
	if d := r.DelayFrom(now); d > 0 {
		r.CancelAt(now)
		return d
	}
	return 0
}

// sweep drops buckets that are full again: a full bucket behaves exactly like a new one, so
// dropping it changes no answer. l.mu must be held.
func (l *limiterSet) sweep(now time.Time) {
	for k, lim := range l.m {
		if lim.TokensAt(now) >= float64(l.burst) {
			delete(l.m, k)
		}
	}
	l.sweepAt = max(minSweep, 2*len(l.m))
}

// limited prepends the rate limit of l to handlers, or returns them unchanged when l is off (so an
// unlimited route pays nothing).
func (s *Server) limited(l *limiterSet, handlers ...fiber.Handler) []fiber.Handler {
	if l == nil {
		return handlers
	}
	check := func(c *fiber.Ctx) error {
		p := principal(c)
		if p == nil {
			return c.Next()
		}
		if d := l.take(limiterKey{p.TenantID, p.CredentialID}, time.Now()); d > 0 {
			secs := int((d + time.Second - 1) / time.Second)
			c.Set(fiber.HeaderRetryAfter, strconv.Itoa(secs))
			return problem(fiber.StatusTooManyRequests, "rate_limited",
				"too many requests with this API key; retry after "+strconv.Itoa(secs)+" s")
		}
		return c.Next()
	}
	// The role check stays first, so a request that would be refused anyway spends no token.
	out := make([]fiber.Handler, 0, len(handlers)+1)
	out = append(out, handlers[:len(handlers)-1]...)
	return append(out, check, handlers[len(handlers)-1])
}
