package appliance

import (
	"context"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// DefaultKeyIntentMaxAge is the age after which a key-create intent counts as abandoned. It must
// exceed the longest create: a key-chain create makes up to two keys and two certificates, each
// bounded by its provider's timeout (10s by default), plus store writes. Only an older intent is
// swept, so a create in flight in another process on the same store is never touched.
const DefaultKeyIntentMaxAge = 2 * time.Minute

// startupSweepTimeout bounds the start-up sweep, so an unreachable backend cannot hold the
// listener back; what is left is retried by the periodic sweep.
const startupSweepTimeout = time.Minute

func (o Options) keyIntentMaxAge() time.Duration {
	if o.KeyIntentMaxAge <= 0 {
		return DefaultKeyIntentMaxAge
	}
	return o.KeyIntentMaxAge
}

func newIntentsSwept() *prometheus.CounterVec {
	return prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "kmsgate_key_intents_swept_total",
		Help: "Abandoned key-create intents resolved by the sweep, by provider type and result " +
			"(deleted, kept, unresolved, error).",
	}, []string{"provider_type", "result"})
}

// sweepKeyIntents deletes the backend keys that crashed creates left behind (intents older than
// the maximum age) and reports how many intents it resolved.
func (a *Appliance) sweepKeyIntents(ctx context.Context) {
	n, err := a.keys.Lifecycle().Sweep(ctx, a.registry, a.opts.keyIntentMaxAge(), func(typ, res string) {
		a.intentsSwept.WithLabelValues(typ, res).Inc()
	})
	if err != nil {
		a.log.Warn("key intent sweep failed", "error", err)
	}
	if n > 0 {
		a.log.Info("key intent sweep finished", "intents", n)
	}
}

// intentSweepLoop sweeps once at start-up (before the listener opens) and then every maximum age,
// so intents a crashed peer process left on a shared store are resolved too.
func (a *Appliance) intentSweepLoop(ctx context.Context) {
	every := a.opts.keyIntentMaxAge()
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			a.sweepKeyIntents(ctx)
		}
	}
}

func (a *Appliance) startupSweep(ctx context.Context) {
	sctx, cancel := context.WithTimeout(ctx, startupSweepTimeout)
	defer cancel()
	a.sweepKeyIntents(sctx)
}
