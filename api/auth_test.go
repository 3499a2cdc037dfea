package api_test

import (
	"context"
	"errors"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/kmsgate/kmsgate/appliance"
	"github.com/kmsgate/kmsgate/appliance/tenants"
	"github.com/kmsgate/kmsgate/internal/apptest"
)

// keyTokens stands in for an access-token issuer: a token "tok:<API key>" carries that key's
// principal, looked up in the real tenants service, so revoking the key revokes its tokens.
type keyTokens struct {
	ts    func() *tenants.Service
	calls atomic.Int32
}

func (k *keyTokens) VerifyToken(_ context.Context, raw string) (*tenants.Principal, error) {
	k.calls.Add(1)
	key, ok := strings.CutPrefix(raw, "tok:")
	if !ok {
		return nil, errors.New("not a token")
	}
	return k.ts().Authenticate(key)
}

// TestAuthTokenSeam: a bearer value that is not a kmsgate API key goes to the token verifier and
// its principal is role-checked like an API key's; an API key never reaches the verifier, nor does
// an x-api-key value; without a verifier every token is a 401.
func TestAuthTokenSeam(t *testing.T) {
	v := &keyTokens{}
	in := apptest.Start(t, apptest.Options{Tweak: func(o *appliance.Options) { o.Tokens = v }})
	v.ts = in.App.Tenants
	key := in.CreateTenant("acme")
	signOnly, err := in.App.Tenants().AddKey(context.Background(), "acme", []string{tenants.RoleSign}, "")
	if err != nil {
		t.Fatal(err)
	}
	if st, body := in.Do("POST", "/keys", "tok:"+key, map[string]string{"kid": "k1"}); st != 200 {
		t.Fatalf("token with manage: %d %s", st, body)
	}
	if st, _ := in.Do("POST", "/keys", "tok:"+signOnly.Key, map[string]string{"kid": "k2"}); st != 403 {
		t.Fatalf("token without manage creating a key: %d, want 403", st)
	}
	if st, _ := in.Do("POST", "/keys/k1/sign", "tok:"+signOnly.Key, map[string]string{"data": "bQ=="}); st != 200 {
		t.Fatalf("sign-only token signing: %d", st)
	}
	if st, _ := in.Do("POST", "/keys/k1/sign", "tok:garbage", map[string]string{"data": "bQ=="}); st != 401 {
		t.Fatalf("invalid token: %d, want 401", st)
	}
	if _, err := in.App.Tenants().Revoke(context.Background(), signOnly.CredentialID, tenants.RevokeCredential); err != nil {
		t.Fatal(err)
	}
	if st, _ := in.Do("POST", "/keys/k1/sign", "tok:"+signOnly.Key, map[string]string{"data": "bQ=="}); st != 401 {
		t.Fatalf("token of a revoked credential: %d, want 401", st)
	}
	before := v.calls.Load()
	if st, _ := in.Do("POST", "/keys/k1/sign", key, map[string]string{"data": "bQ=="}); st != 200 {
		t.Fatalf("API key: %d", st)
	}
	req, _ := http.NewRequest("GET", in.URL+"/keys/k1", nil)
	req.Header.Set("X-Api-Key", "tok:"+key)
	resp, err := in.Client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 401 || v.calls.Load() != before {
		t.Fatalf("x-api-key with a token: %d, verifier calls %d -> %d", resp.StatusCode, before, v.calls.Load())
	}

	plain := apptest.Start(t, apptest.Options{})
	pkey := plain.CreateTenant("acme")
	if st, _ := plain.Do("GET", "/health", "tok:"+pkey, nil); st != 401 {
		t.Fatalf("token without a verifier: %d, want 401", st)
	}
}
