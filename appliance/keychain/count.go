package keychain

import (
	"context"
	"errors"

	"github.com/kmsgate/kmsgate/appliance/store"
	"github.com/kmsgate/kmsgate/internal/errs"
)

// The in-memory index makes the chain quota exact within one process, but replicas on a shared
// store each see only their own in-flight creates. So the tenant's chain count is also kept in a
// store record, changed in the same transaction that creates or deletes a chain record: two
// replicas creating a tenant's last allowed chain at once cannot both commit.

// prefixChainCount does not start with prefixChain, so chain listings never see it.
const prefixChainCount = "chaincount/"

func chainCountKey(tenant string) string { return prefixChainCount + tenant }

type chainCount struct {
	N int `json:"n"`
}

// countBase is the tenant's chain count as the index knows it, the starting value of the count
// record when there is none yet (a store written before the record existed).
func (s *Service) countBase(ctx context.Context, tenant string) (int, error) {
	return s.Count(ctx, tenant)
}

// addChainCount changes the tenant's chain count by delta inside tx; an increase beyond the
// quota fails with quota_exceeded, which rolls the whole transaction back.
func (s *Service) addChainCount(tx *store.Txn, tenant string, base, delta int) error {
	var cnt chainCount
	err := tx.Get(chainCountKey(tenant), &cnt)
	switch {
	case errors.Is(err, store.ErrNotFound):
		cnt.N = base
	case err != nil:
		return err
	}
	cnt.N += delta
	if cnt.N < 0 {
		cnt.N = 0
	}
	if delta > 0 && s.maxChains > 0 && cnt.N > s.maxChains {
		return errQuota(tenant, s.maxChains)
	}
	return tx.Put(chainCountKey(tenant), &cnt)
}

func errQuota(tenant string, max int) error {
	return errs.Errorf(errs.Forbidden, "tenant %q has reached its quota of %d key chains: delete one first",
		tenant, max).WithCode("quota_exceeded")
}
