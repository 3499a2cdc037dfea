package hsm

import (
	"context"
	"fmt"
	"time"
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
		return se, nil
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
		return se, nil
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

func (s *Slot) release(se *session, err error) {
	p := se.p
	if err != nil && ClassOf(err) == ClassFatal {
		s.markDown(p, err)
	}
	select {
	case <-p.dead: // retired: the rebuild closes every session of this generation
	default:
		p.ch <- se
	}
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
	s.log.Warn("pkcs11 slot down; rebuilding in the background", "err", cause)
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
