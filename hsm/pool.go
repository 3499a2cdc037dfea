package hsm

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/miekg/pkcs11"
)

func (s *Slot) downErr() error {
	s.mu.Lock()
	err := s.lastErr
	s.mu.Unlock()
	select {
	case <-s.closed:
		return ErrClosed
	default:
	}
	if err == nil {
		return ErrSlotDown
	}
	return fmt.Errorf("%w: %w", ErrSlotDown, err)
}

func (s *Slot) acquire(ctx context.Context) (*session, error) {
	p := s.cur.Load()
	if p == nil {
		return nil, s.downErr()
	}
	p.inflight.Add(1)
	select {
	case se := <-p.ch:
		return s.live(se)
	default:
	}
	s.waits.Add(1)
	start := time.Now()
	t := time.NewTimer(s.timeout)
	defer func() {
		t.Stop()
		s.waitNanos.Add(uint64(time.Since(start)))
	}()
	select {
	case se := <-p.ch:
		return s.live(se)
	case <-p.dead:
		p.inflight.Add(-1)
		return nil, s.downErr()
	case <-ctx.Done():
		p.inflight.Add(-1)
		s.exhausted.Add(1)
		return nil, fmt.Errorf("%w before the request's deadline: %w", ErrPoolExhausted, ctx.Err())
	case <-t.C:
		p.inflight.Add(-1)
		s.exhausted.Add(1)
		return nil, fmt.Errorf("%w within %s (pool of %d sessions)", ErrPoolExhausted, s.timeout, cap(p.ch))
	}
}

// live hands out se unless its generation died after the caller loaded the pool: sessions of a
// retired generation are never used again, so a rebuild can close them safely.
func (s *Slot) live(se *session) (*session, error) {
	select {
	case <-se.p.dead:
		se.p.ch <- se
		se.p.inflight.Add(-1)
		return nil, s.downErr()
	default:
		return se, nil
	}
}

// tryAcquire takes an idle session of p without waiting, or returns nil. It is for probes, so it
// does not count waits or exhaustion.
func (s *Slot) tryAcquire(p *pool) *session {
	p.inflight.Add(1)
	select {
	case se := <-p.ch:
		if se, err := s.live(se); err == nil {
			return se
		}
		return nil
	default:
		p.inflight.Add(-1)
		return nil
	}
}

// errLibraryReset reports a session checked out before another slot re-initialised the library.
// It carries CKR_SESSION_HANDLE_INVALID so it is fatal for the slot, which then rebuilds.
var errLibraryReset = &OpError{Op: "session checkout", RV: pkcs11.CKR_SESSION_HANDLE_INVALID,
	Err: fmt.Errorf("the PKCS#11 library was re-initialised after this session was opened: %w", pkcs11.Error(pkcs11.CKR_SESSION_HANDLE_INVALID))}

// enter takes the library's read lock for a sequence of calls on se. Handles are only valid in
// the library generation that made them: after a re-initialisation the same numbers may name
// another slot's new session or another key, so a stale one must never reach the library.
func (s *Slot) enter(se *session) error {
	m := se.p.mod
	m.life.RLock()
	if se.p.modGen != m.gen.Load() {
		m.life.RUnlock()
		return errLibraryReset
	}
	return nil
}

var errLibraryBusy = errors.New("the PKCS#11 library is being re-initialised")

// tryEnter is enter without waiting, for probes.
func (s *Slot) tryEnter(se *session) error {
	m := se.p.mod
	if !m.life.TryRLock() {
		return errLibraryBusy
	}
	if se.p.modGen != m.gen.Load() {
		m.life.RUnlock()
		return errLibraryReset
	}
	return nil
}

func (s *Slot) leave(se *session) { se.p.mod.life.RUnlock() }

func (s *Slot) release(se *session, err error) {
	p := se.p
	if err != nil && ClassOf(err) == ClassFatal {
		s.markDown(p, err)
	}
	p.ch <- se // never blocks: the channel holds every session of p; a retired pool's are closed from there
	p.inflight.Add(-1)
}

// call counts a failed PKCS#11 call by return code and wraps it with the call's name.
func (s *Slot) call(op string, err error) error {
	if err == nil {
		return nil
	}
	rv, ok := rvOf(err)
	if ok {
		s.errs[ckrSlot(rv)].Add(1)
	}
	return &OpError{Op: op, RV: rv, Err: err}
}

// markDown retires p after a fatal error: new requests fail fast and the supervisor rebuilds.
func (s *Slot) markDown(p *pool, cause error) {
	if !s.cur.CompareAndSwap(p, nil) {
		return
	}
	p.kill()
	s.setDown(cause)
	s.log.Warn("pkcs11 slot down; rebuilding in the background", "error", cause)
	select {
	case s.kick <- struct{}{}:
	default:
	}
}

func (s *Slot) setDown(err error) {
	s.mu.Lock()
	if s.downSince.IsZero() {
		s.downSince = time.Now()
	}
	s.lastErr = err
	s.mu.Unlock()
}
