package keychain

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/kmsgate/kmsgate/appliance/store"
	"github.com/kmsgate/kmsgate/internal/errs"
)

// Several replicas may share one store. The in-process chain locks serialise writers of one
// process only, so every write of a chain record is a compare-and-swap: the write's transaction
// re-reads the record and goes ahead only if it still has the version (and UpdatedAt) the writer
// read. Two replicas that both rotate from the same state therefore cannot both win: the loser's
// transaction fails with errStale, its new key is rolled back, and the record never holds two
// active keys or loses the winner's update.

// chainBase is the state a chain record had when it was read.
type chainBase struct {
	loaded    bool // false: the writer expects no record (a new chain)
	version   int64
	updatedAt time.Time
}

// errStale reports that the chain record changed (or vanished) since it was read.
var errStale = errors.New("key chain changed concurrently")

// txStore is the transactional face of the store (both engines have it).
type txStore interface {
	Update(ctx context.Context, fn func(*store.Txn) error) error
}

// markLoaded records c's current state as the base of its next write.
func (c *Chain) markLoaded() {
	c.base = chainBase{loaded: true, version: c.Version, updatedAt: c.UpdatedAt}
}

// prepareWrite sets the version c is written with: one above the version it was read at.
func (c *Chain) prepareWrite() { c.Version = c.base.version + 1 }

// checkBase fails with errStale unless the record at c's key is in the state c was read in.
func checkBase(tx *store.Txn, c *Chain) error {
	var cur Chain
	err := tx.Get(chainKey(c.Tenant, c.ID), &cur)
	switch {
	case errors.Is(err, store.ErrNotFound):
		if c.base.loaded {
			return errStale // deleted meanwhile
		}
		return nil
	case err != nil:
		return err
	case !c.base.loaded:
		return errStale // created meanwhile by someone else
	case cur.Version != c.base.version || !cur.UpdatedAt.Equal(c.base.updatedAt):
		return errStale
	}
	return nil
}

// writeChainTx writes c in tx if the record is still as c was read; isNew reports that there was
// no record (an import under a new id), so the tenant's chain count grows.
func writeChainTx(tx *store.Txn, c *Chain) (isNew bool, err error) {
	if err := checkBase(tx, c); err != nil {
		return false, err
	}
	return !c.base.loaded, tx.Put(chainKey(c.Tenant, c.ID), c)
}

// casWrite writes c if the record is still as c was read; without a transactional store it
// writes unconditionally (single process: the chain locks are enough).
func (s *Service) casWrite(ctx context.Context, c *Chain) error {
	ts, ok := s.st.(txStore)
	if !ok {
		return s.st.Put(ctx, chainKey(c.Tenant, c.ID), c)
	}
	return ts.Update(ctx, func(tx *store.Txn) error {
		_, err := writeChainTx(tx, c)
		return err
	})
}

// casDelete deletes c's record if it is still as c was read.
func (s *Service) casDelete(ctx context.Context, c *Chain) error {
	ts, ok := s.st.(txStore)
	if !ok {
		return s.st.Delete(ctx, chainKey(c.Tenant, c.ID))
	}
	base, err := s.countBase(ctx, c.Tenant)
	if err != nil {
		return err
	}
	return ts.Update(ctx, func(tx *store.Txn) error {
		if err := checkBase(tx, c); err != nil {
			return err
		}
		if err := tx.Delete(chainKey(c.Tenant, c.ID)); err != nil {
			return err
		}
		return s.addChainCount(tx, c.Tenant, base, -1)
	})
}

// errConflict is what a caller sees when its write lost against another replica twice in a row.
func errConflict(id string) error {
	return errs.Errorf(errs.Conflict, "key chain %q was changed concurrently by another request; retry", id).
		WithCode("key_chain_conflict")
}

// retryStale runs op on the freshly loaded chain; when op loses a race (errStale) it runs once
// more on the new state, and answers 409 key_chain_conflict if that loses too. The chain lock is
// held across both attempts.
func (s *Service) retryStale(ctx context.Context, tenant, id string, op func(c *Chain) error) error {
	c, unlock, err := s.lockExisting(ctx, tenant, id)
	if err != nil {
		return err
	}
	defer unlock()
	for attempt := 0; ; attempt++ {
		err := op(c)
		if !errors.Is(err, errStale) {
			return err
		}
		if attempt == 1 {
			return errConflict(id)
		}
		if c, err = s.load(ctx, tenant, id); err != nil {
			if errs.KindOf(err) == errs.NotFound {
				s.idx.remove(tenant, id)
			}
			return err
		}
	}
}

// wrapStore wraps a store error of a chain write, keeping errStale recognisable.
func wrapStore(id string, err error) error {
	if err == nil || errors.Is(err, errStale) {
		return err
	}
	return fmt.Errorf("store key chain %s: %w", id, err)
}
