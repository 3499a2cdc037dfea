package keyutil

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"encoding/json"
	"math/big"
	"strings"
	"testing"
)

func newKey(t *testing.T) *ecdsa.PrivateKey {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func TestJWKRoundTrip(t *testing.T) {
	for i := 0; i < 20; i++ { // small coordinates (leading zero bytes) must keep their width
		k := newKey(t)
		pj, err := PublicJWK(&k.PublicKey, "kid-1", "ES256")
		if err != nil {
			t.Fatal(err)
		}
		if pj.D != "" || pj.Kty != "EC" || pj.Crv != "P-256" || len(pj.X) != 43 || len(pj.Y) != 43 {
			t.Fatalf("public JWK %+v", pj)
		}
		b, _ := json.Marshal(pj)
		if bytes.Contains(b, []byte(`"d"`)) {
			t.Fatalf("public JWK JSON carries d: %s", b)
		}
		var back JWK
		if err := json.Unmarshal(b, &back); err != nil {
			t.Fatal(err)
		}
		pub, err := ParsePublicJWK(back)
		if err != nil || !SameKey(pub, &k.PublicKey) {
			t.Fatalf("public round trip: %v", err)
		}
		sj, err := PrivateJWK(k, "kid-1", "ES256")
		if err != nil || sj.D == "" {
			t.Fatalf("private JWK: %+v %v", sj, err)
		}
		if sj.Public() != pj {
			t.Fatalf("Public() of the private JWK %+v != %+v", sj.Public(), pj)
		}
		priv, err := ParsePrivateJWK(sj)
		if err != nil || !priv.Equal(k) {
			t.Fatalf("private round trip: %v", err)
		}
	}
}

func TestParseJWKRefuses(t *testing.T) {
	k, other := newKey(t), newKey(t)
	good, _ := PrivateJWK(k, "", "ES256")
	otherJ, _ := PrivateJWK(other, "", "ES256")
	n := elliptic.P256().Params().N
	mut := func(f func(*JWK)) JWK { j := good; f(&j); return j }
	for name, c := range map[string]struct {
		j    JWK
		priv bool
		want string
	}{
		"kty":            {mut(func(j *JWK) { j.Kty = "RSA" }), false, "kty"},
		"crv":            {mut(func(j *JWK) { j.Crv = "P-384" }), false, "crv"},
		"x missing":      {mut(func(j *JWK) { j.X = "" }), false, "missing"},
		"x not b64url":   {mut(func(j *JWK) { j.X = "+/" + j.X[2:] }), false, "base64url"},
		"x short":        {mut(func(j *JWK) { j.X = b64.EncodeToString(make([]byte, 31)) }), false, "32 bytes"},
		"off curve":      {mut(func(j *JWK) { j.Y = otherJ.Y }), false, "not a point"},
		"d missing":      {mut(func(j *JWK) { j.D = "" }), true, "missing"},
		"d of other key": {mut(func(j *JWK) { j.D = otherJ.D }), true, "does not match"},
		"d zero":         {mut(func(j *JWK) { j.D = b64.EncodeToString(make([]byte, 32)) }), true, "scalar"},
		"d = n":          {mut(func(j *JWK) { j.D = b64.EncodeToString(n.FillBytes(make([]byte, 32))) }), true, "scalar"},
	} {
		var err error
		if c.priv {
			_, err = ParsePrivateJWK(c.j)
		} else {
			_, err = ParsePublicJWK(c.j)
		}
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: err = %v, want one mentioning %q", name, err, c.want)
		}
	}
	if _, err := PublicJWK(&newP384(t).PublicKey, "", ""); err == nil {
		t.Error("PublicJWK accepted a P-384 key")
	}
	if _, err := CurveForAlg("ES384"); err == nil {
		t.Error("CurveForAlg(ES384) accepted")
	}
}

func newP384(t *testing.T) *ecdsa.PrivateKey {
	k, err := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func TestRawDERRoundTripAndEdges(t *testing.T) {
	k := newKey(t)
	d := sha256.Sum256([]byte("m"))
	for i := 0; i < 50; i++ {
		der, err := ecdsa.SignASN1(rand.Reader, k, d[:])
		if err != nil {
			t.Fatal(err)
		}
		raw, err := DERToRaw(der, 32)
		if err != nil || len(raw) != 64 || !VerifyRawDigest(&k.PublicKey, d[:], raw) {
			t.Fatalf("DER→raw: %v", err)
		}
		back, err := RawToDER(raw)
		if err != nil || !bytes.Equal(back, der) {
			t.Fatalf("raw→DER is not the original DER: %x vs %x (%v)", back, der, err)
		}
	}
	// High bit set (DER needs a 0x00 pad) and small values (DER is shorter than 32 bytes).
	raw := make([]byte, 64)
	raw[0] = 0xff
	raw[63] = 0x01
	der, err := RawToDER(raw)
	if err != nil {
		t.Fatal(err)
	}
	if got, err := DERToRaw(der, 32); err != nil || !bytes.Equal(got, raw) {
		t.Fatalf("padded/short integers: %x %v", got, err)
	}
	for name, raw := range map[string][]byte{"empty": nil, "odd": make([]byte, 63)} {
		if _, err := RawToDER(raw); err == nil {
			t.Errorf("RawToDER(%s) accepted", name)
		}
	}
	big33 := new(big.Int).Lsh(big.NewInt(1), 8*32) // 33 bytes: too wide for P-256
	for name, der := range map[string][]byte{
		"trailing byte":  append(append([]byte{}, der...), 0),
		"not a sequence": {0x04, 0x02, 0x01, 0x01},
		"one integer":    {0x30, 0x03, 0x02, 0x01, 0x01},
		"negative":       {0x30, 0x06, 0x02, 0x01, 0x81, 0x02, 0x01, 0x01},
		"non-minimal":    {0x30, 0x07, 0x02, 0x02, 0x00, 0x01, 0x02, 0x01, 0x01},
		"zero":           {0x30, 0x06, 0x02, 0x01, 0x00, 0x02, 0x01, 0x01},
		"three integers": {0x30, 0x09, 0x02, 0x01, 0x01, 0x02, 0x01, 0x01, 0x02, 0x01, 0x01},
		"oversize r":     mustDER(t, big33, big.NewInt(1)),
		"empty":          nil,
		"empty integer":  {0x30, 0x05, 0x02, 0x00, 0x02, 0x01, 0x01},
	} {
		if got, err := DERToRaw(der, 32); err == nil {
			t.Errorf("DERToRaw(%s) = %x, want an error", name, got)
		}
	}
	if err := DERToRawInto(make([]byte, 63), der, 32); err == nil {
		t.Error("DERToRawInto accepted a wrong-size buffer")
	}
	if VerifyRaw(&k.PublicKey, []byte("m"), make([]byte, 63)) {
		t.Error("VerifyRaw accepted a 63-byte signature")
	}
}

func mustDER(t *testing.T, r, s *big.Int) []byte {
	t.Helper()
	raw := append(r.Bytes(), s.FillBytes(make([]byte, len(r.Bytes())))...)
	der, err := RawToDER(raw)
	if err != nil {
		t.Fatal(err)
	}
	return der
}
