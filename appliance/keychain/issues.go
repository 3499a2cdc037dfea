package keychain

import (
	"errors"

	"github.com/kmsgate/kmsgate/internal/errs"
)

// Issue codes of a failed request member, as EUDIPLO's zod validation names them: the /key-chain
// face reports them in errors[].code so clients written against EUDIPLO read the same codes.
const (
	IssueInvalidType       = "invalid_type"
	IssueInvalidValue      = "invalid_value"
	IssueUnrecognizedKeys  = "unrecognized_keys"
	IssueTooSmall          = "too_small"
	IssueTooBig            = "too_big"
	IssueInvalidFormat     = "invalid_format"
	IssueCustom            = "custom"
	fieldActiveCertificate = "activeCertificate"
)

// fieldError is a failure about one member of the request body. It wraps the classified error
// (so status, code and message are unchanged) and adds where the member is, as zod's path from
// the body's root (member names and array indexes), and the zod issue code.
type fieldError struct {
	err   error
	path  []any
	issue string
}

func (e *fieldError) Error() string { return e.err.Error() }
func (e *fieldError) Unwrap() error { return e.err }

// FieldPath is the member's path from the request body's root.
func (e *fieldError) FieldPath() []any { return e.path }

// IssueCode is the zod issue code of the failure.
func (e *fieldError) IssueCode() string { return e.issue }

// at places err at a member of the request. Only a caller's mistake (BadInput) gets a place: a
// backend failure is not about the request's members. An error that already has a place keeps
// it (the innermost one is the most precise).
func at(err error, issue string, path ...any) error {
	if err == nil || errs.KindOf(err) != errs.BadInput {
		return err
	}
	var fe *fieldError
	if errors.As(err, &fe) {
		return err
	}
	return &fieldError{err: err, path: path, issue: issue}
}

// badField is a 400 about the member at path.
func badField(issue string, path []any, code, format string, args ...any) error {
	return at(badRequest(code, format, args...), issue, path...)
}

// entryPath is the path of entry i of a certificate member: crt and activeCrt are arrays, the
// update's activeCertificate is one PEM string.
func entryPath(field string, i int) []any {
	if field == fieldActiveCertificate {
		return []any{field}
	}
	return []any{field, i}
}
