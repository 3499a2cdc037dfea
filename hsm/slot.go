package hsm

import (
	"context"
	"crypto/ecdsa"
	"crypto/sha256"
	"errors"
	"fmt"
	"log/slog"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/miekg/pkcs11"

	"github.com/kmsgate/kmsgate/internal/keyutil"
)

// Config describes one slot to serve. The PIN is used for C_Login only and never logged or
// placed in an error.
type Config struct {
	Library string
	// Slot is an index into the list of slots that hold a token ("0", "1", …) or a token label.
	Slot     string
	PIN      string
	ReadOnly bool
	// PoolSize is the number of long-lived sessions; 0 sizes the pool to the machine, never
	// above the token's session limit.
	PoolSize int
	// AcquireTimeout bounds how long a request waits for a free session (default 2s).
	AcquireTimeout time.Duration
	// CanaryInterval, when positive, signs with a throw-away session key that often.
	CanaryInterval time.Duration
	// MinBackoff and MaxBackoff bound the rebuild retry delay (defaults 50ms and 5s: after a
	// long outage the slot is back at most MaxBackoff after the token is).
	MinBackoff, MaxBackoff time.Duration
	Logger                 *slog.Logger
}

// SlotError is a reason the slot cannot be brought up, with the operator's fix.
type SlotError struct {
	// Step is the bring-up step that failed: "slot", "token" or "login".
	Step   string
	Reason string
	Fix    string
	Err    error
}

func (e *SlotError) Error() string {
	s := e.Reason
	if e.Fix != "" {
		s += "; fix: " + e.Fix
	}
	return s
}
func (e *SlotError) Unwrap() error { return e.Err }

// Key names a key pair on the token: ID is the hex CKA_ID shared by both objects, Label the
// CKA_LABEL (the kid).
type Key struct {
	ID    string
	Label string
}

// SlotInfo describes the resolved slot and token.
type SlotInfo struct {
	SlotID       uint   `json:"slotId"`
	TokenLabel   string `json:"tokenLabel"`
	Serial       string `json:"serial"`
	Manufacturer string `json:"manufacturer"`
	Model        string `json:"model"`
	MaxRW        uint   `json:"maxRwSessions"`
}

type session struct {
	h pkcs11.SessionHandle
	p *pool
}

// pool is one generation of sessions: a rebuild creates a new pool and retires the old one, so
// a session from a dead generation can never be handed out again.
type pool struct {
	gen      uint64
	mod      *Module
	modGen   uint64
	info     SlotInfo
	ch       chan *session
	all      []*session
	dead     chan struct{}
	deadOnce sync.Once
	inflight atomic.Int64
	closed   int // sessions closed by closeRetired (supervisor goroutine only)

	canaryKey pkcs11.ObjectHandle
	canaryPub *ecdsa.PublicKey
	canaryErr error
}

func (p *pool) kill() { p.deadOnce.Do(func() { close(p.dead) }) }

type keyEntry struct {
	gen   uint64
	label string
	priv  pkcs11.ObjectHandle
}

// Slot serves one token through a fixed pool of logged-in sessions and rebuilds itself when the
// token fails. All methods are safe for concurrent use.
type Slot struct {
	cfg     Config
	log     *slog.Logger
	timeout time.Duration

	cur    atomic.Pointer[pool]
	keysMu sync.RWMutex
	keys   map[string]keyEntry // Key.ID -> private-key handle of one pool generation

	kick   chan struct{}
	closed chan struct{}
	done   chan struct{}
	once   sync.Once

	// owned by the build/supervisor goroutine (and Open before it starts)
	mod      *Module
	retired  []*pool
	buildGen uint64
	// failedGen is the library generation the last failed build ran against: re-initialise
	// only if nobody has done so since, or slots sharing the library finalise each other.
	failedGen uint64

	mu          sync.Mutex // guards the fields below
	lastErr     error
	stopRetry   bool
	capacity    int
	info        SlotInfo
	canaryAt    time.Time
	canaryLast  error
	downSince   time.Time
	everBuilt   bool
	lastRecover time.Duration

	waits, waitNanos, exhausted, opened, logins, searches, rebuilds atomic.Uint64
	errs                                                            []atomic.Uint64
}

var ecdsaMech = []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_ECDSA, nil)}

// Open validates cfg, tries to bring the slot up once and starts the background supervisor that
// keeps (re)building it. It fails only on configuration errors: an unreachable library, slot or
// a wrong PIN yield a Slot that is down, with LastError naming the fix.
func Open(ctx context.Context, cfg Config) (*Slot, error) {
	if strings.TrimSpace(cfg.Library) == "" {
		return nil, errors.New(`"library" is required: the path of the vendor's PKCS#11 module`)
	}
	if strings.TrimSpace(cfg.Slot) == "" {
		return nil, errors.New(`"slot" is required: a slot index (0, 1, …) or the token label`)
	}
	if cfg.PoolSize < 0 {
		return nil, fmt.Errorf(`"poolSize" must be positive, got %d`, cfg.PoolSize)
	}
	if cfg.AcquireTimeout < 0 || cfg.CanaryInterval < 0 {
		return nil, errors.New(`"acquireTimeout" and "canaryInterval" must not be negative`)
	}
	if cfg.AcquireTimeout == 0 {
		cfg.AcquireTimeout = 2 * time.Second
	}
	if cfg.MinBackoff <= 0 {
		cfg.MinBackoff = 50 * time.Millisecond
	}
	if cfg.MaxBackoff <= 0 {
		cfg.MaxBackoff = 5 * time.Second
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	s := &Slot{cfg: cfg, timeout: cfg.AcquireTimeout,
		log:  cfg.Logger.With("library", cfg.Library, "slot", cfg.Slot),
		kick: make(chan struct{}, 1), closed: make(chan struct{}), done: make(chan struct{}), keys: map[string]keyEntry{},
		errs: make([]atomic.Uint64, len(ckrNames))}
	s.mu.Lock()
	s.downSince = time.Now()
	s.mu.Unlock()
	if err := s.build(ctx, 0); err != nil {
		s.setDown(err)
	}
	go s.supervise()
	return s, nil
}

func (s *Slot) supervise() {
	defer close(s.done)
	backoff := s.cfg.MinBackoff
	attempt := 0
	var tick <-chan time.Time
	if s.cfg.CanaryInterval > 0 {
		t := time.NewTicker(s.cfg.CanaryInterval)
		defer t.Stop()
		tick = t.C
	}
	for {
		s.mu.Lock()
		stop := s.stopRetry
		s.mu.Unlock()
		if s.cur.Load() == nil && !stop {
			attempt++
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			err := s.build(ctx, attempt)
			cancel()
			if err == nil {
				backoff, attempt = s.cfg.MinBackoff, 0
				continue
			}
			s.setDown(err)
			s.log.Warn("pkcs11 slot rebuild failed", "attempt", attempt, "retry_in", backoff.String(), "error", err)
			select {
			case <-s.closed:
				return
			case <-time.After(backoff):
			}
			backoff = min(2*backoff, s.cfg.MaxBackoff)
			continue
		}
		select {
		case <-s.closed:
			return
		case <-s.kick:
		case <-tick:
			s.periodicCanary()
		}
	}
}

// needsReinit reports whether the library itself must be finalised and re-initialised: either
// the library says so, or reopening sessions alone has already failed.
func needsReinit(cause error, attempt int) bool {
	if rv, ok := rvOf(cause); ok {
		switch rv {
		case pkcs11.CKR_CRYPTOKI_NOT_INITIALIZED, pkcs11.CKR_DEVICE_REMOVED, pkcs11.CKR_TOKEN_NOT_PRESENT:
			return true
		}
	}
	return attempt >= 2 && ClassOf(cause) == ClassFatal
}

// build opens a fresh generation of sessions. It runs on the supervisor goroutine (or in Open,
// before the supervisor exists), so the fields it owns need no lock.
func (s *Slot) build(ctx context.Context, attempt int) error {
	s.mu.Lock()
	cause := s.lastErr
	s.mu.Unlock()
	if s.mod == nil {
		m, err := OpenModule(s.cfg.Library)
		if err != nil {
			return err
		}
		s.mod = m
	}
	m := s.mod
	if attempt > 0 && needsReinit(cause, attempt) {
		s.log.Info("re-initialising the PKCS#11 library (unless another slot already did)", "cause", cause)
		if err := m.reinitialize(s.failedGen); err != nil {
			if rv, ok := rvOf(err); ok {
				s.errs[ckrSlot(rv)].Add(1)
			}
			return fmt.Errorf("re-initialise library: %w", err)
		}
	}
	if err := m.ensure(); err != nil {
		return err
	}
	s.closeRetired(m)
	m.life.RLock()
	defer m.life.RUnlock()
	s.failedGen = m.Generation() // kept only if this build fails

	slotID, tok, err := s.resolve(m.ctx)
	if err != nil {
		return err
	}
	if tok.Flags&pkcs11.CKF_TOKEN_INITIALIZED == 0 {
		return &SlotError{Step: "token", Reason: fmt.Sprintf("the token in slot %d is not initialised", slotID), Fix: "initialise it with the vendor tool (e.g. softhsm2-util --init-token --slot N --label L)"}
	}
	if tok.Flags&pkcs11.CKF_LOGIN_REQUIRED != 0 && tok.Flags&pkcs11.CKF_USER_PIN_INITIALIZED == 0 {
		return &SlotError{Step: "token", Reason: fmt.Sprintf("the user PIN of token %q is not initialised", strings.TrimSpace(tok.Label)), Fix: "set the user PIN as security officer (e.g. pkcs11-tool --init-pin --login --so-pin …)"}
	}
	size := s.poolSize(tok)
	info := SlotInfo{SlotID: slotID, TokenLabel: strings.TrimSpace(tok.Label), Serial: strings.TrimSpace(tok.SerialNumber),
		Manufacturer: strings.TrimSpace(tok.ManufacturerID), Model: strings.TrimSpace(tok.Model), MaxRW: tok.MaxRwSessionCount}
	s.buildGen++
	p := &pool{gen: s.buildGen, mod: m, modGen: m.Generation(), info: info,
		ch: make(chan *session, size), dead: make(chan struct{})}
	flags := uint(pkcs11.CKF_SERIAL_SESSION)
	if !s.cfg.ReadOnly {
		flags |= pkcs11.CKF_RW_SESSION
	}
	fail := func(err error) error {
		for _, se := range p.all {
			_ = m.ctx.CloseSession(se.h)
		}
		return err
	}
	login := func() error {
		if tok.Flags&pkcs11.CKF_LOGIN_REQUIRED == 0 && s.cfg.PIN == "" {
			return nil
		}
		// Login state is application-wide: one C_Login serves every session of the token, and
		// it lasts as long as one session stays open, so it is never repeated per operation.
		s.logins.Add(1)
		if err := m.ctx.Login(p.all[0].h, pkcs11.CKU_USER, s.cfg.PIN); err != nil {
			if rv, _ := rvOf(err); rv != pkcs11.CKR_USER_ALREADY_LOGGED_IN {
				return s.loginError(info, s.call("C_Login", err))
			}
		}
		return nil
	}
	for i := 0; i < size; i++ {
		if err := ctx.Err(); err != nil {
			return fail(fmt.Errorf("open sessions: %w", err))
		}
		h, err := m.ctx.OpenSession(slotID, flags)
		if err != nil {
			return fail(fmt.Errorf("open session %d of %d: %w", i+1, size, s.call("C_OpenSession", err)))
		}
		s.opened.Add(1)
		p.all = append(p.all, &session{h: h, p: p})
		if i == 0 {
			// log in before opening the rest, so a wrong PIN costs one session, not a pool
			if err := login(); err != nil {
				return fail(err)
			}
		}
	}
	if err := s.setupCanary(p); err != nil {
		return fail(err)
	}
	for _, se := range p.all {
		p.ch <- se
	}
	s.dropHandles()
	s.mu.Lock()
	rebuilt := s.everBuilt
	s.everBuilt = true
	s.capacity, s.info, s.lastErr = size, info, nil
	s.canaryAt, s.canaryLast = time.Now(), p.canaryErr // build has just canary-signed
	if rebuilt {
		s.lastRecover = time.Since(s.downSince)
	}
	s.downSince = time.Time{}
	s.mu.Unlock()
	if rebuilt {
		s.rebuilds.Add(1)
	}
	s.retired = append(s.retired, p) // closed at Close or at the next rebuild
	s.cur.Store(p)
	s.log.Info("pkcs11 slot up", "slot_id", slotID, "token", info.TokenLabel, "sessions", size, "read_only", s.cfg.ReadOnly)
	return nil
}

// closeRetired closes the sessions of dead generations once their in-flight calls have drained.
// Sessions from before a library re-initialisation are gone already: closing their handles
// could close a new session that reuses the number, so they are only forgotten.
func (s *Slot) closeRetired(m *Module) {
	keep := s.retired[:0]
	for _, p := range s.retired {
		select {
		case <-p.dead:
		default:
			keep = append(keep, p) // the live pool
			continue
		}
		// Wait without holding the library lock, so calls that still need it can finish.
		deadline := time.Now().Add(2 * time.Second)
		for p.inflight.Load() > 0 && time.Now().Before(deadline) {
			time.Sleep(5 * time.Millisecond)
		}
		// Close only sessions that are back in the channel: one still held by a caller (a call
		// stuck in the library) must not be closed under it, which can crash the module; it is
		// closed at the next rebuild or at Close once it has been released.
		m.life.RLock()
		sameGen := p.modGen == m.Generation()
	drain:
		for {
			select {
			case se := <-p.ch:
				if sameGen {
					_ = m.ctx.CloseSession(se.h)
				}
				p.closed++
			default:
				break drain
			}
		}
		m.life.RUnlock()
		if p.closed < len(p.all) {
			s.log.Warn("pkcs11 sessions still in use by stuck calls; closing them later", "held", len(p.all)-p.closed)
			keep = append(keep, p)
		}
	}
	s.retired = keep
}

func (s *Slot) poolSize(tok pkcs11.TokenInfo) int {
	limit := tok.MaxRwSessionCount
	if s.cfg.ReadOnly {
		limit = tok.MaxSessionCount
	}
	bounded := limit != pkcs11.CK_EFFECTIVELY_INFINITE && limit != pkcs11.CK_UNAVAILABLE_INFORMATION
	size := s.cfg.PoolSize
	if size == 0 {
		// Signing is CPU-bound in the token (SoftHSM) or latency-bound on the wire (network
		// HSMs): two sessions per core keeps every core busy while others wait on the device.
		size = max(4, 2*runtime.GOMAXPROCS(0))
	}
	if bounded && uint(size) > limit {
		s.log.Warn("pool size clipped to the token's session limit", "requested", size, "limit", limit)
		size = int(limit)
	}
	return max(size, 1)
}

// resolve maps cfg.Slot onto a slot ID: digits index the slots that hold a token, anything else
// is matched against the trimmed token label.
func (s *Slot) resolve(ctx *pkcs11.Ctx) (uint, pkcs11.TokenInfo, error) {
	ids, err := ctx.GetSlotList(true)
	if err != nil {
		return 0, pkcs11.TokenInfo{}, s.call("C_GetSlotList", err)
	}
	want := strings.TrimSpace(s.cfg.Slot)
	if n, err := strconv.Atoi(want); err == nil {
		if n < 0 || n >= len(ids) {
			return 0, pkcs11.TokenInfo{}, &SlotError{Step: "slot", Reason: fmt.Sprintf("slot index %d is out of range: %d slot(s) hold a token", n, len(ids)),
				Fix: `use an index below the number of tokens, or the token label (list them with "kmsgate hsm slots --library ` + s.cfg.Library + `")`}
		}
		tok, err := ctx.GetTokenInfo(ids[n])
		if err != nil {
			return 0, tok, s.call("C_GetTokenInfo", err)
		}
		return ids[n], tok, nil
	}
	var labels []string
	for _, id := range ids {
		tok, err := ctx.GetTokenInfo(id)
		if err != nil {
			return 0, tok, s.call("C_GetTokenInfo", err)
		}
		l := strings.TrimSpace(tok.Label)
		if l == want && tok.Flags&pkcs11.CKF_TOKEN_INITIALIZED != 0 {
			return id, tok, nil
		}
		if tok.Flags&pkcs11.CKF_TOKEN_INITIALIZED != 0 {
			labels = append(labels, strconv.Quote(l))
		}
	}
	return 0, pkcs11.TokenInfo{}, &SlotError{Step: "slot", Reason: fmt.Sprintf("no initialised token labelled %q (labels present: %s)", want, strings.Join(labels, ", ")),
		Fix: `correct "slot" to one of the labels above, or initialise a token with that label`}
}

func (s *Slot) loginError(info SlotInfo, err error) error {
	rv, _ := rvOf(err)
	switch rv {
	case pkcs11.CKR_PIN_INCORRECT, pkcs11.CKR_PIN_INVALID, pkcs11.CKR_PIN_LEN_RANGE:
		// Retrying a wrong PIN would walk the token towards locking it: stop until restart.
		s.mu.Lock()
		s.stopRetry = true
		s.mu.Unlock()
		return &SlotError{Step: "login", Reason: fmt.Sprintf("login to token %q failed: wrong PIN (%s)", info.TokenLabel, CKRName(rv)),
			Fix: `correct the provider's "pin" (or the variable it references) and restart kmsgate; retries are stopped so the token's PIN is not locked`, Err: err}
	case pkcs11.CKR_PIN_LOCKED:
		s.mu.Lock()
		s.stopRetry = true
		s.mu.Unlock()
		return &SlotError{Step: "login", Reason: fmt.Sprintf("the user PIN of token %q is locked", info.TokenLabel), Fix: "unlock/reset the user PIN as security officer", Err: err}
	case pkcs11.CKR_USER_PIN_NOT_INITIALIZED:
		return &SlotError{Step: "login", Reason: fmt.Sprintf("the user PIN of token %q is not initialised", info.TokenLabel), Fix: "set the user PIN as security officer", Err: err}
	}
	return &SlotError{Step: "login", Reason: fmt.Sprintf("login to token %q failed (%s)", info.TokenLabel, CKRName(rv)),
		Fix: "check the token with the vendor tool; the PIN itself is never shown", Err: err}
}

// setupCanary makes a throw-away key pair as session objects (they need no write access to the
// token and vanish with the session) and proves the slot signs correctly before it goes up.
func (s *Slot) setupCanary(p *pool) error {
	h := p.all[0].h
	ctx := p.mod.ctx
	pub, priv, err := ctx.GenerateKeyPair(h, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_EC_KEY_PAIR_GEN, nil)},
		[]*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_TOKEN, false), pkcs11.NewAttribute(pkcs11.CKA_VERIFY, true),
			pkcs11.NewAttribute(pkcs11.CKA_EC_PARAMS, p256Params), pkcs11.NewAttribute(pkcs11.CKA_LABEL, "kmsgate-canary"),
		},
		[]*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_TOKEN, false), pkcs11.NewAttribute(pkcs11.CKA_SIGN, true),
			pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true), pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, true),
			pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, false), pkcs11.NewAttribute(pkcs11.CKA_LABEL, "kmsgate-canary"),
		})
	if err != nil {
		err = s.call("C_GenerateKeyPair", err)
		if ClassOf(err) == ClassFatal {
			return fmt.Errorf("canary key: %w", err)
		}
		p.canaryErr = fmt.Errorf("canary unavailable: the token cannot generate a P-256 session key: %w", err)
		s.log.Warn("pkcs11 canary disabled", "error", err)
		return nil
	}
	pk, err := s.readPoint(ctx, h, pub)
	if err != nil {
		return fmt.Errorf("canary key: %w", err)
	}
	p.canaryKey, p.canaryPub = priv, pk
	return s.canarySign(p, p.all[0])
}

var canaryMsg = []byte("kmsgate pkcs11 canary")

func (s *Slot) canarySign(p *pool, se *session) error {
	if p.canaryErr != nil {
		return p.canaryErr
	}
	d := sha256.Sum256(canaryMsg)
	sig, err := s.signRaw(se, p.canaryKey, d[:])
	if err != nil {
		return fmt.Errorf("canary sign: %w", err)
	}
	if !keyutil.VerifyRawDigest(p.canaryPub, d[:], sig) {
		return errors.New("canary signature does not verify: the token returned a wrong signature")
	}
	return nil
}

// Canary signs with the slot's session key and verifies the result in Go.
func (s *Slot) Canary(ctx context.Context) error {
	se, err := s.acquire(ctx)
	if err != nil {
		return err
	}
	return s.canaryOn(se)
}

// periodicCanary runs the canary only if a session is idle: a saturated pool is busy signing,
// which is proof enough, and waiting would count as pool pressure.
func (s *Slot) periodicCanary() {
	p := s.cur.Load()
	if p == nil {
		return
	}
	if se := s.tryAcquire(p); se != nil {
		_ = s.canaryOn(se)
	}
}

func (s *Slot) canaryOn(se *session) error {
	err := s.enter(se)
	if err == nil {
		err = s.canarySign(se.p, se)
		s.leave(se)
	}
	s.release(se, err)
	s.mu.Lock()
	s.canaryAt, s.canaryLast = time.Now(), err
	s.mu.Unlock()
	return err
}
