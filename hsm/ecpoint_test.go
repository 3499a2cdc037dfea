package hsm

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"testing"

	"github.com/kmsgate/kmsgate/internal/keyutil"
)

func TestParseECPointForms(t *testing.T) {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	bare, _ := k.PublicKey.Bytes()
	wrapped := append([]byte{0x04, 0x41}, bare...)
	longForm := append([]byte{0x04, 0x81, 0x41}, bare...) // non-minimal length, rejected by DER
	for name, in := range map[string][]byte{"bare": bare, "der": wrapped} {
		pub, err := ParseECPoint(in)
		if err != nil || !keyutil.SameKey(pub, &k.PublicKey) {
			t.Errorf("%s: %v", name, err)
		}
	}
	offCurve := append([]byte(nil), bare...)
	offCurve[64] ^= 1
	for name, in := range map[string][]byte{
		"empty": nil, "off curve": offCurve, "off curve der": append([]byte{0x04, 0x41}, offCurve...),
		"compressed": append([]byte{0x02}, bare[1:33]...), "long form": longForm, "trailing": append(wrapped, 0),
	} {
		if _, err := ParseECPoint(in); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

// FuzzParseECPoint: whatever the token returns, the parser never panics and anything it accepts
// is a point on P-256.
func FuzzParseECPoint(f *testing.F) {
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	bare, _ := k.PublicKey.Bytes()
	f.Add(bare)
	f.Add(append([]byte{0x04, 0x41}, bare...))
	f.Add([]byte{0x04, 0x00})
	f.Fuzz(func(t *testing.T, b []byte) {
		pub, err := ParseECPoint(b)
		if err != nil {
			return
		}
		if pub.Curve != elliptic.P256() {
			t.Fatal("accepted a non-P-256 key")
		}
		enc, err := pub.Bytes()
		if err != nil {
			t.Fatal(err)
		}
		if _, err := keyutil.ParseUncompressedPoint(elliptic.P256(), enc); err != nil {
			t.Fatalf("accepted a point that is not on the curve: %v", err)
		}
	})
}
