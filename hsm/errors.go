package hsm

import (
	"errors"
	"fmt"

	"github.com/miekg/pkcs11"
)

// Class says who has to act on a PKCS#11 return code.
type Class int

const (
	// ClassRequest: the request failed but the slot is fine (unknown codes land here too).
	ClassRequest Class = iota
	// ClassFatal: the slot's sessions, login or library state are gone; the slot must be rebuilt.
	ClassFatal
	// ClassStaleHandle: a cached object handle no longer names the object; re-find and retry once.
	ClassStaleHandle
	// ClassCaller: the input or the key does not fit the operation (caller's fault).
	ClassCaller
	// ClassConfig: the operator must fix the configuration (PIN, token initialisation).
	ClassConfig
)

// Classify maps a PKCS#11 return code to a Class.
func Classify(rv uint) Class {
	switch rv {
	case pkcs11.CKR_DEVICE_ERROR, pkcs11.CKR_DEVICE_REMOVED, pkcs11.CKR_DEVICE_MEMORY,
		pkcs11.CKR_TOKEN_NOT_PRESENT, pkcs11.CKR_TOKEN_NOT_RECOGNIZED,
		pkcs11.CKR_SESSION_HANDLE_INVALID, pkcs11.CKR_SESSION_CLOSED, pkcs11.CKR_USER_NOT_LOGGED_IN,
		pkcs11.CKR_CRYPTOKI_NOT_INITIALIZED, pkcs11.CKR_GENERAL_ERROR, pkcs11.CKR_SLOT_ID_INVALID,
		pkcs11.CKR_OPERATION_ACTIVE, pkcs11.CKR_SESSION_COUNT:
		return ClassFatal
	case pkcs11.CKR_OBJECT_HANDLE_INVALID, pkcs11.CKR_KEY_HANDLE_INVALID:
		return ClassStaleHandle
	case pkcs11.CKR_DATA_INVALID, pkcs11.CKR_DATA_LEN_RANGE, pkcs11.CKR_ARGUMENTS_BAD,
		pkcs11.CKR_KEY_TYPE_INCONSISTENT, pkcs11.CKR_KEY_FUNCTION_NOT_PERMITTED,
		pkcs11.CKR_MECHANISM_INVALID, pkcs11.CKR_MECHANISM_PARAM_INVALID,
		pkcs11.CKR_ATTRIBUTE_VALUE_INVALID, pkcs11.CKR_TEMPLATE_INCOMPLETE,
		pkcs11.CKR_TEMPLATE_INCONSISTENT, pkcs11.CKR_DOMAIN_PARAMS_INVALID,
		pkcs11.CKR_CURVE_NOT_SUPPORTED, pkcs11.CKR_SESSION_READ_ONLY:
		return ClassCaller
	case pkcs11.CKR_PIN_INCORRECT, pkcs11.CKR_PIN_LOCKED, pkcs11.CKR_PIN_EXPIRED,
		pkcs11.CKR_PIN_INVALID, pkcs11.CKR_PIN_LEN_RANGE, pkcs11.CKR_USER_PIN_NOT_INITIALIZED,
		pkcs11.CKR_USER_TYPE_INVALID:
		return ClassConfig
	}
	return ClassRequest
}

// ckrNames is the closed set of return-code names the error counters use; anything else is
// counted as "other" so a misbehaving library cannot blow up metric cardinality.
var ckrNames = []string{
	"CKR_GENERAL_ERROR", "CKR_FUNCTION_FAILED", "CKR_ARGUMENTS_BAD", "CKR_DATA_INVALID",
	"CKR_DATA_LEN_RANGE", "CKR_DEVICE_ERROR", "CKR_DEVICE_MEMORY", "CKR_DEVICE_REMOVED",
	"CKR_KEY_HANDLE_INVALID", "CKR_KEY_TYPE_INCONSISTENT", "CKR_KEY_FUNCTION_NOT_PERMITTED",
	"CKR_MECHANISM_INVALID", "CKR_OBJECT_HANDLE_INVALID", "CKR_OPERATION_ACTIVE",
	"CKR_PIN_INCORRECT", "CKR_PIN_LOCKED", "CKR_SESSION_CLOSED", "CKR_SESSION_COUNT",
	"CKR_SESSION_HANDLE_INVALID", "CKR_SESSION_READ_ONLY", "CKR_SLOT_ID_INVALID",
	"CKR_TEMPLATE_INCONSISTENT", "CKR_TOKEN_NOT_PRESENT", "CKR_TOKEN_NOT_RECOGNIZED",
	"CKR_USER_NOT_LOGGED_IN", "CKR_USER_PIN_NOT_INITIALIZED", "CKR_CRYPTOKI_NOT_INITIALIZED",
	"CKR_ATTRIBUTE_VALUE_INVALID", "CKR_FUNCTION_NOT_SUPPORTED", "CKR_HOST_MEMORY",
	"other",
}

var ckrIndex = func() map[uint]int {
	m := make(map[uint]int, len(ckrNames))
	for i, n := range ckrNames {
		if n == "other" {
			continue
		}
		for code, name := range codeNames {
			if name == n {
				m[code] = i
			}
		}
	}
	return m
}()

var codeNames = map[uint]string{
	pkcs11.CKR_GENERAL_ERROR: "CKR_GENERAL_ERROR", pkcs11.CKR_FUNCTION_FAILED: "CKR_FUNCTION_FAILED",
	pkcs11.CKR_ARGUMENTS_BAD: "CKR_ARGUMENTS_BAD", pkcs11.CKR_DATA_INVALID: "CKR_DATA_INVALID",
	pkcs11.CKR_DATA_LEN_RANGE: "CKR_DATA_LEN_RANGE", pkcs11.CKR_DEVICE_ERROR: "CKR_DEVICE_ERROR",
	pkcs11.CKR_DEVICE_MEMORY: "CKR_DEVICE_MEMORY", pkcs11.CKR_DEVICE_REMOVED: "CKR_DEVICE_REMOVED",
	pkcs11.CKR_KEY_HANDLE_INVALID: "CKR_KEY_HANDLE_INVALID", pkcs11.CKR_KEY_TYPE_INCONSISTENT: "CKR_KEY_TYPE_INCONSISTENT",
	pkcs11.CKR_KEY_FUNCTION_NOT_PERMITTED: "CKR_KEY_FUNCTION_NOT_PERMITTED", pkcs11.CKR_MECHANISM_INVALID: "CKR_MECHANISM_INVALID",
	pkcs11.CKR_OBJECT_HANDLE_INVALID: "CKR_OBJECT_HANDLE_INVALID", pkcs11.CKR_OPERATION_ACTIVE: "CKR_OPERATION_ACTIVE",
	pkcs11.CKR_PIN_INCORRECT: "CKR_PIN_INCORRECT", pkcs11.CKR_PIN_LOCKED: "CKR_PIN_LOCKED",
	pkcs11.CKR_SESSION_CLOSED: "CKR_SESSION_CLOSED", pkcs11.CKR_SESSION_COUNT: "CKR_SESSION_COUNT",
	pkcs11.CKR_SESSION_HANDLE_INVALID: "CKR_SESSION_HANDLE_INVALID", pkcs11.CKR_SESSION_READ_ONLY: "CKR_SESSION_READ_ONLY",
	pkcs11.CKR_SLOT_ID_INVALID: "CKR_SLOT_ID_INVALID", pkcs11.CKR_TEMPLATE_INCONSISTENT: "CKR_TEMPLATE_INCONSISTENT",
	pkcs11.CKR_TOKEN_NOT_PRESENT: "CKR_TOKEN_NOT_PRESENT", pkcs11.CKR_TOKEN_NOT_RECOGNIZED: "CKR_TOKEN_NOT_RECOGNIZED",
	pkcs11.CKR_USER_NOT_LOGGED_IN: "CKR_USER_NOT_LOGGED_IN", pkcs11.CKR_USER_PIN_NOT_INITIALIZED: "CKR_USER_PIN_NOT_INITIALIZED",
	pkcs11.CKR_CRYPTOKI_NOT_INITIALIZED: "CKR_CRYPTOKI_NOT_INITIALIZED", pkcs11.CKR_ATTRIBUTE_VALUE_INVALID: "CKR_ATTRIBUTE_VALUE_INVALID",
	pkcs11.CKR_FUNCTION_NOT_SUPPORTED: "CKR_FUNCTION_NOT_SUPPORTED", pkcs11.CKR_HOST_MEMORY: "CKR_HOST_MEMORY",
}

// CKRNames lists every label the error counters can carry.
func CKRNames() []string { return append([]string(nil), ckrNames...) }

func ckrSlot(rv uint) int {
	if i, ok := ckrIndex[rv]; ok {
		return i
	}
	return len(ckrNames) - 1
}

// CKRName is the counter label of rv (a closed set; unknown codes are "other").
func CKRName(rv uint) string { return ckrNames[ckrSlot(rv)] }

// rvOf extracts the return code from a miekg/pkcs11 error.
func rvOf(err error) (uint, bool) {
	var pe pkcs11.Error
	if errors.As(err, &pe) {
		return uint(pe), true
	}
	return 0, false
}

// ClassOf classifies err; errors that carry no return code are request failures.
func ClassOf(err error) Class {
	if err == nil {
		return ClassRequest
	}
	if rv, ok := rvOf(err); ok {
		return Classify(rv)
	}
	return ClassRequest
}

// Sentinel errors the provider maps onto its error kinds.
var (
	// ErrSlotDown: the slot is being rebuilt or cannot be reached; retry later.
	ErrSlotDown = errors.New("slot is down")
	// ErrPoolExhausted: every session stayed busy for the whole wait bound.
	ErrPoolExhausted = errors.New("no free PKCS#11 session")
	// ErrKeyNotFound: no object with this CKA_ID and label.
	ErrKeyNotFound = errors.New("key not found on the token")
	// ErrReadOnly: the slot was opened read-only.
	ErrReadOnly = errors.New("slot is read-only")
	// ErrClosed: the slot was closed.
	ErrClosed = errors.New("slot is closed")
	// ErrBadKey: the token returned key material that is not a P-256 point.
	ErrBadKey = errors.New("token returned an invalid EC public key")
	// ErrNotP256: the key signs, but not with P-256 (only ES256 is supported).
	ErrNotP256 = errors.New("the key is not a P-256 key; only ES256 is supported")
)

// OpError is a failed PKCS#11 call with its return code, for errors.As.
type OpError struct {
	Op  string
	RV  uint
	Err error
}

func (e *OpError) Error() string { return fmt.Sprintf("%s: %v", e.Op, e.Err) }
func (e *OpError) Unwrap() error { return e.Err }

// Class of the underlying return code.
func (e *OpError) Class() Class { return Classify(e.RV) }

func opErr(op string, err error) error {
	if err == nil {
		return nil
	}
	rv, _ := rvOf(err)
	return &OpError{Op: op, RV: rv, Err: err}
}
