package keyutil_test

import (
	"bytes"
	"math/big"
	"testing"

	"github.com/kmsgate/kmsgate/internal/keyutil"
)

// FuzzDERToRaw checks the strict DER parser the provider relies on for every KMS signature: it
// never panics, anything it accepts re-encodes to exactly the input (so it accepts only canonical
// DER), and every raw r||s with non-zero halves survives RawToDER → DERToRaw unchanged.
func FuzzDERToRaw(f *testing.F) {
	seeds := [][]byte{
		{0x30, 0x06, 0x02, 0x01, 0x01, 0x02, 0x01, 0x01},
		{0x30, 0x08, 0x02, 0x02, 0x00, 0x80, 0x02, 0x02, 0x00, 0xff},
		{0x30, 0x81, 0x06, 0x02, 0x01, 0x01, 0x02, 0x01, 0x01}, // long-form length: non-canonical
		{0x30, 0x06, 0x02, 0x01, 0x01, 0x02, 0x01, 0x01, 0x00}, // trailing byte
		{0x31, 0x06, 0x02, 0x01, 0x01, 0x02, 0x01, 0x01},       // wrong tag
		{0x30, 0x06, 0x02, 0x01, 0xff, 0x02, 0x01, 0x01},       // negative
		bytes.Repeat([]byte{0x01}, 64),
		append([]byte{0}, bytes.Repeat([]byte{0xff}, 63)...),
	}
	for _, s := range seeds {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		if raw, err := keyutil.DERToRaw(in, 32); err == nil {
			if len(raw) != 64 {
				t.Fatalf("accepted DER gave %d bytes", len(raw))
			}
			der, err := keyutil.RawToDER(raw)
			if err != nil {
				t.Fatalf("RawToDER of accepted raw: %v", err)
			}
			if !bytes.Equal(der, in) {
				t.Fatalf("DERToRaw accepted non-canonical DER %x (canonical %x)", in, der)
			}
		}
		if len(in) == 64 {
			r, s := new(big.Int).SetBytes(in[:32]), new(big.Int).SetBytes(in[32:])
			der, err := keyutil.RawToDER(in)
			if err != nil {
				t.Fatalf("RawToDER: %v", err)
			}
			back, err := keyutil.DERToRaw(der, 32)
			if r.Sign() == 0 || s.Sign() == 0 {
				if err == nil {
					t.Fatalf("zero r or s accepted: %x", in)
				}
				return
			}
			if err != nil || !bytes.Equal(back, in) {
				t.Fatalf("round trip of %x: %x, %v", in, back, err)
			}
		}
	})
}
