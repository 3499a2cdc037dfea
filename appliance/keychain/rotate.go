package keychain

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/kmsgate/kmsgate/appliance/keys"
	"github.com/kmsgate/kmsgate/internal/errs"
	"github.com/kmsgate/kmsgate/providers"
)

// Rotate replaces the active key and certificate now (POST /rotate). trigger labels the metric.
func (s *Service) Rotate(ctx context.Context, tenant, id, trigger string) (err error) {
	defer func() {
		if s.m != nil {
			res := "ok"
			if err != nil {
				res = "error"
			}
			s.m.RotationsTotal.WithLabelValues(trigger, res).Inc()
		}
	}()
	// Two replicas rotating the same chain at once both get a rotation: the one whose write lost
	// rotates once more from the winner's state (its first new key is rolled back). Losing twice
	// answers 409 key_chain_conflict.
	return s.retryStale(ctx, tenant, id, func(c *Chain) error { return s.rotateLocked(ctx, c) })
}

// rotateIfDue re-checks under the chain lock that the chain is still due (a manual rotation or an
// update may have happened since the scheduler listed it) and rotates it.
func (s *Service) rotateIfDue(ctx context.Context, tenant, id string) (done bool, err error) {
	c, unlock, err := s.lockExisting(ctx, tenant, id)
	if err != nil {
		if errs.KindOf(err) == errs.NotFound {
			return false, nil // deleted meanwhile
		}
		return false, err
	}
	defer unlock()
	if next, ok := c.nextRotation(); !ok || s.now().Before(next) {
		return false, nil
	}
	err = s.rotateLocked(ctx, c)
	if errors.Is(err, errStale) {
		// Another replica rotated or changed the chain since it was read here; this replica's new
		// key has been rolled back. Not an error: the chain is rotated exactly once.
		return false, nil
	}
	if s.m != nil {
		res := "ok"
		if err != nil {
			res = "error"
		}
		s.m.RotationsTotal.WithLabelValues("scheduled", res).Inc()
	}
	return err == nil, err
}

// rotateLocked rotates c. Order matters for "a failed rotation leaves the chain as it was": the
// new key and certificate are made first, then one store write switches over; any failure
// before the write deletes the new key and leaves the record untouched. The outgoing active key
// joins the previous keys, each kept until its own grace period ends.
func (s *Service) rotateLocked(ctx context.Context, c *Chain) error {
	prov, err := s.reg.Get(c.Provider)
	if err != nil {
		return err
	}
	if !prov.Capabilities().CanCreate {
		return cannotCreate(prov)
	}
	if err := s.pruneLocked(ctx, c); err != nil {
		return err
	}
	if len(c.PreviousKeys) >= MaxPreviousKeys {
		return errs.Errorf(errs.Conflict, "key chain %q already keeps %d previous keys in their grace period: "+
			"rotate again once the oldest one's grace has ended (%s)", c.ID, len(c.PreviousKeys),
			c.PreviousKeys[0].Expiry.Format(time.RFC3339)).WithCode("too_many_previous_keys")
	}
	now := s.now()
	kid := s.rotationKID(c, now)
	ks := s.lc.Begin()
	nk, nref, err := s.newKey(ctx, c, prov, kid, ks)
	if err != nil {
		ks.Rollback()
		return err
	}
	certPEM := ""
	if c.Usage != KeyUseEncrypt {
		certPEM, err = s.leafFor(ctx, c, prov, nref)
		if err != nil {
			ks.Rollback()
			return err
		}
	}
	next := *c
	next.PreviousKeys = append(append(make([]PreviousKey, 0, len(c.PreviousKeys)+1), c.PreviousKeys...),
		PreviousKey{Key: c.Active, Certificate: c.ActiveCertificate, Expiry: now.Add(s.grace)})
	next.Active, next.ActiveCertificate = nk, certPEM
	next.LastRotatedAt = &now
	next.UpdatedAt = now
	if err := s.commitChain(ctx, ks, &next, false); err != nil {
		return err
	}
	*c = next
	return nil
}

// pruneLocked deletes the previous keys whose grace period is over: first in their backend, then
// from the record. A key the backend refuses to delete stays in the record so a later pass
// retries; it is no longer published either way, because the JWKS filters on the expiry.
func (s *Service) pruneLocked(ctx context.Context, c *Chain) error {
	now := s.now()
	kept := make([]PreviousKey, 0, len(c.PreviousKeys))
	for _, p := range c.PreviousKeys {
		if now.Before(p.Expiry) {
			kept = append(kept, p)
			continue
		}
		if err := s.deleteKey(ctx, c.Tenant, p.Key); err != nil {
			kept = append(kept, p)
			s.log.Warn("could not delete an expired previous key", "tenant", c.Tenant, "chain", c.ID,
				"kid", p.Key.KID, "error", err)
		}
	}
	if len(kept) == len(c.PreviousKeys) {
		return nil
	}
	next := *c
	next.PreviousKeys = kept
	if len(kept) == 0 {
		next.PreviousKeys = nil
	}
	next.UpdatedAt = now
	if err := s.save(ctx, &next); err != nil {
		return err
	}
	*c = next
	return nil
}

// rotationKID is <id>-<epochMillis>, bumped when a clock has not moved since the last rotation so
// kids never repeat within a chain.
func (s *Service) rotationKID(c *Chain, now time.Time) string {
	ms := now.UnixMilli()
	for {
		kid := c.ID + "-" + strconv.FormatInt(ms, 10)
		used := false
		for _, k := range c.keys() {
			used = used || k.KID == kid
		}
		if !used {
			return kid
		}
		ms++
	}
}

// leafFor certifies a new active key: by the root for internal chains, self-signed otherwise.
func (s *Service) leafFor(ctx context.Context, c *Chain, prov providers.Provider, ref providers.KeyRef) (string, error) {
	name, err := s.tenantName(ctx, c.Tenant)
	if err != nil {
		return "", err
	}
	spec := certSpec{commonName: name, days: c.certValidityDays(), subjectPub: ref.Public, now: s.now()}
	by := s.signerOf(prov, ref)
	rootPEM := ""
	if c.Type() == TypeInternalChain {
		roots, err := parsePEMChain(c.RootCertificate)
		if err != nil {
			return "", fmt.Errorf("stored root certificate of chain %s is unreadable: %w", c.ID, err)
		}
		if len(roots) == 0 {
			return "", fmt.Errorf("stored root certificate of chain %s holds no certificate", c.ID)
		}
		rref, err := keys.ProviderRef(*c.Root, c.Tenant)
		if err != nil {
			return "", err
		}
		spec.issuer, by, rootPEM = roots[0], s.signerOf(prov, rref), c.RootCertificate
	}
	leaf, err := s.prof.issue(ctx, spec, by)
	if err != nil {
		return "", fmt.Errorf("leaf certificate: %w", err)
	}
	return joinPEM(pemOf(leaf), rootPEM), nil
}

// expirePrevious deletes the chain's previous keys whose grace period is over.
func (s *Service) expirePrevious(ctx context.Context, tenant, id string) error {
	c, unlock, err := s.lockExisting(ctx, tenant, id)
	if err != nil {
		if errs.KindOf(err) == errs.NotFound {
			return nil // deleted meanwhile
		}
		return err
	}
	defer unlock()
	if err := s.pruneLocked(ctx, c); !errors.Is(err, errStale) {
		return err
	}
	return nil // another replica pruned or rotated it meanwhile; the next pass looks again
}

// hasExpired reports whether a previous key's grace period is over at now.
func (c *Chain) hasExpired(now time.Time) bool {
	for _, p := range c.PreviousKeys {
		if !now.Before(p.Expiry) {
			return true
		}
	}
	return false
}

// RunScheduler calls Tick every interval (default 1 h) until ctx ends.
func (s *Service) RunScheduler(ctx context.Context, every time.Duration) {
	if every <= 0 {
		every = time.Hour
	}
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		s.Tick(ctx)
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}
