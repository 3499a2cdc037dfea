package api

import (
	"bytes"
	"encoding/json"
	"testing"
)

// The fast path must never accept a body the strict decoder would reject, nor read it differently.
func FuzzParseSignFast(f *testing.F) {
	for _, s := range []string{`{"data":"aGk=","alg":"ES256"}`, ` { "alg" : "ES256" , "digest":"AAAA" } `,
		`{"data":"","signatureFormat":"der"}`, `{}`, `{"data":"a","data":"b"}`, `{"data":"a\u0041"}`, `{"DATA":"x"}`,
		`{"data":"x",}`, `{"data":"x"} x`, `{"extra":"x"}`, `{"data":1}`, `{"data":null}`, `[]`, ``} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		var fast signFields
		if !parseSignFast(b, &fast) {
			return
		}
		var req signRequest
		dec := json.NewDecoder(bytes.NewReader(b))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&req); err != nil {
			t.Fatalf("fast path accepted %q, strict decoder rejects it: %v", b, err)
		}
		if dec.More() {
			t.Fatalf("fast path accepted trailing data in %q", b)
		}
		eq := func(name string, p *string, has bool, v []byte) {
			if has != (p != nil) || (p != nil && *p != string(v)) {
				t.Fatalf("%s differs for %q: fast %v %q, strict %v", name, b, has, v, p)
			}
		}
		eq("data", req.Data, fast.hasData, fast.data)
		eq("digest", req.Digest, fast.hasDigest, fast.digest)
		if req.Alg != string(fast.alg) || req.SignatureFormat != string(fast.format) {
			t.Fatalf("alg/format differ for %q", b)
		}
	})
}

func TestParseSignFastAcceptsTheContractShape(t *testing.T) {
	var f signFields
	if !parseSignFast([]byte(`{"data":"aGVsbG8=","alg":"ES256"}`), &f) || string(f.data) != "aGVsbG8=" ||
		string(f.alg) != "ES256" || !f.hasData || f.hasDigest {
		t.Fatalf("EUDIPLO's exact request shape must take the fast path: %+v", f)
	}
}
