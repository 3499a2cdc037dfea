package api

import (
	"bytes"
	"encoding"
	"encoding/json"
	"errors"
	"reflect"
	"strconv"
	"strings"
	"time"

	"github.com/gofiber/fiber/v2"

	"github.com/kmsgate/kmsgate/appliance/keychain"
)

// kcProblem is the 400 body of every /key-chain route: kmsgate's {error, code}, and for clients
// written against EUDIPLO its validation body {statusCode, message, errors[], timestamp} (the
// shape of EUDIPLO's zod pipe), so both kinds of client read the same answer.
type kcProblem struct {
	Error      string    `json:"error"`
	Code       string    `json:"code"`
	StatusCode int       `json:"statusCode"`
	Message    string    `json:"message"`
	Errors     []kcIssue `json:"errors"`
	Timestamp  string    `json:"timestamp"`
}

// kcIssue is one entry of errors[]: zod's path (member names and array indexes from the body's
// root; for an unknown member, the object holding it, with the member in keys), a message and
// zod's issue code.
type kcIssue struct {
	Path    []any    `json:"path"`
	Message string   `json:"message"`
	Code    string   `json:"code"`
	Keys    []string `json:"keys,omitempty"`
}

// validationMessage is the message of EUDIPLO's validation 400s.
const validationMessage = "Validation failed"

// validationCodes are the kmsgate codes of a body that does not have the request's shape: their
// upstream message is "Validation failed"; any other 400 carries its own message.
var validationCodes = map[string]bool{"validation_failed": true, "unknown_field": true, "invalid_type": true,
	"invalid_json": true, "empty_body": true, "invalid_base64": true}

// issueOf maps the kmsgate code of a request failure to a zod issue code when it names none.
var issueOf = map[string]string{"unknown_field": keychain.IssueUnrecognizedKeys, "invalid_type": keychain.IssueInvalidType,
	"empty_body": keychain.IssueInvalidType}

// placed is a failure placed at a member of the request body (appliance/keychain's field errors).
type placed interface {
	FieldPath() []any
	IssueCode() string
}

// kcErrors answers a 400 of a /key-chain route with the two-sided body; every other error goes on
// to the common handler and keeps the plain {error, code}.
func (s *Server) kcErrors(c *fiber.Ctx) error {
	err := c.Next()
	if err == nil {
		return nil
	}
	cl := classify(err)
	if cl.status != fiber.StatusBadRequest {
		return err
	}
	return c.Status(fiber.StatusBadRequest).JSON(kcProblemOf(err, cl, time.Now()))
}

func kcProblemOf(err error, cl classified, now time.Time) kcProblem {
	is := kcIssue{Path: []any{}, Message: cl.msg, Code: keychain.IssueCustom}
	var ae *apiError
	var pl placed
	switch {
	case errors.As(err, &ae) && (ae.path != nil || ae.issue != ""):
		if ae.path != nil {
			is.Path = ae.path
		}
		is.Keys = ae.keys
		if ae.issue != "" {
			is.Code = ae.issue
		}
	case errors.As(err, &pl):
		if p := pl.FieldPath(); p != nil {
			is.Path = p
		}
		if ic := pl.IssueCode(); ic != "" {
			is.Code = ic
		}
	}
	if ic, ok := issueOf[cl.code]; ok && is.Code == keychain.IssueCustom {
		is.Code = ic
	}
	msg := cl.msg
	if validationCodes[cl.code] {
		msg = validationMessage
	}
	return kcProblem{Error: cl.msg, Code: cl.code, StatusCode: fiber.StatusBadRequest, Message: msg,
		Errors: []kcIssue{is}, Timestamp: now.UTC().Format("2006-01-02T15:04:05.000Z07:00")}
}

// kcDecode is decodeJSON for the /key-chain bodies, with the failing member placed: an unknown
// member or a value of the wrong type is located in the body (encoding/json names neither the
// object of an unknown member nor always the full path).
func kcDecode(c *fiber.Ctx, v any) error {
	err := decodeJSON(c, v)
	var ae *apiError
	if err == nil || !errors.As(err, &ae) || (ae.code != "unknown_field" && ae.code != "invalid_type") {
		return err
	}
	placed := *ae
	placed.path = []any{}
	if is, ok := firstMismatch(c.Body(), reflect.TypeOf(v)); ok {
		placed.path, placed.issue = is.path, is.issue
		if is.key != "" {
			placed.keys = []string{is.key}
		}
	}
	return &placed
}

// placeAt places an API error at the member path of the request body.
func placeAt(err error, issue string, path ...any) error {
	var ae *apiError
	if !errors.As(err, &ae) {
		return err
	}
	placed := *ae
	placed.path, placed.issue = path, issue
	return &placed
}

// bodyMismatch is the first member of a body that does not fit the request type.
type bodyMismatch struct {
	path  []any
	issue string
	key   string // the unknown member, for unrecognized_keys
}

// firstMismatch walks body in document order along t and returns its first member that
// encoding/json refuses with DisallowUnknownFields: an unknown member (matched case-insensitively,
// as encoding/json does) or a value of the wrong JSON type. encoding/json reports the first such
// failure of the document, so this finds the one decodeJSON answered. Types with their own
// UnmarshalJSON are opaque, as they are to encoding/json's member checks.
func firstMismatch(body []byte, t reflect.Type) (bodyMismatch, bool) {
	w := mismatchWalker{dec: json.NewDecoder(bytes.NewReader(body))}
	w.dec.UseNumber()
	m, found, err := w.value(t, []any{})
	if err != nil {
		return bodyMismatch{}, false
	}
	return m, found
}

type mismatchWalker struct{ dec *json.Decoder }

var (
	jsonUnmarshaler = reflect.TypeFor[json.Unmarshaler]()
	textUnmarshaler = reflect.TypeFor[encoding.TextUnmarshaler]()
)

func (w *mismatchWalker) value(t reflect.Type, path []any) (bodyMismatch, bool, error) {
	tok, err := w.dec.Token()
	if err != nil {
		return bodyMismatch{}, false, err
	}
	for t != nil && t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	if t == nil || t.Kind() == reflect.Interface || reflect.PointerTo(t).Implements(jsonUnmarshaler) {
		return bodyMismatch{}, false, w.skip(tok)
	}
	wrongType := func() (bodyMismatch, bool, error) {
		return bodyMismatch{path: path, issue: keychain.IssueInvalidType}, true, nil
	}
	switch tok := tok.(type) {
	case json.Delim:
		switch {
		case tok == '{' && t.Kind() == reflect.Struct:
			return w.object(t, path)
		case tok == '{' && t.Kind() == reflect.Map:
			return w.members(path, func(string) (reflect.Type, bool) { return t.Elem(), true })
		case tok == '[' && (t.Kind() == reflect.Slice || t.Kind() == reflect.Array):
			for i := 0; w.dec.More(); i++ {
				if m, found, err := w.value(t.Elem(), appendPath(path, i)); found || err != nil {
					return m, found, err
				}
			}
			_, err := w.dec.Token()
			return bodyMismatch{}, false, err
		}
		return wrongType()
	case string:
		if t.Kind() == reflect.String || (t.Kind() == reflect.Slice && t.Elem().Kind() == reflect.Uint8) ||
			reflect.PointerTo(t).Implements(textUnmarshaler) {
			return bodyMismatch{}, false, nil
		}
		return wrongType()
	case json.Number:
		if fitsNumber(tok, t) {
			return bodyMismatch{}, false, nil
		}
		return wrongType()
	case bool:
		if t.Kind() == reflect.Bool {
			return bodyMismatch{}, false, nil
		}
		return wrongType()
	}
	return bodyMismatch{}, false, nil // null fits anything
}

// object walks the members of an object decoded into struct t.
func (w *mismatchWalker) object(t reflect.Type, path []any) (bodyMismatch, bool, error) {
	return w.members(path, func(key string) (reflect.Type, bool) {
		for i := range t.NumField() {
			f := t.Field(i)
			name, _, _ := strings.Cut(f.Tag.Get("json"), ",")
			if name == "-" || !f.IsExported() {
				continue
			}
			if name == "" {
				name = f.Name
			}
			if strings.EqualFold(name, key) {
				return f.Type, true
			}
		}
		return nil, false
	})
}

// members walks an object's members after its '{'; field says each member's type, or that it is
// unknown.
func (w *mismatchWalker) members(path []any, field func(string) (reflect.Type, bool)) (bodyMismatch, bool, error) {
	for w.dec.More() {
		tok, err := w.dec.Token()
		if err != nil {
			return bodyMismatch{}, false, err
		}
		key, _ := tok.(string)
		ft, ok := field(key)
		if !ok {
			return bodyMismatch{path: path, issue: keychain.IssueUnrecognizedKeys, key: key}, true, nil
		}
		if m, found, err := w.value(ft, appendPath(path, key)); found || err != nil {
			return m, found, err
		}
	}
	_, err := w.dec.Token()
	return bodyMismatch{}, false, err
}

// skip consumes the rest of a value whose first token was tok.
func (w *mismatchWalker) skip(tok json.Token) error {
	d, ok := tok.(json.Delim)
	if !ok || d == '}' || d == ']' {
		return nil
	}
	for depth := 1; depth > 0; {
		tok, err := w.dec.Token()
		if err != nil {
			return err
		}
		switch tok {
		case json.Delim('{'), json.Delim('['):
			depth++
		case json.Delim('}'), json.Delim(']'):
			depth--
		}
	}
	return nil
}

// fitsNumber reports whether encoding/json decodes n into kind t without a type error.
func fitsNumber(n json.Number, t reflect.Type) bool {
	switch t.Kind() {
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64:
		_, err := strconv.ParseInt(string(n), 10, t.Bits())
		return err == nil
	case reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64, reflect.Uintptr:
		_, err := strconv.ParseUint(string(n), 10, t.Bits())
		return err == nil
	case reflect.Float32, reflect.Float64:
		_, err := strconv.ParseFloat(string(n), t.Bits())
		return err == nil
	}
	return false
}

// appendPath returns path with elem appended, never sharing path's backing array (sibling members
// would overwrite each other's last element).
func appendPath(path []any, elem any) []any {
	out := make([]any, len(path), len(path)+1)
	copy(out, path)
	return append(out, elem)
}
