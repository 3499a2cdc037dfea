package keychain

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/uuid"

	"github.com/kmsgate/kmsgate/appliance/store"
)

// Rotation across replicas. Every replica runs the scheduler; before it creates a key for a due
// chain it claims the chain's lease record in a store transaction (only when the record is absent,
// expired or already its own). The lease keeps the other replicas from generating keys for the
// same chain at the same time; the compare-and-swap write of the chain (occ.go) is what makes the
// rotation happen exactly once even if a lease expired under a slow holder. A replica that dies
// mid-rotation leaves only the lease, which expires (its half-made key is an open intent the
// key-intent sweep deletes), and the next replica whose scheduler finds the chain due rotates it.

// prefixLease namespaces rotation leases: rotlease/<tenant>\x00<id>.
const prefixLease = "rotlease/"

func leaseKey(tenant, id string) string { return prefixLease + tenant + "\x00" + id }

// Scheduler defaults.
const (
	// DefaultRotationWorkers bounds concurrent scheduled rotations per replica, so a thousand
	// chains falling due together do not open a thousand key generations on the HSM at once.
	DefaultRotationWorkers = 4
	// DefaultRotationLease is how long a replica owns a chain's rotation. A rotation is abandoned
	// at half of it, so a live holder never works on past its lease.
	DefaultRotationLease = 5 * time.Minute
)

// rotationLease is the stored lease record.
type rotationLease struct {
	Owner   string    `json:"owner"`
	Expires time.Time `json:"expires"`
}

type rotationConfig struct {
	owner   string
	workers int
	ttl     time.Duration
}

func newRotationConfig(c Config) rotationConfig {
	r := rotationConfig{owner: c.Instance, workers: c.RotationWorkers, ttl: c.RotationLease}
	if r.owner == "" {
		r.owner = uuid.NewString()
	}
	if r.workers <= 0 {
		r.workers = DefaultRotationWorkers
	}
	if r.ttl <= 0 {
		r.ttl = DefaultRotationLease
	}
	return r
}

// claimLease takes the rotation lease of a chain for this replica. It answers false when another
// replica holds an unexpired lease.
func (s *Service) claimLease(ctx context.Context, tenant, id string) (bool, error) {
	ts, ok := s.st.(txStore)
	if !ok {
		return true, nil // a store without transactions serves one process only
	}
	now := s.now()
	claimed := false
	err := ts.Update(ctx, func(tx *store.Txn) error {
		claimed = false // the transaction may re-run
		var l rotationLease
		err := tx.Get(leaseKey(tenant, id), &l)
		switch {
		case err == nil:
			if l.Owner != s.rot.owner && now.Before(l.Expires) {
				return nil
			}
		case !errors.Is(err, store.ErrNotFound):
			return err
		}
		claimed = true
		return tx.Put(leaseKey(tenant, id), rotationLease{Owner: s.rot.owner, Expires: now.Add(s.rot.ttl)})
	})
	return claimed, err
}

// releaseLease deletes the lease if this replica still holds it, detached from the scheduler's
// context so a cancelled pass does not keep the chain blocked until expiry.
func (s *Service) releaseLease(tenant, id string) {
	ts, ok := s.st.(txStore)
	if !ok {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	err := ts.Update(ctx, func(tx *store.Txn) error {
		var l rotationLease
		if err := tx.Get(leaseKey(tenant, id), &l); err != nil {
			if errors.Is(err, store.ErrNotFound) {
				return nil
			}
			return err
		}
		if l.Owner != s.rot.owner {
			return nil // expired and taken over
		}
		return tx.Delete(leaseKey(tenant, id))
	})
	if err != nil {
		s.log.Warn("rotation scheduler: could not release a rotation lease (it expires on its own)",
			"tenant", tenant, "chain", id, "error", err)
	}
}

// Tick runs one scheduler pass: retries failed tenant bootstraps, then rotates due chains and
// deletes expired previous keys with a bounded pool of workers, each chain under its lease.
// Errors are logged per chain and never stop the pass. It returns the number of rotations this
// replica made.
func (s *Service) Tick(ctx context.Context) int {
	s.RetryBootstraps(ctx)
	chains, err := s.list(ctx, prefixChain)
	if err != nil {
		s.log.Error("rotation scheduler: list key chains", "error", err)
		return 0
	}
	var rotated atomic.Int64
	jobs := make(chan *Chain)
	var wg sync.WaitGroup
	for range s.rot.workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for c := range jobs {
				if s.tend(ctx, c) {
					rotated.Add(1)
				}
			}
		}()
	}
feed:
	for _, c := range chains {
		now := s.now()
		next, ok := c.nextRotation()
		if !(ok && !now.Before(next)) && !c.hasExpired(now) {
			continue
		}
		select {
		case jobs <- c:
		case <-ctx.Done():
			break feed
		}
	}
	close(jobs)
	wg.Wait()
	return int(rotated.Load())
}

// tend rotates c if it is due and deletes its expired previous keys, under its lease. It reports
// whether this replica rotated the chain.
func (s *Service) tend(ctx context.Context, c *Chain) bool {
	claimed, err := s.claimLease(ctx, c.Tenant, c.ID)
	if err != nil {
		s.log.Error("rotation scheduler: could not claim a rotation lease", "tenant", c.Tenant, "chain", c.ID, "error", err)
		return false
	}
	if !claimed {
		return false // another replica is on it
	}
	defer s.releaseLease(c.Tenant, c.ID)
	ctx, cancel := context.WithTimeout(ctx, s.rot.ttl/2)
	defer cancel()
	done, err := s.rotateIfDue(ctx, c.Tenant, c.ID)
	switch {
	case err != nil:
		s.log.Error("rotation scheduler: rotation failed", "tenant", c.Tenant, "chain", c.ID, "error", err)
	case done:
		s.log.Info("rotation scheduler: rotated key chain", "tenant", c.Tenant, "chain", c.ID)
	}
	if !done && c.hasExpired(s.now()) {
		if err := s.expirePrevious(ctx, c.Tenant, c.ID); err != nil {
			s.log.Warn("rotation scheduler: could not delete an expired previous key", "tenant", c.Tenant,
				"chain", c.ID, "error", err)
		}
	}
	return done
}
