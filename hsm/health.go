package hsm

import (
	"context"
	"time"

	"github.com/miekg/pkcs11"
)

// Health is the slot's state for a health probe.
type Health struct {
	OK    bool
	Error string
}

// Health probes a pooled session with C_GetSessionInfo (never blocking past ctx) and reports
// the last periodic canary result.
func (s *Slot) Health(ctx context.Context) Health {
	if err := ctx.Err(); err != nil {
		return Health{OK: false, Error: "health probe: " + err.Error()}
	}
	p := s.cur.Load()
	if p == nil {
		return Health{OK: false, Error: s.downErr().Error()}
	}
	se := s.tryAcquire(p)
	if se == nil {
		// Every session is busy signing, which proves the slot works; waiting would only
		// delay the probe and count as pool pressure.
		return Health{OK: true}
	}
	// tryEnter: a probe must not wait behind a library re-initialisation.
	if err := s.tryEnter(se); err != nil {
		s.release(se, err)
		return Health{OK: false, Error: err.Error()}
	}
	info, err := se.p.mod.ctx.GetSessionInfo(se.h)
	s.leave(se)
	err = s.call("C_GetSessionInfo", err)
	if err == nil && info.State != pkcs11.CKS_RO_USER_FUNCTIONS && info.State != pkcs11.CKS_RW_USER_FUNCTIONS && s.cfg.PIN != "" {
		err = &OpError{Op: "C_GetSessionInfo", RV: pkcs11.CKR_USER_NOT_LOGGED_IN, Err: pkcs11.Error(pkcs11.CKR_USER_NOT_LOGGED_IN)}
	}
	s.release(se, err)
	if err != nil {
		return Health{OK: false, Error: err.Error()}
	}
	s.mu.Lock()
	cerr := s.canaryLast
	s.mu.Unlock()
	if cerr != nil && s.cfg.CanaryInterval > 0 {
		return Health{OK: false, Error: "last canary failed: " + cerr.Error()}
	}
	return Health{OK: true}
}

// LastError is why the slot is down, or nil when it is up.
func (s *Slot) LastError() error {
	if s.cur.Load() != nil {
		return nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.lastErr == nil {
		return ErrSlotDown
	}
	return s.lastErr
}

// Up reports whether the slot currently serves requests.
func (s *Slot) Up() bool { return s.cur.Load() != nil }

// Stats is a snapshot of the slot's counters; reading it makes no PKCS#11 call.
type Stats struct {
	Up             bool
	Capacity       int
	InUse          int
	Idle           int
	Waits          uint64
	WaitSeconds    float64
	Exhausted      uint64
	SessionsOpened uint64
	Logins         uint64
	ObjectSearches uint64
	Rebuilds       uint64
	// LastCanary is when the slot last canary-signed (at build or periodically) and
	// LastCanaryError what went wrong then ("" when it verified).
	LastCanary      time.Time
	LastCanaryError string
	Errors          map[string]uint64 // by CKR name, closed set (see CKRNames)
	Slot            SlotInfo
	Library         string
	ReadOnly        bool
	LastError       string
	// LastRecovery is how long the last rebuild took from slot-down to slot-up.
	LastRecovery time.Duration
}

// Stats returns the counters.
func (s *Slot) Stats() Stats {
	st := Stats{Library: s.cfg.Library, ReadOnly: s.cfg.ReadOnly,
		Waits: s.waits.Load(), WaitSeconds: float64(s.waitNanos.Load()) / 1e9, Exhausted: s.exhausted.Load(),
		SessionsOpened: s.opened.Load(), Logins: s.logins.Load(), ObjectSearches: s.searches.Load(), Rebuilds: s.rebuilds.Load(),
		Errors: make(map[string]uint64, len(ckrNames))}
	for i, n := range ckrNames {
		st.Errors[n] = s.errs[i].Load()
	}
	s.mu.Lock()
	st.Slot, st.LastRecovery, st.LastCanary = s.info, s.lastRecover, s.canaryAt
	if s.canaryLast != nil {
		st.LastCanaryError = s.canaryLast.Error()
	}
	if s.lastErr != nil {
		st.LastError = s.lastErr.Error()
	}
	s.mu.Unlock()
	if p := s.cur.Load(); p != nil {
		st.Up = true
		st.Capacity = cap(p.ch)
		st.Idle = len(p.ch)
		st.InUse = st.Capacity - st.Idle
	}
	return st
}

// Close stops the supervisor, closes every session and releases the library reference.
func (s *Slot) Close() error {
	var err error
	s.once.Do(func() {
		close(s.closed)
		<-s.done
		if p := s.cur.Swap(nil); p != nil {
			p.kill()
		}
		if s.mod == nil {
			return
		}
		s.closeRetired(s.mod)
		err = s.mod.Close()
	})
	return err
}
