package hsm

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/miekg/pkcs11"
)

// SlotReport describes one slot for operators ("kmsgate hsm slots").
type SlotReport struct {
	SlotID       uint     `json:"slotId"`
	Index        int      `json:"index"` // position among slots holding a token, as "slot" takes it; -1 without a token
	Description  string   `json:"description"`
	TokenPresent bool     `json:"tokenPresent"`
	Label        string   `json:"label,omitempty"`
	Serial       string   `json:"serial,omitempty"`
	Manufacturer string   `json:"manufacturer,omitempty"`
	Model        string   `json:"model,omitempty"`
	Flags        []string `json:"flags,omitempty"`
	MaxSessions  string   `json:"maxSessions,omitempty"`
	MaxRWSession string   `json:"maxRwSessions,omitempty"`
	ECKeyPairGen bool     `json:"ecKeyPairGen"`
	ECDSA        bool     `json:"ecdsa"`
	Error        string   `json:"error,omitempty"`
}

var tokenFlags = []struct {
	f    uint
	name string
}{
	{pkcs11.CKF_TOKEN_INITIALIZED, "initialized"}, {pkcs11.CKF_USER_PIN_INITIALIZED, "user-pin-initialized"},
	{pkcs11.CKF_LOGIN_REQUIRED, "login-required"}, {pkcs11.CKF_WRITE_PROTECTED, "write-protected"},
	{pkcs11.CKF_RNG, "rng"}, {pkcs11.CKF_PROTECTED_AUTHENTICATION_PATH, "protected-auth-path"},
	{pkcs11.CKF_USER_PIN_LOCKED, "user-pin-locked"}, {pkcs11.CKF_USER_PIN_COUNT_LOW, "user-pin-count-low"},
	{pkcs11.CKF_SO_PIN_LOCKED, "so-pin-locked"},
}

func sessionLimit(v uint) string {
	switch v {
	case pkcs11.CK_EFFECTIVELY_INFINITE:
		return "unlimited"
	case pkcs11.CK_UNAVAILABLE_INFORMATION:
		return "unknown"
	}
	return fmt.Sprint(v)
}

// ListSlots loads the library and describes every slot, without logging in.
func ListSlots(path string) ([]SlotReport, error) {
	m, err := OpenModule(path)
	if err != nil {
		return nil, err
	}
	defer m.Close()
	m.life.RLock()
	defer m.life.RUnlock()
	c := m.ctx
	all, err := c.GetSlotList(false)
	if err != nil {
		return nil, opErr("C_GetSlotList", err)
	}
	withToken, err := c.GetSlotList(true)
	if err != nil {
		return nil, opErr("C_GetSlotList", err)
	}
	index := map[uint]int{}
	for i, id := range withToken {
		index[id] = i
	}
	out := make([]SlotReport, 0, len(all))
	for _, id := range all {
		r := SlotReport{SlotID: id, Index: -1}
		if si, err := c.GetSlotInfo(id); err == nil {
			r.Description = strings.TrimSpace(si.SlotDescription)
		}
		i, ok := index[id]
		if !ok {
			out = append(out, r)
			continue
		}
		r.Index, r.TokenPresent = i, true
		ti, err := c.GetTokenInfo(id)
		if err != nil {
			r.Error = opErr("C_GetTokenInfo", err).Error()
			out = append(out, r)
			continue
		}
		r.Label, r.Serial = strings.TrimSpace(ti.Label), strings.TrimSpace(ti.SerialNumber)
		r.Manufacturer, r.Model = strings.TrimSpace(ti.ManufacturerID), strings.TrimSpace(ti.Model)
		for _, f := range tokenFlags {
			if ti.Flags&f.f != 0 {
				r.Flags = append(r.Flags, f.name)
			}
		}
		r.MaxSessions, r.MaxRWSession = sessionLimit(ti.MaxSessionCount), sessionLimit(ti.MaxRwSessionCount)
		if mechs, err := c.GetMechanismList(id); err == nil {
			for _, mc := range mechs {
				switch mc.Mechanism {
				case pkcs11.CKM_EC_KEY_PAIR_GEN:
					r.ECKeyPairGen = true
				case pkcs11.CKM_ECDSA:
					r.ECDSA = true
				}
			}
		} else {
			r.Error = opErr("C_GetMechanismList", err).Error()
		}
		out = append(out, r)
	}
	return out, nil
}

// Check is one step of a diagnosis.
type Check struct {
	Name   string `json:"name"`
	OK     bool   `json:"ok"`
	Detail string `json:"detail,omitempty"`
	Fix    string `json:"fix,omitempty"`
}

// Diagnose walks the bring-up of cfg step by step — library loads, slot resolves, login works,
// canary signature verifies — and stops at the first failing step with its fix. It never
// includes the PIN in its output.
func Diagnose(ctx context.Context, cfg Config) []Check {
	steps := []string{"library loads", "slot resolves", "login works", "canary sign verifies"}
	var out []Check
	fail := func(step int, detail, fix string) []Check {
		out = append(out, Check{Name: steps[step], Detail: detail, Fix: fix})
		for _, s := range steps[step+1:] {
			out = append(out, Check{Name: s, Detail: "not run"})
		}
		return out
	}
	if err := CheckLibrary(cfg.Library); err != nil {
		var le *LoadError
		if errors.As(err, &le) {
			return fail(0, le.Reason, le.Fix)
		}
		return fail(0, err.Error(), "")
	}
	cfg.PoolSize = 1
	cfg.CanaryInterval = 0
	cfg.MaxBackoff = time.Hour // one attempt is enough for a diagnosis
	s, err := Open(ctx, cfg)
	if err != nil {
		return fail(0, err.Error(), "correct the configuration")
	}
	defer s.Close()
	if err := s.LastError(); err != nil {
		var le *LoadError
		var se *SlotError
		switch {
		case errors.As(err, &le):
			return fail(0, le.Reason, le.Fix)
		case errors.As(err, &se) && (se.Step == "slot" || se.Step == "token"):
			out = append(out, Check{Name: steps[0], OK: true, Detail: cfg.Library})
			return fail(1, se.Reason, se.Fix)
		case errors.As(err, &se):
			out = append(out, Check{Name: steps[0], OK: true, Detail: cfg.Library}, Check{Name: steps[1], OK: true})
			return fail(2, se.Reason, se.Fix)
		default:
			out = append(out, Check{Name: steps[0], OK: true, Detail: cfg.Library})
			return fail(1, err.Error(), "check the token with the vendor tool (kmsgate hsm slots --library "+cfg.Library+")")
		}
	}
	info := s.Stats().Slot
	out = append(out, Check{Name: steps[0], OK: true, Detail: cfg.Library},
		Check{Name: steps[1], OK: true, Detail: fmt.Sprintf("slot %d, token %q, serial %s", info.SlotID, info.TokenLabel, info.Serial)},
		Check{Name: steps[2], OK: true, Detail: "CKU_USER"})
	if err := s.Canary(ctx); err != nil {
		return fail(3, err.Error(), "the token cannot sign with a P-256 session key: check its mechanisms with kmsgate hsm slots")
	}
	return append(out, Check{Name: steps[3], OK: true, Detail: "ES256 signature verified in Go"})
}
