package api

import (
	"encoding/json"
	"errors"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/kmsgate/kmsgate/appliance/keychain"
)

// TestFirstMismatchFindsWhatEncodingJSONRefused: for bodies encoding/json refuses with
// DisallowUnknownFields, firstMismatch names the member it refused, in zod's path form; for
// bodies it accepts, it names nothing.
func TestFirstMismatchFindsWhatEncodingJSONRefused(t *testing.T) {
	for _, c := range []struct {
		name  string
		v     any
		body  string
		path  []any
		issue string
		key   string
	}{
		{"top-level unknown", &keychain.CreateRequest{}, `{"usageType":"access","extra":1}`, []any{}, keychain.IssueUnrecognizedKeys, "extra"},
		{"nested unknown", &keychain.CreateRequest{}, `{"rotationPolicy":{"enabled":true,"foo":{"a":[1]}}}`,
			[]any{"rotationPolicy"}, keychain.IssueUnrecognizedKeys, "foo"},
		{"first in document order", &keychain.CreateRequest{}, `{"rotationPolicy":{"intervalDays":"x"},"zzz":1}`,
			[]any{"rotationPolicy", "intervalDays"}, keychain.IssueInvalidType, ""},
		{"unknown before a type error", &keychain.CreateRequest{}, `{"zzz":1,"rotationPolicy":{"intervalDays":"x"}}`,
			[]any{}, keychain.IssueUnrecognizedKeys, "zzz"},
		{"fraction into int", &keychain.CreateRequest{}, `{"rotationPolicy":{"intervalDays":1.5}}`,
			[]any{"rotationPolicy", "intervalDays"}, keychain.IssueInvalidType, ""},
		{"array entry", &keychain.ImportRequest{}, `{"crt":["a",2]}`, []any{"crt", 1}, keychain.IssueInvalidType, ""},
		{"object where a string goes", &keychain.CreateRequest{}, `{"usageType":{"a":1},"extra":1}`,
			[]any{"usageType"}, keychain.IssueInvalidType, ""},
		{"body not an object", &keychain.CreateRequest{}, `[1]`, []any{}, keychain.IssueInvalidType, ""},
		{"bool into string", &keychain.UpdateRequest{}, `{"description":true}`, []any{"description"}, keychain.IssueInvalidType, ""},
		{"free-form members skipped", &kcJWSBody{}, `{"payload":{"any":{"thing":[1]}},"header":{"x":{"y":1}},"nope":1}`,
			[]any{}, keychain.IssueUnrecognizedKeys, "nope"},
		{"accepted", &keychain.CreateRequest{}, `{"USAGETYPE":"access","rotationPolicy":{"enabled":null,"intervalDays":3}}`, nil, "", ""},
	} {
		t.Run(c.name, func(t *testing.T) {
			dec := json.NewDecoder(strings.NewReader(c.body))
			dec.DisallowUnknownFields()
			derr := dec.Decode(c.v)
			refused := derr != nil
			var te *json.UnmarshalTypeError
			if refused && (errors.As(derr, &te) != (c.issue == keychain.IssueInvalidType) ||
				strings.Contains(derr.Error(), "unknown field \""+c.key+"\"") != (c.issue == keychain.IssueUnrecognizedKeys)) {
				t.Fatalf("encoding/json refused with %v, the case expects %s %q", derr, c.issue, c.key)
			}
			m, found := firstMismatch([]byte(c.body), reflect.TypeOf(c.v))
			if refused != (c.path != nil) || found != refused {
				t.Fatalf("encoding/json refused: %v; firstMismatch found: %v (%+v)", refused, found, m)
			}
			if found && (!reflect.DeepEqual(m.path, c.path) || m.issue != c.issue || m.key != c.key) {
				t.Fatalf("got %+v, want path %v issue %s key %q", m, c.path, c.issue, c.key)
			}
		})
	}
}

// TestKCProblemOfNonValidation: a 400 that is not about the request's shape keeps its own
// message upstream-side, and a placed keychain failure reports its path and issue.
func TestKCProblemOfNonValidation(t *testing.T) {
	err := errors.New("unplaced")
	p := kcProblemOf(err, classified{status: 400, code: "invalid_key", msg: "key: bad curve"}, time.Unix(0, 0))
	if p.Message != "key: bad curve" || p.Error != p.Message || p.StatusCode != 400 || len(p.Errors) != 1 ||
		p.Errors[0].Code != keychain.IssueCustom || p.Errors[0].Path == nil || len(p.Errors[0].Path) != 0 {
		t.Fatalf("%+v", p)
	}
	b, _ := json.Marshal(p)
	if !strings.Contains(string(b), `"path":[]`) || !strings.Contains(string(b), `"timestamp":"1970-01-01T00:00:00.000Z"`) {
		t.Fatalf("body %s", b)
	}
}
