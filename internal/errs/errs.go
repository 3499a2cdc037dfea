// Package errs is kmsgate's classified error: a closed set of kinds that the API maps to HTTP
// statuses without knowing which layer or backend failed, plus a stable code and a caller-safe
// message. It is a leaf: every layer (hsm excepted, which has its own CKR classification) uses it.
//
// A Kind is itself the sentinel: errors.Is(err, errs.NotFound) holds for any *Error of that kind.
// Kinds are constants, so no package can change what a sentinel means.
package errs

import (
	"errors"
	"fmt"
	"time"
)

// Kind classifies an error. The set is closed; the zero value is Internal.
type Kind int

const (
	Internal     Kind = iota // failed in a way the caller cannot fix
	NotFound                 // the key (or record) does not exist
	NotSupported             // the provider cannot do this (import on pkcs11, another curve…)
	Unavailable              // backend or store down, slot being rebuilt, pool exhausted: retry later
	Throttled                // a backend rate-limited us: retry after RetryAfter
	BadInput                 // the caller's input is invalid (bad JWK, digest length…)
	Conflict                 // the key already exists
	Forbidden                // refused (read-only token, policy, quota)
)

var kindNames = [...]string{"internal", "not_found", "not_supported", "unavailable", "throttled",
	"bad_input", "conflict", "forbidden"}

func (k Kind) String() string {
	if k >= 0 && int(k) < len(kindNames) {
		return kindNames[k]
	}
	return "internal"
}

// Error makes a Kind usable as an errors.Is target.
func (k Kind) Error() string { return k.String() }

// Error is a classified error. Msg is safe to show to API callers (it never holds secrets or a
// backend's own text); Err is the wrapped cause, for logs and errors.Is/As.
type Error struct {
	Kind       Kind
	Provider   string
	Op         string
	Msg        string
	Err        error
	RetryAfter time.Duration
	// Code, when set, is the stable API error code to report instead of the kind's default.
	Code string
}

func (e *Error) Error() string {
	s := e.Msg
	if e.Op != "" {
		s = e.Op + ": " + s
	}
	if e.Provider != "" {
		s = "provider " + e.Provider + ": " + s
	}
	if e.Err != nil {
		s += ": " + e.Err.Error()
	}
	return s
}

func (e *Error) Unwrap() error { return e.Err }

// Is matches a Kind target: errors.Is(err, errs.NotFound).
func (e *Error) Is(target error) bool {
	k, ok := target.(Kind)
	return ok && k == e.Kind
}

// WithCode sets the stable API code and returns e.
func (e *Error) WithCode(code string) *Error { e.Code = code; return e }

// Errorf builds a classified error. The formatted message must not contain secrets.
func Errorf(kind Kind, format string, args ...any) *Error {
	return &Error{Kind: kind, Msg: fmt.Sprintf(format, args...)}
}

// Wrap classifies cause. msg is the caller-safe description; cause stays available to logs.
func Wrap(kind Kind, cause error, msg string) *Error {
	return &Error{Kind: kind, Msg: msg, Err: cause}
}

// KindOf reports the kind of err; unclassified errors are Internal.
func KindOf(err error) Kind {
	var e *Error
	if errors.As(err, &e) {
		return e.Kind
	}
	var k Kind
	if errors.As(err, &k) {
		return k
	}
	return Internal
}

// RetryAfterOf reports a backend's retry hint (0 when it gave none).
func RetryAfterOf(err error) time.Duration {
	var e *Error
	if errors.As(err, &e) {
		return e.RetryAfter
	}
	return 0
}

// PublicMessage returns the caller-safe part of err: the classified message, never the cause.
func PublicMessage(err error) string {
	var e *Error
	if errors.As(err, &e) {
		if e.Op != "" {
			return e.Op + ": " + e.Msg
		}
		return e.Msg
	}
	return "internal error"
}

// CodeOf returns the explicit stable code of err, or "" when it has none.
func CodeOf(err error) string {
	var e *Error
	if errors.As(err, &e) {
		return e.Code
	}
	return ""
}
