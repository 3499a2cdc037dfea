package pkcs11

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kmsgate/kmsgate/internal/errs"
	"github.com/kmsgate/kmsgate/internal/keyutil"
	"github.com/kmsgate/kmsgate/internal/testenv"
	"github.com/kmsgate/kmsgate/providers"
)

func cfgFor(t *testing.T, id string, fields map[string]any) providers.Config {
	t.Helper()
	m := map[string]any{"id": id, "type": "pkcs11"}
	for k, v := range fields {
		m[k] = v
	}
	raw, err := json.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	return providers.Config{ID: id, Type: "pkcs11", Raw: raw}
}

func newProvider(t *testing.T, cfg providers.Config) *Provider {
	t.Helper()
	p, err := New(context.Background(), cfg, nil)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() { _ = p.Close() })
	return p
}

func TestProviderContract(t *testing.T) {
	env := testenv.NewSoftHSM(t, 1)
	p := newProvider(t, cfgFor(t, "hsm", map[string]any{"library": env.Library, "slot": 0, "pin": env.Tokens[0].PIN,
		"poolSize": 2, "acquireTimeout": "1s", "description": "test token"}))
	ctx := context.Background()
	if h := p.Health(ctx); !h.OK {
		t.Fatalf("health: %+v", h)
	}
	if p.Type() != "pkcs11" || p.ID() != "hsm" || p.Description() != "test token" {
		t.Fatalf("identity: %s %s %q", p.Type(), p.ID(), p.Description())
	}
	c := p.Capabilities()
	if !c.CanCreate || c.CanImport || !c.CanDelete || !c.CanSignDigest || !c.CanSignMessage || c.DefaultAlg != "ES256" || !c.Supports("ES256") || c.Supports("ES384") {
		t.Fatalf("capabilities %+v", c)
	}
	// Two tenants with the same kid: distinct token objects.
	a, err := p.Generate(ctx, providers.KeySpec{Tenant: "t1", KID: "signing", Alg: "ES256"})
	if err != nil {
		t.Fatal(err)
	}
	b, err := p.Generate(ctx, providers.KeySpec{Tenant: "t2", KID: "signing", Alg: "ES256"})
	if err != nil {
		t.Fatal(err)
	}
	if a.ExternalID == b.ExternalID || keyutil.SameKey(a.Public, b.Public) {
		t.Fatal("two tenants with one kid collided")
	}
	msg := []byte("payload")
	sig, err := p.SignMessage(ctx, a, "ES256", msg)
	if err != nil || !keyutil.VerifyRaw(a.Public, msg, sig) {
		t.Fatalf("SignMessage: %v", err)
	}
	opensslVerify(t, a.Public, msg, sig)
	d := sha256.Sum256(msg)
	sig, err = p.SignDigest(ctx, b, "ES256", d[:])
	if err != nil || !keyutil.VerifyRawDigest(b.Public, d[:], sig) || keyutil.VerifyRawDigest(a.Public, d[:], sig) {
		t.Fatalf("SignDigest: %v", err)
	}
	pub, err := p.PublicKey(ctx, a)
	if err != nil || !keyutil.SameKey(pub, a.Public) {
		t.Fatalf("PublicKey: %v", err)
	}
	if _, err := keyutil.PublicJWK(pub, a.KID, "ES256"); err != nil {
		t.Fatal(err)
	}

	// Wrong inputs get the right kinds from the provider as the registry serves it (the
	// decorator checks algorithms and digest lengths for every provider).
	dp := providers.Instrument(p, nil)
	if _, err := dp.SignDigest(ctx, a, "ES256", d[:20]); errs.KindOf(err) != errs.BadInput {
		t.Fatalf("short digest: %v", err)
	}
	if _, err := dp.SignMessage(ctx, a, "ES384", msg); errs.KindOf(err) != errs.NotSupported {
		t.Fatalf("ES384: %v", err)
	}
	if _, err := dp.Generate(ctx, providers.KeySpec{KID: "x", Alg: "ES512"}); errs.KindOf(err) != errs.NotSupported || !strings.Contains(err.Error(), "ES512") {
		t.Fatalf("ES512 generate: %v", err)
	}
	priv, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if _, err := p.Import(ctx, providers.KeySpec{KID: "imp"}, priv); errs.KindOf(err) != errs.NotSupported ||
		!strings.Contains(err.Error(), "generated inside the HSM") {
		t.Fatalf("Import: %v", err)
	}

	if err := p.Delete(ctx, a); err != nil {
		t.Fatal(err)
	}
	if err := p.Delete(ctx, a); err != nil {
		t.Fatalf("delete is not idempotent: %v", err)
	}
	if _, err := p.SignMessage(ctx, a, "ES256", msg); !errors.Is(err, errs.NotFound) {
		t.Fatalf("sign deleted key: %v", err)
	}
	if _, err := p.SignMessage(ctx, b, "ES256", msg); err != nil {
		t.Fatalf("the other tenant's key went with it: %v", err)
	}
	if st := p.Stats(); !st.Up || st.Capacity != 2 || st.Slot.TokenLabel != env.Tokens[0].Label {
		t.Fatalf("stats %+v", st)
	}
	if err := p.Canary(ctx); err != nil {
		t.Fatalf("canary: %v", err)
	}
}

func TestConfigErrors(t *testing.T) {
	for name, fields := range map[string]map[string]any{
		"no library":    {"slot": 0, "pin": "1"},
		"no slot":       {"library": "/x.so", "pin": "1"},
		"unknown field": {"library": "/x.so", "slot": 0, "pin": "1", "pinn": "2"},
		"bad duration":  {"library": "/x.so", "slot": 0, "pin": "1", "acquireTimeout": "soon"},
		"negative slot": {"library": "/x.so", "slot": -1, "pin": "1"},
	} {
		t.Run(name, func(t *testing.T) {
			fields["pin"] = "s3cr3t-pin"
			_, err := New(context.Background(), cfgFor(t, "p", fields), nil)
			if err == nil {
				t.Fatal("accepted")
			}
			if strings.Contains(err.Error(), "s3cr3t-pin") {
				t.Fatalf("error leaks the PIN: %v", err)
			}
		})
	}
}

// TestBrokenProvidersStayIsolated: wrong PIN, missing library and a label typo each yield a
// provider (the factory does not fail) whose health names the fix, while a healthy provider on
// another slot of the same library keeps signing.
func TestBrokenProvidersStayIsolated(t *testing.T) {
	env := testenv.NewSoftHSM(t, 2)
	const wrongPIN = "000000-nope"
	good := newProvider(t, cfgFor(t, "good", map[string]any{"library": env.Library, "slot": env.Tokens[1].Label, "pin": env.Tokens[1].PIN}))
	factory := providers.FactoryFor(New, nil)
	cases := map[string]struct {
		fields map[string]any
		want   string
	}{
		"wrong pin":   {map[string]any{"library": env.Library, "slot": env.Tokens[0].Label, "pin": wrongPIN}, "wrong PIN"},
		"missing lib": {map[string]any{"library": "/nonexistent/libvendor.so", "slot": 0, "pin": wrongPIN}, "does not exist"},
		"label typo":  {map[string]any{"library": env.Library, "slot": "kmsgate-test-9", "pin": wrongPIN}, "no initialised token labelled"},
	}
	for name, c := range cases {
		t.Run(name, func(t *testing.T) {
			pr, err := factory(context.Background(), cfgFor(t, "bad", c.fields))
			if err != nil {
				t.Fatalf("factory failed on a runtime problem: %v", err)
			}
			defer pr.Close()
			h := providers.HealthProbe(context.Background(), pr, time.Second)
			if h.OK || !strings.Contains(h.Error, c.want) || !strings.Contains(h.Error, "fix:") || strings.Contains(h.Error, wrongPIN) {
				t.Fatalf("health = %+v, want not ok with %q and a fix, never the PIN", h, c.want)
			}
			_, err = pr.SignMessage(context.Background(), providers.KeyRef{ExternalID: "00", KID: "k"}, "ES256", []byte("x"))
			if errs.KindOf(err) != errs.Unavailable || strings.Contains(err.Error(), wrongPIN) {
				t.Fatalf("sign on a broken provider: %v (kind %v)", err, errs.KindOf(err))
			}
			if h := good.Health(context.Background()); !h.OK {
				t.Fatalf("healthy provider affected: %+v", h)
			}
		})
	}
	ref, err := good.Generate(context.Background(), providers.KeySpec{KID: "k"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := good.SignMessage(context.Background(), ref, "ES256", []byte("x")); err != nil {
		t.Fatal(err)
	}
}

func TestReadOnlyProvider(t *testing.T) {
	env := testenv.NewSoftHSM(t, 1)
	rw := newProvider(t, cfgFor(t, "rw", map[string]any{"library": env.Library, "slot": "0", "pin": env.Tokens[0].PIN}))
	ref, err := rw.Generate(context.Background(), providers.KeySpec{KID: "k"})
	if err != nil {
		t.Fatal(err)
	}
	ro := newProvider(t, cfgFor(t, "ro", map[string]any{"library": env.Library, "slot": "0", "pin": env.Tokens[0].PIN, "readOnly": true}))
	if c := ro.Capabilities(); c.CanCreate || c.CanDelete {
		t.Fatalf("read-only capabilities %+v", c)
	}
	if _, err := ro.Generate(context.Background(), providers.KeySpec{KID: "x"}); errs.KindOf(err) != errs.Forbidden || !strings.Contains(err.Error(), "readOnly") {
		t.Fatalf("read-only generate: %v", err)
	}
	if err := ro.Delete(context.Background(), ref); errs.KindOf(err) != errs.Forbidden {
		t.Fatalf("read-only delete: %v", err)
	}
	ref.ProviderID = "ro"
	sig, err := ro.SignMessage(context.Background(), ref, "ES256", []byte("m"))
	if err != nil || !keyutil.VerifyRaw(ref.Public, []byte("m"), sig) {
		t.Fatalf("read-only sign: %v", err)
	}
}

// TestProviderConcurrency: 4× the pool size in goroutines, every signature verified, and 500
// signs cost no session opens, logins or object searches.
func TestProviderConcurrency(t *testing.T) {
	env := testenv.NewSoftHSM(t, 1)
	p := newProvider(t, cfgFor(t, "hsm", map[string]any{"library": env.Library, "slot": 0, "pin": env.Tokens[0].PIN, "poolSize": 2, "acquireTimeout": "10s"}))
	ref, err := p.Generate(context.Background(), providers.KeySpec{KID: "k"})
	if err != nil {
		t.Fatal(err)
	}
	before := p.Stats()
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for w := 0; w < 8; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 63; i++ {
				m := []byte(fmt.Sprintf("%d-%d", w, i))
				sig, err := p.SignMessage(context.Background(), ref, "ES256", m)
				if err != nil || !keyutil.VerifyRaw(ref.Public, m, sig) {
					errs <- fmt.Errorf("worker %d: %v", w, err)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	after := p.Stats()
	if after.SessionsOpened != before.SessionsOpened || after.Logins != before.Logins || after.ObjectSearches != before.ObjectSearches {
		t.Fatalf("504 signs were not free of opens/logins/searches: before %+v after %+v", before, after)
	}
}

func opensslVerify(t *testing.T, pub *ecdsa.PublicKey, msg, raw []byte) {
	t.Helper()
	dir := t.TempDir()
	spki, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		t.Fatal(err)
	}
	der, err := keyutil.RawToDER(raw)
	if err != nil {
		t.Fatal(err)
	}
	files := map[string][]byte{"pub.pem": pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: spki}), "sig.der": der, "msg.bin": msg}
	for n, b := range files {
		if err := os.WriteFile(filepath.Join(dir, n), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	testenv.NeedsBackend(t, "openssl")
	out, err := exec.Command("openssl", "dgst", "-sha256", "-verify", filepath.Join(dir, "pub.pem"),
		"-signature", filepath.Join(dir, "sig.der"), filepath.Join(dir, "msg.bin")).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "Verified OK") {
		t.Fatalf("openssl rejects the signature: %v\n%s", err, out)
	}
}

// TestTwoProvidersTwoTokensOneLibrary: two providers on two tokens of one library, one by
// label and one by index, each signs with its own keys and cannot see the other's.
func TestTwoProvidersTwoTokensOneLibrary(t *testing.T) {
	env := testenv.NewSoftHSM(t, 2)
	a := newProvider(t, cfgFor(t, "a", map[string]any{"library": env.Library, "slot": env.Tokens[0].Label, "pin": env.Tokens[0].PIN}))
	var b *Provider
	for i := 0; i < 2 && b == nil; i++ {
		p := newProvider(t, cfgFor(t, "b", map[string]any{"library": env.Library, "slot": i, "pin": env.Tokens[1].PIN}))
		if p.SlotInfo().TokenLabel == env.Tokens[1].Label {
			b = p
		}
	}
	if b == nil {
		t.Fatal("no index selected token 1")
	}
	ctx := context.Background()
	ra, err := a.Generate(ctx, providers.KeySpec{KID: "same"})
	if err != nil {
		t.Fatal(err)
	}
	rb, err := b.Generate(ctx, providers.KeySpec{KID: "same"})
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		p   *Provider
		ref providers.KeyRef
	}{{a, ra}, {b, rb}} {
		sig, err := c.p.SignMessage(ctx, c.ref, "ES256", []byte("m"))
		if err != nil || !keyutil.VerifyRaw(c.ref.Public, []byte("m"), sig) {
			t.Fatalf("%s: %v", c.p.ID(), err)
		}
	}
	if _, err := a.SignMessage(ctx, rb, "ES256", []byte("m")); !errors.Is(err, errs.NotFound) {
		t.Fatalf("provider a signed with token b's key: %v", err)
	}
	if a.SlotInfo().TokenLabel == b.SlotInfo().TokenLabel {
		t.Fatal("both providers on one token")
	}
}
