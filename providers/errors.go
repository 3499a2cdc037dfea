package providers

import (
	"errors"
	"fmt"
	"time"
)

// Kind classifies a provider error so the API can map it to an HTTP status without knowing the
// backend. The set is closed; the zero value is KindInternal.
type Kind int

const (
	KindInternal     Kind = iota // backend failed in a way the caller cannot fix
	KindNotFound                 // the key does not exist in the backend
	KindNotSupported             // the provider cannot do this (import on pkcs11, another curve…)
	KindUnavailable              // backend down, slot being rebuilt, pool exhausted: retry later
	KindThrottled                // backend rate-limited us: retry after RetryAfter
	KindBadInput                 // the caller's input is invalid (bad JWK, digest length…)
	KindConflict                 // the key already exists
	KindForbidden                // the provider refuses (read-only token, policy)
)

var kindNames = [...]string{"internal", "not_found", "not_supported", "unavailable", "throttled",
	"bad_input", "conflict", "forbidden"}

func (k Kind) String() string {
	if int(k) < len(kindNames) {
		return kindNames[k]
	}
	return "internal"
}

// Sentinels for errors.Is: errors.Is(err, providers.ErrNotFound) holds for any *Error of that kind.
var (
	ErrNotFound     = &Error{Kind: KindNotFound, Msg: "key not found"}
	ErrNotSupported = &Error{Kind: KindNotSupported, Msg: "operation not supported by this provider"}
	ErrUnavailable  = &Error{Kind: KindUnavailable, Msg: "provider unavailable"}
	ErrThrottled    = &Error{Kind: KindThrottled, Msg: "provider throttled the request"}
	ErrBadInput     = &Error{Kind: KindBadInput, Msg: "invalid input"}
	ErrConflict     = &Error{Kind: KindConflict, Msg: "key already exists"}
	ErrForbidden    = &Error{Kind: KindForbidden, Msg: "operation refused by provider"}
)

// Error is a classified provider error. Msg is safe to show to API callers (it never holds
// secrets); Err is the wrapped cause for logs and errors.Is/As.
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

// Is makes errors.Is(err, ErrNotFound) match on kind, whatever the message.
func (e *Error) Is(target error) bool {
	t, ok := target.(*Error)
	return ok && t.Msg != "" && t.Provider == "" && t.Op == "" && t.Err == nil && t.Code == "" &&
		t.Kind == e.Kind
}

// Errorf builds a classified error. The formatted message must not contain secrets.
func Errorf(kind Kind, format string, args ...any) *Error {
	return &Error{Kind: kind, Msg: fmt.Sprintf(format, args...)}
}

// Wrap classifies cause. msg is the caller-safe description; cause stays available to logs.
func Wrap(kind Kind, cause error, msg string) *Error {
	return &Error{Kind: kind, Msg: msg, Err: cause}
}

// KindOf reports the kind of err; unclassified errors are KindInternal.
func KindOf(err error) Kind {
	var e *Error
	if errors.As(err, &e) {
		return e.Kind
	}
	return KindInternal
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

// WithCode sets the stable API code and returns e.
func (e *Error) WithCode(code string) *Error { e.Code = code; return e }

// CodeOf returns the explicit stable code of err, or "" when it has none.
func CodeOf(err error) string {
	var e *Error
	if errors.As(err, &e) {
		return e.Code
	}
	return ""
}

// CheckES256 refuses every algorithm but ES256 ("" means the default, ES256) with a
// KindNotSupported error, so a provider never signs with a curve or hash the caller did not ask
// for.
func CheckES256(provider, op, alg string) error {
	if alg == "" || alg == ES256 {
		return nil
	}
	return &Error{Kind: KindNotSupported, Provider: provider, Op: op, Code: "unsupported_alg",
		Msg: fmt.Sprintf("algorithm %q is not supported (supported: ES256)", alg)}
}
