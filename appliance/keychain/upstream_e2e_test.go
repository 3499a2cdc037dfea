package keychain_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"io"
	"math/big"
	"net/http"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/kmsgate/kmsgate/appliance"
	"github.com/kmsgate/kmsgate/appliance/keychain"
	"github.com/kmsgate/kmsgate/appliance/tenants"
	"github.com/kmsgate/kmsgate/internal/apptest"
	"github.com/kmsgate/kmsgate/internal/keyutil"
)

// The tests below reproduce the expectations of EUDIPLO's newest e2e suites for /key-chain
// (kms-lifecycle, key-import and the zod validation body; eudiplo-upstream.md §3) over HTTP, on the
// bare paths and under EUDIPLO's global prefix /api, and with --keychain-legacy-status.

// kcPrefixes are the two places the key-chain API is served.
var kcPrefixes = []string{"", "/api"}

// reply is one HTTP answer with the headers the status-code tests look at.
type reply struct {
	status int
	header http.Header
	body   []byte
}

func call(t *testing.T, in *apptest.Instance, method, path, key string, body any) reply {
	t.Helper()
	var rd io.Reader
	switch b := body.(type) {
	case nil:
	case string:
		rd = strings.NewReader(b)
	default:
		j, err := json.Marshal(b)
		if err != nil {
			t.Fatal(err)
		}
		rd = strings.NewReader(string(j))
	}
	req, err := http.NewRequest(method, in.URL+path, rd)
	if err != nil {
		t.Fatal(err)
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	if key != "" {
		req.Header.Set("Authorization", "Bearer "+key)
	}
	resp, err := in.Client.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return reply{status: resp.StatusCode, header: resp.Header, body: b}
}

func expect(t *testing.T, in *apptest.Instance, method, path, key string, body any, want int) reply {
	t.Helper()
	r := call(t, in, method, path, key, body)
	if r.status != want {
		t.Fatalf("%s %s: %d, want %d: %s", method, path, r.status, want, r.body)
	}
	return r
}

// expectEmpty expects status with an empty body and no content type (EUDIPLO's void answers).
func expectEmpty(t *testing.T, in *apptest.Instance, method, path, key string, body any, want int) {
	t.Helper()
	r := expect(t, in, method, path, key, body, want)
	if len(r.body) != 0 || r.header.Get("Content-Type") != "" || (r.header.Get("Content-Length") != "" && r.header.Get("Content-Length") != "0") {
		t.Fatalf("%s %s: %d with body %q, Content-Type %q, Content-Length %q; want an empty answer", method, path, want,
			r.body, r.header.Get("Content-Type"), r.header.Get("Content-Length"))
	}
}

// upstreamTenant creates a tenant and returns its API key and the id of its (unlisted) encrypt
// chain from the bootstrap report.
func upstreamTenant(t *testing.T, in *apptest.Instance, id string, roles ...string) (key, encryptID string) {
	t.Helper()
	res, err := in.App.CreateTenant(context.Background(), tenants.CreateTenantRequest{ID: id, Name: id + " Tenant", Roles: roles})
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range res.Bootstrap.Chains {
		if c.UsageType == keychain.UsageEncrypt && c.Status == keychain.BootCreated {
			encryptID = c.ID
		}
	}
	return res.APIKey, encryptID
}

type listed struct {
	ID                string                `json:"id"`
	UsageType         string                `json:"usageType"`
	KMSProvider       string                `json:"kmsProvider"`
	Description       string                `json:"description"`
	ActivePublicKey   map[string]any        `json:"activePublicKey"`
	ActiveCertificate *struct{ PEM string } `json:"activeCertificate"`
	PreviousPublicKey map[string]any        `json:"previousPublicKey"`
}

func listIDs(t *testing.T, in *apptest.Instance, path, key string) map[string]listed {
	t.Helper()
	var l []listed
	apptest.JSON(t, expect(t, in, "GET", path, key, nil, 200).body, &l)
	out := map[string]listed{}
	for _, c := range l {
		out[c.ID] = c
	}
	return out
}

// TestUpstreamKeyChainLifecycle is kms-lifecycle and key-import at EUDIPLO's newest commit, on
// both prefixes: create 201 → get → list → update 204 → rotate 204 → delete 204 → get 404, and
// import 201 then listed; every 204 is empty.
func TestUpstreamKeyChainLifecycle(t *testing.T) {
	in := apptest.Start(t, apptest.Options{})
	key, _ := upstreamTenant(t, in, "acme")
	for _, p := range kcPrefixes {
		t.Run("prefix="+p, func(t *testing.T) {
			kc := p + "/key-chain"
			var provs struct {
				Providers []struct {
					Name         string
					Capabilities struct{ CanCreate, CanImport, CanDelete bool }
				}
			}
			apptest.JSON(t, expect(t, in, "GET", kc+"/providers", key, nil, 200).body, &provs)
			if len(provs.Providers) == 0 || provs.Providers[0].Name != "db" || !provs.Providers[0].Capabilities.CanDelete {
				t.Fatalf("providers: %+v", provs)
			}

			var created struct{ ID string }
			apptest.JSON(t, expect(t, in, "POST", kc, key, map[string]any{"type": "standalone", "usageType": "access",
				"kmsProvider": "db", "description": "e2e test key chain (db)"}, 201).body, &created)
			if created.ID == "" {
				t.Fatal("create answered no id")
			}
			id := created.ID
			var got listed
			apptest.JSON(t, expect(t, in, "GET", kc+"/"+id, key, nil, 200).body, &got)
			if got.ID != id || got.KMSProvider != "db" {
				t.Fatalf("GET %s: %+v", id, got)
			}
			if _, ok := listIDs(t, in, kc, key)[id]; !ok {
				t.Fatalf("%s not listed", id)
			}

			expectEmpty(t, in, "PUT", kc+"/"+id, key, map[string]any{"description": "updated"}, 204)
			apptest.JSON(t, expect(t, in, "GET", kc+"/"+id, key, nil, 200).body, &got)
			if got.Description != "updated" {
				t.Fatalf("update not applied: %+v", got)
			}
			kid := got.ActivePublicKey["kid"]
			expectEmpty(t, in, "POST", kc+"/"+id+"/rotate", key, nil, 204)
			apptest.JSON(t, expect(t, in, "GET", kc+"/"+id, key, nil, 200).body, &got)
			if got.ActivePublicKey["kid"] == kid || got.PreviousPublicKey["kid"] != kid {
				t.Fatalf("rotate did not move %v to previous: %+v", kid, got)
			}
			expectEmpty(t, in, "DELETE", kc+"/"+id, key, nil, 204)
			nf := expect(t, in, "GET", kc+"/"+id, key, nil, 404)
			plainProblem(t, nf.body, "key_chain_not_found")
			expect(t, in, "DELETE", kc+"/"+id, key, nil, 404)

			// key-import: 201 with the given id, then listed.
			impID := uuid.NewString()
			k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
			jwk := privateJWK(t, k, impID)
			var imp struct{ ID string }
			apptest.JSON(t, expect(t, in, "POST", kc+"/import", key, map[string]any{"id": impID, "key": jwk,
				"usageType": "attestation", "description": "Test key chain"}, 201).body, &imp)
			if imp.ID != impID {
				t.Fatalf("import answered id %q, want %q", imp.ID, impID)
			}
			if _, ok := listIDs(t, in, kc, key)[impID]; !ok {
				t.Fatalf("imported %s not listed", impID)
			}
			// Signed with the imported key, verified independently.
			var sr struct{ Signature string }
			apptest.JSON(t, expect(t, in, "POST", kc+"/"+impID+"/sign", key,
				map[string]any{"data": base64.StdEncoding.EncodeToString([]byte("imported"))}, 200).body, &sr)
			verifyRawSig(t, &k.PublicKey, []byte("imported"), sr.Signature)
		})
	}
}

// TestUpstreamKeyChainLegacyStatus: --keychain-legacy-status answers PUT, DELETE and rotate with
// the older API's 200, 200 and 201 on both prefixes, still without a body; create and import
// stay 201 {id}.
func TestUpstreamKeyChainLegacyStatus(t *testing.T) {
	in := apptest.Start(t, apptest.Options{Tweak: func(o *appliance.Options) { o.KeyChainLegacyStatus = true }})
	key, _ := upstreamTenant(t, in, "acme")
	for _, p := range kcPrefixes {
		t.Run("prefix="+p, func(t *testing.T) {
			kc := p + "/key-chain"
			var created struct{ ID string }
			apptest.JSON(t, expect(t, in, "POST", kc, key, map[string]any{"type": "standalone", "usageType": "access"}, 201).body, &created)
			id := created.ID
			expectEmpty(t, in, "PUT", kc+"/"+id, key, map[string]any{"description": "legacy"}, 200)
			expectEmpty(t, in, "POST", kc+"/"+id+"/rotate", key, nil, 201)
			var got listed
			apptest.JSON(t, expect(t, in, "GET", kc+"/"+id, key, nil, 200).body, &got)
			if got.Description != "legacy" || got.PreviousPublicKey == nil {
				t.Fatalf("update or rotate not applied: %+v", got)
			}
			expectEmpty(t, in, "DELETE", kc+"/"+id, key, nil, 200)
			expect(t, in, "GET", kc+"/"+id, key, nil, 404)
			k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
			var imp struct{ ID string }
			apptest.JSON(t, expect(t, in, "POST", kc+"/import", key, map[string]any{"usageType": "access",
				"key": privateJWK(t, k, "")}, 201).body, &imp)
			if imp.ID == "" {
				t.Fatal("import answered no id")
			}
		})
	}
}

// kcBody is the two-sided 400 body of the /key-chain routes.
type kcBody struct {
	Error      *string `json:"error"`
	Code       *string `json:"code"`
	StatusCode int     `json:"statusCode"`
	Message    string  `json:"message"`
	Errors     []struct {
		Path    []any    `json:"path"`
		Message string   `json:"message"`
		Code    string   `json:"code"`
		Keys    []string `json:"keys"`
	} `json:"errors"`
	Timestamp string `json:"timestamp"`
}

// TestUpstreamKeyChainErrors: every 400 of the key-chain routes, on both prefixes, carries
// kmsgate's {error, code} and EUDIPLO's {statusCode, message, errors[{path, message, code}],
// timestamp}, with zod's path of the failing member; other errors keep the plain body.
func TestUpstreamKeyChainErrors(t *testing.T) {
	in := apptest.Start(t, apptest.Options{})
	key, _ := upstreamTenant(t, in, "acme")
	signOnly, _ := upstreamTenant(t, in, "signer", "sign")
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	jwk := privateJWK(t, k, "")
	for _, p := range kcPrefixes {
		t.Run("prefix="+p, func(t *testing.T) {
			kc := p + "/key-chain"
			var created struct{ ID string }
			apptest.JSON(t, expect(t, in, "POST", kc, key, map[string]any{"type": "standalone", "usageType": "access"}, 201).body, &created)
			for _, c := range []struct {
				name, method, path string
				body               any
				code, message      string // kmsgate's code; the upstream message
				issue              string
				issuePath          []any
				keys               []string
			}{
				{"unknown member", "POST", kc, `{"usageType":"access","type":"standalone","extra":1}`,
					"unknown_field", "Validation failed", "unrecognized_keys", []any{}, []string{"extra"}},
				{"unknown nested member", "POST", kc, `{"usageType":"access","type":"standalone","rotationPolicy":{"enabled":true,"foo":1}}`,
					"unknown_field", "Validation failed", "unrecognized_keys", []any{"rotationPolicy"}, []string{"foo"}},
				{"wrong type", "POST", kc, `{"usageType":"access","type":"standalone","rotationPolicy":{"enabled":true,"intervalDays":"90"}}`,
					"invalid_type", "Validation failed", "invalid_type", []any{"rotationPolicy", "intervalDays"}, nil},
				{"too small", "POST", kc, `{"usageType":"access","type":"standalone","rotationPolicy":{"enabled":true,"intervalDays":0}}`,
					"validation_failed", "Validation failed", "too_small", []any{"rotationPolicy", "intervalDays"}, nil},
				{"too big", "POST", kc, `{"usageType":"access","type":"standalone","rotationPolicy":{"enabled":true,"certValidityDays":3651}}`,
					"validation_failed", "Validation failed", "too_big", []any{"rotationPolicy", "certValidityDays"}, nil},
				{"bad enum", "POST", kc, `{"usageType":"x","type":"standalone"}`,
					"validation_failed", "Validation failed", "invalid_value", []any{"usageType"}, nil},
				{"unknown provider", "POST", kc, `{"usageType":"access","type":"standalone","kmsProvider":"ghost"}`,
					"unknown_provider", `unknown kmsProvider "ghost" (configured: ["db"])`, "invalid_value", []any{"kmsProvider"}, nil},
				{"import unknown member", "POST", kc + "/import", map[string]any{"usageType": "access", "key": jwk, "keyPem": "x"},
					"unknown_field", "Validation failed", "unrecognized_keys", []any{}, []string{"keyPem"}},
				{"import bad certificate", "POST", kc + "/import", map[string]any{"usageType": "access", "key": jwk, "crt": []string{"nope"}},
					"invalid_certificate", "", "custom", []any{"crt", float64(0)}, nil},
				{"update unknown member", "PUT", kc + "/" + created.ID, `{"description":"x","usageType":"access"}`,
					"unknown_field", "Validation failed", "unrecognized_keys", []any{}, []string{"usageType"}},
				{"update out of range", "PUT", kc + "/" + created.ID, `{"rotationPolicy":{"intervalDays":4000}}`,
					"validation_failed", "Validation failed", "too_big", []any{"rotationPolicy", "intervalDays"}, nil},
				{"sign bad base64", "POST", kc + "/" + created.ID + "/sign", `{"data":"***"}`,
					"invalid_base64", "Validation failed", "invalid_format", []any{"data"}, nil},
				{"not JSON", "POST", kc, `{"usageType":`, "invalid_json", "Validation failed", "custom", []any{}, nil},
			} {
				t.Run(c.name, func(t *testing.T) {
					before := time.Now().Add(-time.Second)
					r := expect(t, in, c.method, c.path, key, c.body, 400)
					var b kcBody
					apptest.JSON(t, r.body, &b)
					if b.Error == nil || *b.Error == "" || b.Code == nil || *b.Code != c.code {
						t.Fatalf("kmsgate side {error, code}: %s, want code %s", r.body, c.code)
					}
					wantMsg := c.message
					if wantMsg == "" {
						wantMsg = *b.Error
					}
					if b.StatusCode != 400 || b.Message != wantMsg || len(b.Errors) != 1 {
						t.Fatalf("upstream side: %s, want statusCode 400, message %q, one issue", r.body, wantMsg)
					}
					is := b.Errors[0]
					if is.Code != c.issue || !reflect.DeepEqual(is.Path, c.issuePath) || is.Message == "" || !reflect.DeepEqual(is.Keys, c.keys) {
						t.Fatalf("issue %+v, want code %s path %v keys %v", is, c.issue, c.issuePath, c.keys)
					}
					ts, err := time.Parse(time.RFC3339Nano, b.Timestamp)
					if err != nil || ts.Before(before) || ts.After(time.Now().Add(time.Second)) || !strings.HasSuffix(b.Timestamp, "Z") {
						t.Fatalf("timestamp %q: %v", b.Timestamp, err)
					}
				})
			}
			// Nothing was created by the refused requests.
			if l := listIDs(t, in, kc, key); len(l) != 3 { // access + attestation (bootstrap) + created
				t.Fatalf("%d chains listed after refused requests, want 3", len(l))
			}
			// Other statuses keep kmsgate's plain body.
			plainProblem(t, expect(t, in, "GET", kc+"/nope", key, nil, 404).body, "key_chain_not_found")
			plainProblem(t, expect(t, in, "POST", kc, signOnly, map[string]any{"usageType": "access", "type": "standalone"}, 403).body, "forbidden")
			plainProblem(t, expect(t, in, "GET", kc, "", nil, 401).body, "unauthorized")
			// Only the manage role creates; sign-only callers still read.
			expect(t, in, "GET", kc, signOnly, nil, 200)
			expectEmpty(t, in, "DELETE", kc+"/"+created.ID, key, nil, 204)
		})
	}
	// The contract face keeps its plain 400 body.
	plainProblem(t, expect(t, in, "POST", "/keys", key, `{"kid":"k","extra":1}`, 400).body, "unknown_field")
}

// TestUpstreamUsageTypeEncrypt: the tenant's ECDH encrypt chain is hidden from the list, with and
// without ?usageType=encrypt, and read by id; a create or import with usageType encrypt makes an
// ES256 signing chain with a certificate, which is listed and signs (also by usage type).
func TestUpstreamUsageTypeEncrypt(t *testing.T) {
	in := apptest.Start(t, apptest.Options{})
	key, encryptID := upstreamTenant(t, in, "acme")
	if encryptID == "" {
		t.Fatal("the tenant bootstrap made no encrypt chain")
	}
	for _, p := range kcPrefixes {
		t.Run("prefix="+p, func(t *testing.T) {
			kc := p + "/key-chain"
			if _, ok := listIDs(t, in, kc, key)[encryptID]; ok {
				t.Fatal("the encrypt chain is listed")
			}
			if l := listIDs(t, in, kc+"?usageType=encrypt", key); len(l) != 0 {
				t.Fatalf("usageType=encrypt lists %v before any signing chain of that usage type", l)
			}
			var enc listed
			apptest.JSON(t, expect(t, in, "GET", kc+"/"+encryptID, key, nil, 200).body, &enc)
			if enc.ID != encryptID || enc.UsageType != "encrypt" || enc.ActiveCertificate != nil || enc.ActivePublicKey["alg"] != "ECDH-ES" {
				t.Fatalf("encrypt chain by id: %+v", enc)
			}
			expect(t, in, "POST", kc+"/"+encryptID+"/sign", key, map[string]any{"data": "aGk="}, 400)

			var created struct{ ID string }
			apptest.JSON(t, expect(t, in, "POST", kc, key, map[string]any{"type": "standalone", "usageType": "encrypt"}, 201).body, &created)
			k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
			var imp struct{ ID string }
			apptest.JSON(t, expect(t, in, "POST", kc+"/import", key, map[string]any{"usageType": "encrypt",
				"key": privateJWK(t, k, "")}, 201).body, &imp)
			all, encOnly := listIDs(t, in, kc, key), listIDs(t, in, kc+"?usageType=encrypt", key)
			for _, id := range []string{created.ID, imp.ID} {
				c, ok := all[id]
				if _, alsoFiltered := encOnly[id]; !ok || !alsoFiltered {
					t.Fatalf("signing chain %s of usageType encrypt not listed (all: %v, filtered: %v)", id, ok, alsoFiltered)
				}
				if c.ActiveCertificate == nil || c.ActivePublicKey["alg"] != "ES256" {
					t.Fatalf("chain %s: %+v, want an ES256 chain with a certificate", id, c)
				}
				leaf := certsOf(t, c.ActiveCertificate.PEM)[0]
				var sr struct{ Signature string }
				apptest.JSON(t, expect(t, in, "POST", kc+"/"+id+"/sign", key,
					map[string]any{"data": base64.StdEncoding.EncodeToString([]byte("enc"))}, 200).body, &sr)
				verifyRawSig(t, leaf.PublicKey.(*ecdsa.PublicKey), []byte("enc"), sr.Signature)
			}
			if _, ok := encOnly[encryptID]; ok {
				t.Fatal("usageType=encrypt lists the ECDH chain")
			}
			// Signing by usage type encrypt uses a signing chain of that usage type, never the ECDH one.
			var us struct{ Signature, Kid string }
			apptest.JSON(t, expect(t, in, "POST", kc+"/usage/encrypt/sign", key, map[string]any{"data": "aGk="}, 200).body, &us)
			// The oldest one: the created chain.
			if !strings.HasPrefix(us.Kid, created.ID+"-") {
				t.Fatalf("usage encrypt signed with %s, want the oldest signing chain %s", us.Kid, created.ID)
			}
			verifyRawSig(t, certsOf(t, all[created.ID].ActiveCertificate.PEM)[0].PublicKey.(*ecdsa.PublicKey), []byte("hi"), us.Signature)
			expectEmpty(t, in, "DELETE", kc+"/"+created.ID, key, nil, 204)
			expectEmpty(t, in, "DELETE", kc+"/"+imp.ID, key, nil, 204)
		})
	}
}

// TestUpstreamRouteLabels: both prefixes are route templates of their own, so the metrics' route
// label names the template, never a chain id.
func TestUpstreamRouteLabels(t *testing.T) {
	in := apptest.Start(t, apptest.Options{})
	key, encryptID := upstreamTenant(t, in, "acme")
	for _, p := range kcPrefixes {
		expect(t, in, "GET", p+"/key-chain/"+encryptID, key, nil, 200)
		expect(t, in, "GET", p+"/key-chain/no-such-id/jwks", key, nil, 404)
		expect(t, in, "GET", p+"/key-chain/a/b/c/d", key, nil, 404)
	}
	_, body := in.Do("GET", "/metrics", "", nil)
	for _, want := range []string{`route="/key-chain/:id"`, `route="/api/key-chain/:id"`, `route="/api/key-chain/:id/jwks"`} {
		if !strings.Contains(string(body), want) {
			t.Errorf("metrics lack %s", want)
		}
	}
	for _, leak := range []string{encryptID, "no-such-id", "/a/b/c/d"} {
		if strings.Contains(string(body), leak) {
			t.Errorf("metrics name a request path: %q", leak)
		}
	}
}

// plainProblem checks that body is kmsgate's plain {error, code} problem and nothing more.
func plainProblem(t *testing.T, body []byte, code string) {
	t.Helper()
	var m map[string]any
	apptest.JSON(t, body, &m)
	if len(m) != 2 || m["code"] != code || m["error"] == "" {
		t.Fatalf("want the plain problem {error, code:%s}, got %s", code, body)
	}
}

// privateJWK is k as a private JWK {kty, crv, x, y, d} with kid and alg ES256 (no kid when empty),
// as EUDIPLO's import tests send it.
func privateJWK(t *testing.T, k *ecdsa.PrivateKey, kid string) keyutil.JWK {
	t.Helper()
	j, err := keyutil.PrivateJWK(k, kid, "ES256")
	if err != nil {
		t.Fatal(err)
	}
	return j
}

// verifyRawSig verifies a base64url raw r‖s ECDSA P-256 signature over SHA-256(msg).
func verifyRawSig(t *testing.T, pub *ecdsa.PublicKey, msg []byte, sig string) {
	t.Helper()
	raw, err := base64.RawURLEncoding.DecodeString(sig)
	if err != nil || len(raw) != 64 {
		t.Fatalf("signature %q is not 64 raw bytes in base64url: %v", sig, err)
	}
	h := sha256.Sum256(msg)
	if !ecdsa.Verify(pub, h[:], new(big.Int).SetBytes(raw[:32]), new(big.Int).SetBytes(raw[32:])) {
		t.Fatal("signature does not verify")
	}
}
