package keys

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash/fnv"
	"strings"
	"time"

	"github.com/kmsgate/kmsgate/appliance/store"
	"github.com/kmsgate/kmsgate/internal/errs"
	"github.com/kmsgate/kmsgate/providers"
)

// The lifecycle's own records. A key is created in three steps: an intent record, the backend
// key, then one transaction that writes the reference and deletes the intent. An intent that
// outlives its process (a crash between the steps) names the backend object, so the start-up
// sweep can delete it. An owned record exists for every backend key the lifecycle created and
// some record still references, whatever the face: it is what the per-tenant key quota counts,
// without reading the faces' own records. The count record caches that number per tenant.
const (
	prefixIntent = "intent/"
	prefixOwned  = "keyown/"
	prefixCount  = "keycount/"
)

func intentKey(tenant, id string) string { return prefixIntent + tenant + "\x00" + id }
func countKey(tenant string) string      { return prefixCount + tenant }

// ownedKey names a backend key: provider and external id within the tenant (the kid for old
// references without an external id; \x01 cannot occur in external ids or kids).
func ownedKey(ref providers.KeyRef) string {
	ext := ref.ExternalID
	if ext == "" {
		ext = "\x01" + ref.KID
	}
	return prefixOwned + ref.Tenant + "\x00" + ref.ProviderID + "\x00" + ext
}

// Intent states. A pending intent counts against the tenant's quota; a confirming one has handed
// its count to the owned record written with it (see Batch.Commit); a sweeping one was claimed by
// a sweep, which a commit must not overtake.
const (
	IntentPending    = "pending"
	IntentConfirming = "confirming"
	IntentSweeping   = "sweeping"
)

// Intent is the record written before a backend key is created.
type Intent struct {
	ID         string `json:"id"`
	Tenant     string `json:"tenant"`
	KID        string `json:"kid"`
	ProviderID string `json:"providerId"`
	// ExternalID is the KeyRef.ExternalID the backend key has (predicted before the create by
	// providers.Namer, or learnt after it); "" when unknown (aws-kms before CreateKey answered).
	ExternalID string    `json:"externalId,omitempty"`
	Owner      string    `json:"owner"`
	State      string    `json:"state"`
	CreatedAt  time.Time `json:"createdAt"`
}

func (in *Intent) ref() providers.KeyRef {
	return providers.KeyRef{ProviderID: in.ProviderID, Tenant: in.Tenant, KID: in.KID, ExternalID: in.ExternalID}
}

type ownedRecord struct {
	KID        string    `json:"kid"`
	ProviderID string    `json:"providerId"`
	ExternalID string    `json:"externalId,omitempty"`
	CreatedAt  time.Time `json:"createdAt"`
}

type countRecord struct {
	N int64 `json:"n"`
}

// TxStore is what the lifecycle needs from the record store for its bookkeeping.
type TxStore interface {
	Update(ctx context.Context, fn func(*store.Txn) error) error
	List(ctx context.Context, prefix string, fn func(key string, val []byte) error) error
}

// DefaultMaxKeysPerTenant is the per-tenant key quota when none is configured.
const DefaultMaxKeysPerTenant = 100000

func errQuota(max int) error {
	return errs.Errorf(errs.Forbidden, "the tenant has reached its quota of %d keys; delete keys or key chains first", max).
		WithCode("quota_exceeded")
}

// errIntentSwept answers a commit whose intent a sweep claimed (the create took longer than the
// intent's maximum age): the backend key may be gone, so the reference must not be written.
var errIntentSwept = errs.Errorf(errs.Unavailable, "the key's create took too long and was abandoned; retry").
	WithCode("key_create_abandoned")

func newIntentID() (string, error) {
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", fmt.Errorf("intent id: %w", err)
	}
	return hex.EncodeToString(b[:]), nil
}

// lockTenant serialises this process's count updates of one tenant, so concurrent creates do not
// run into Badger's transaction conflicts; the lock array does not grow with tenants. Across
// processes the store's transaction isolation on the count record does the same.
func (l *Lifecycle) lockTenant(tenant string) func() {
	h := fnv.New32a()
	h.Write([]byte(tenant))
	mu := &l.stripes[h.Sum32()%uint32(len(l.stripes))]
	mu.Lock()
	return mu.Unlock
}

func readCount(tx *store.Txn, tenant string) (int64, error) {
	var c countRecord
	if err := tx.Get(countKey(tenant), &c); err != nil && !errors.Is(err, store.ErrNotFound) {
		return 0, err
	}
	return c.N, nil
}

func addCount(tx *store.Txn, tenant string, delta int64) error {
	n, err := readCount(tx, tenant)
	if err != nil {
		return err
	}
	return tx.Put(countKey(tenant), countRecord{N: max(n+delta, 0)})
}

func exists(tx *store.Txn, key string) (bool, error) {
	var raw json.RawMessage
	err := tx.Get(key, &raw)
	if errors.Is(err, store.ErrNotFound) {
		return false, nil
	}
	return err == nil, err
}

// reserve writes a pending intent for a key of spec in prov, after checking the tenant's quota
// (the intent counts against it until the key is committed or abandoned), and sets spec's
// identity hint. Without a store it does nothing.
func (l *Lifecycle) reserve(ctx context.Context, prov providers.Provider, spec *providers.KeySpec) (*Intent, error) {
	if l.st == nil {
		return nil, nil
	}
	id, err := newIntentID()
	if err != nil {
		return nil, err
	}
	spec.ExternalID = id
	ext := ""
	if n, ok := providers.As[providers.Namer](prov); ok {
		if ext, err = n.ExternalIDFor(*spec); err != nil {
			return nil, err
		}
	}
	in := &Intent{ID: id, Tenant: spec.Tenant, KID: spec.KID, ProviderID: prov.ID(), ExternalID: ext, Owner: l.owner,
		State: IntentPending, CreatedAt: l.now().UTC()}
	defer l.lockTenant(spec.Tenant)()
	err = l.st.Update(ctx, func(tx *store.Txn) error {
		n, err := readCount(tx, spec.Tenant)
		if err != nil {
			return err
		}
		if l.maxKeys >= 0 && n >= int64(l.maxKeys) {
			return errQuota(l.maxKeys)
		}
		if err := tx.Put(countKey(spec.Tenant), countRecord{N: n + 1}); err != nil {
			return err
		}
		return tx.Create(intentKey(in.Tenant, in.ID), in)
	})
	if err != nil {
		if errs.KindOf(err) == errs.Forbidden {
			return nil, err
		}
		return nil, fmt.Errorf("write key intent: %w", err)
	}
	return in, nil
}

// learned records the external id of a key whose identity the provider could not predict
// (aws-kms), so that the window in which a crash leaves an unknown key is the create call alone.
func (l *Lifecycle) learned(ctx context.Context, in *Intent, ref providers.KeyRef) {
	if in == nil || ref.ExternalID == "" || in.ExternalID == ref.ExternalID {
		return
	}
	in.ExternalID = ref.ExternalID
	err := l.st.Update(ctx, func(tx *store.Txn) error {
		var cur Intent
		if err := tx.Get(intentKey(in.Tenant, in.ID), &cur); err != nil {
			return err
		}
		cur.ExternalID = ref.ExternalID
		return tx.Put(intentKey(in.Tenant, in.ID), &cur)
	})
	if err != nil {
		l.log.Warn("could not record a new key's external id in its intent", "provider", ref.ProviderID,
			"tenant", ref.Tenant, "key_id", ref.KID, "error", err)
	}
}

// maybeCreated reports whether a failed create may still have left a key in the backend: the
// outcome of a timeout, a lost connection or an internal error is unknown; a refusal is not.
func maybeCreated(err error) bool {
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return true
	}
	switch errs.KindOf(err) {
	case errs.Internal, errs.Unavailable:
		return true
	}
	return false
}

// abandon cleans up after a failed create: when the backend may hold the key and its identity is
// known, it is deleted; the intent goes once nothing can be left behind. Otherwise the intent
// stays for the sweep.
func (l *Lifecycle) abandon(prov providers.Provider, in *Intent, cause error) {
	if in == nil {
		return
	}
	if maybeCreated(cause) {
		if in.ExternalID == "" {
			return // the sweep reports it
		}
		if l.isOwned(in.ref()) {
			// A deterministic name (an http re-import) that a stored reference still uses.
			l.settle(nil, in.Tenant, in.ID, false)
			return
		}
		if err := l.deleteDetached(prov, in.ref()); err != nil {
			l.log.Warn("could not delete the backend key of a failed create; the intent sweep retries",
				"provider", prov.ID(), "tenant", in.Tenant, "key_id", in.KID, "error", err)
			return
		}
	}
	l.settle(nil, in.Tenant, in.ID, false)
}

// isOwned reports whether a stored reference uses ref's backend key; on a store error it answers
// true, so that nothing is deleted on doubt.
func (l *Lifecycle) isOwned(ref providers.KeyRef) bool {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	owned := true
	_ = l.st.Update(ctx, func(tx *store.Txn) error {
		var err error
		owned, err = exists(tx, ownedKey(ref))
		if err != nil {
			owned = true
		}
		return err
	})
	return owned
}

// Backfill gives every key record written before owned records existed its owned record (once
// per store, marked by a meta record), so that those keys count against the quota and a sweep
// never deletes a backend key they use. Key-chain keys of that age are not backfilled: their
// records belong to the key-chain face.
func (l *Lifecycle) Backfill(ctx context.Context) error {
	if l.st == nil {
		return nil
	}
	const marker = "meta/keys-owned-v1"
	done := false
	if err := l.st.Update(ctx, func(tx *store.Txn) error {
		var err error
		done, err = exists(tx, marker)
		return err
	}); err != nil || done {
		return err
	}
	var refs []store.KeyRef
	if err := l.st.List(ctx, "key/", func(key string, val []byte) error {
		var r store.KeyRef
		tenant, _, ok := strings.Cut(strings.TrimPrefix(key, "key/"), "\x00")
		if !ok || json.Unmarshal(val, &r) != nil || r.ProviderID == "" {
			return nil // not a key record this pass can use
		}
		r.Tenant = tenant
		refs = append(refs, r)
		return nil
	}); err != nil {
		return fmt.Errorf("list key records: %w", err)
	}
	for _, r := range refs {
		ref := providers.KeyRef{ProviderID: r.ProviderID, Tenant: r.Tenant, KID: r.KID, ExternalID: r.ExternalID}
		unlock := l.lockTenant(r.Tenant)
		err := l.st.Update(ctx, func(tx *store.Txn) error {
			ok, err := exists(tx, ownedKey(ref))
			if err != nil || ok {
				return err
			}
			if err := l.putOwned(tx, ref); err != nil {
				return err
			}
			return addCount(tx, r.Tenant, 1)
		})
		unlock()
		if err != nil {
			return fmt.Errorf("backfill owned key records: %w", err)
		}
	}
	return l.st.Update(ctx, func(tx *store.Txn) error { return tx.Put(marker, true) })
}

// checkIntent verifies inside a commit transaction that in is still ours to confirm.
func checkIntent(tx *store.Txn, in *Intent) error {
	var cur Intent
	if err := tx.Get(intentKey(in.Tenant, in.ID), &cur); err != nil {
		if errors.Is(err, store.ErrNotFound) {
			return errIntentSwept
		}
		return err
	}
	if cur.State == IntentSweeping {
		return errIntentSwept
	}
	return nil
}

func (l *Lifecycle) putOwned(tx *store.Txn, ref providers.KeyRef) error {
	return tx.Put(ownedKey(ref), ownedRecord{KID: ref.KID, ProviderID: ref.ProviderID, ExternalID: ref.ExternalID,
		CreatedAt: l.now().UTC()})
}

// confirmOwned writes the owned record of a key whose intent is being confirmed: the intent's
// count passes to it. When the record existed already (an import that replaced a key in place
// under the same name), the key was counted twice, so the count goes down by one.
func (l *Lifecycle) confirmOwned(tx *store.Txn, ref providers.KeyRef) error {
	had, err := exists(tx, ownedKey(ref))
	if err != nil {
		return err
	}
	if err := l.putOwned(tx, ref); err != nil {
		return err
	}
	if had {
		return addCount(tx, ref.Tenant, -1)
	}
	return nil
}

// settle drops the bookkeeping of one key in one transaction and keeps the tenant's count right:
// the owned record of ref (when ref is not nil) and the intent intentID (when not ""). With
// keepIntent the intent stays, pending again, so that a later sweep retries a backend delete
// that failed. Failures are logged: they can only leave a count too high, never a key unknown.
func (l *Lifecycle) settle(ref *providers.KeyRef, tenant, intentID string, keepIntent bool) {
	if l.st == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	defer l.lockTenant(tenant)()
	err := l.st.Update(ctx, func(tx *store.Txn) error {
		var delta int64
		if ref != nil {
			ok, err := exists(tx, ownedKey(*ref))
			if err != nil {
				return err
			}
			if ok {
				if err := tx.Delete(ownedKey(*ref)); err != nil {
					return err
				}
				delta--
			}
		}
		if intentID != "" {
			var in Intent
			err := tx.Get(intentKey(tenant, intentID), &in)
			switch {
			case errors.Is(err, store.ErrNotFound):
			case err != nil:
				return err
			case keepIntent:
				if in.State == IntentConfirming {
					in.State = IntentPending
					delta++
				}
				if err := tx.Put(intentKey(tenant, intentID), &in); err != nil {
					return err
				}
			default:
				if in.State != IntentConfirming {
					delta--
				}
				if err := tx.Delete(intentKey(tenant, intentID)); err != nil {
					return err
				}
			}
		}
		if delta == 0 {
			return nil
		}
		return addCount(tx, tenant, delta)
	})
	if err != nil {
		l.log.Warn("could not update the key bookkeeping", "tenant", tenant, "error", err)
	}
}

// Forget drops the bookkeeping of a key no record references any more (its backend delete failed
// and the caller removes the reference anyway), so it no longer counts against the quota.
func (l *Lifecycle) Forget(ref providers.KeyRef) { l.settle(&ref, ref.Tenant, "", false) }

// KeyCount is the number of keys the tenant holds (and is creating) against its quota.
func (l *Lifecycle) KeyCount(ctx context.Context, tenant string) (int64, error) {
	if l.st == nil {
		return 0, nil
	}
	var n int64
	err := l.st.Update(ctx, func(tx *store.Txn) error {
		var err error
		n, err = readCount(tx, tenant)
		return err
	})
	return n, err
}

// SweepResult labels the sweep metric (a closed set).
const (
	SweepDeleted    = "deleted"    // the backend key (if any) and the intent are gone
	SweepKept       = "kept"       // a reference points at the key: only the intent went
	SweepUnresolved = "unresolved" // the key's identity or provider is unknown: logged for an operator
	SweepError      = "error"      // the backend delete failed: the intent stays for the next sweep
)

// Registry resolves a provider id for the sweep.
type SweepRegistry interface {
	Get(id string) (providers.Provider, error)
}

// Sweep deletes the backend keys of intents older than maxAge and then the intents. A younger
// intent is never touched: it may belong to a create in flight in this or another process, and
// maxAge is chosen well above the time a create can take. observe (optional) is called once per
// swept intent with the provider type and a Sweep* result. It returns how many intents it handled.
func (l *Lifecycle) Sweep(ctx context.Context, reg SweepRegistry, maxAge time.Duration, observe func(providerType, result string)) (int, error) {
	if l.st == nil {
		return 0, nil
	}
	var stale []Intent
	now := l.now()
	err := l.st.List(ctx, prefixIntent, func(key string, val []byte) error {
		var in Intent
		if err := json.Unmarshal(val, &in); err != nil {
			l.log.Warn("unreadable key intent skipped", "record", key, "error", err)
			return nil
		}
		if now.Sub(in.CreatedAt) >= maxAge {
			stale = append(stale, in)
		}
		return nil
	})
	if err != nil {
		return 0, fmt.Errorf("list key intents: %w", err)
	}
	n := 0
	for i := range stale {
		if ctx.Err() != nil {
			return n, ctx.Err()
		}
		typ, res := l.sweepOne(ctx, reg, &stale[i])
		if res == "" {
			continue
		}
		n++
		if observe != nil {
			observe(typ, res)
		}
	}
	return n, nil
}

// sweepOne claims one stale intent (a commit racing with the sweep then fails instead of storing
// a reference to a deleted key) and resolves it. res "" means the intent was gone already.
func (l *Lifecycle) sweepOne(ctx context.Context, reg SweepRegistry, stale *Intent) (typ, res string) {
	typ = "unknown"
	prov, perr := reg.Get(stale.ProviderID)
	if perr == nil {
		typ = prov.Type()
	}
	var in Intent
	var referenced bool
	err := l.st.Update(ctx, func(tx *store.Txn) error {
		if err := tx.Get(intentKey(stale.Tenant, stale.ID), &in); err != nil {
			return err
		}
		if in.State == IntentConfirming {
			// Its owned record was written with the confirmation: the key is accounted for.
			referenced = true
			return nil
		}
		if in.ExternalID != "" {
			ok, err := exists(tx, ownedKey(in.ref()))
			if err != nil {
				return err
			}
			referenced = ok
		}
		in.State = IntentSweeping
		return tx.Put(intentKey(in.Tenant, in.ID), &in)
	})
	if errors.Is(err, store.ErrNotFound) {
		return typ, ""
	}
	if err != nil {
		l.log.Warn("key intent sweep: could not claim an intent", "tenant", stale.Tenant, "intent", stale.ID, "error", err)
		return typ, SweepError
	}
	attrs := []any{"provider", in.ProviderID, "tenant", in.Tenant, "key_id", in.KID, "intent", in.ID,
		"owner", in.Owner, "age", l.now().Sub(in.CreatedAt).Round(time.Second).String()}
	switch {
	case referenced:
		l.settle(nil, in.Tenant, in.ID, false)
		return typ, SweepKept
	case perr != nil:
		l.log.Warn("key intent sweep: the intent's provider is not configured; intent kept", attrs...)
		return typ, SweepUnresolved
	case in.ExternalID == "":
		// aws-kms assigns key ids itself: a crash during CreateKey leaves a key only its tag
		// (KmsgateIntent=<intent>) can find. Searching by tag costs a ListKeys and a tag read per
		// key of the account, so the sweep reports it instead.
		l.log.Warn("key intent sweep: a crash may have left a backend key whose id is unknown; "+
			"look for the key tagged with this intent id", attrs...)
		l.settle(nil, in.Tenant, in.ID, false)
		return typ, SweepUnresolved
	}
	if err := prov.Delete(ctx, in.ref()); err != nil && !errors.Is(err, errs.NotFound) {
		l.log.Warn("key intent sweep: backend delete failed; the next sweep retries", append(attrs, "error", err)...)
		return typ, SweepError
	}
	l.log.Info("key intent sweep: deleted a key a crash left behind", attrs...)
	l.settle(nil, in.Tenant, in.ID, false)
	return typ, SweepDeleted
}
