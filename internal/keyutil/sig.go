package keyutil

import (
	"crypto/ecdsa"
	"crypto/sha256"
	"errors"
	"fmt"

	"golang.org/x/crypto/cryptobyte"
	"golang.org/x/crypto/cryptobyte/asn1"
)

// RawToDER converts a fixed-width r‖s signature to an ASN.1 DER ECDSA-Sig-Value.
func RawToDER(raw []byte) ([]byte, error) {
	if len(raw) == 0 || len(raw)%2 != 0 {
		return nil, fmt.Errorf("raw signature has odd or zero length %d", len(raw))
	}
	n := len(raw) / 2
	var b cryptobyte.Builder
	b.AddASN1(asn1.SEQUENCE, func(b *cryptobyte.Builder) {
		b.AddASN1BigInt(bigFromRaw(raw[:n]))
		b.AddASN1BigInt(bigFromRaw(raw[n:]))
	})
	return b.Bytes()
}

// DERToRaw converts a DER ECDSA-Sig-Value to fixed-width r‖s with size bytes per integer. It is
// strict: trailing bytes, wrong tags, negative or oversize integers and non-minimal encodings are
// rejected, because a lenient parser is how a wrong signature reaches a JWS.
func DERToRaw(der []byte, size int) ([]byte, error) {
	out := make([]byte, 2*size)
	if err := DERToRawInto(out, der, size); err != nil {
		return nil, err
	}
	return out, nil
}

// DERToRawInto is DERToRaw writing into out (len 2*size), for callers that reuse buffers.
func DERToRawInto(out, der []byte, size int) error {
	if len(out) != 2*size {
		return errors.New("output buffer has the wrong size")
	}
	in := cryptobyte.String(der)
	var seq cryptobyte.String
	if !in.ReadASN1(&seq, asn1.SEQUENCE) || !in.Empty() {
		return errors.New("signature is not a single DER SEQUENCE")
	}
	for i := 0; i < 2; i++ {
		var v cryptobyte.String
		if !seq.ReadASN1(&v, asn1.INTEGER) {
			return errors.New("signature SEQUENCE does not hold two INTEGERs")
		}
		b := []byte(v)
		if len(b) == 0 {
			return errors.New("empty INTEGER in signature")
		}
		if b[0]&0x80 != 0 {
			return errors.New("negative INTEGER in signature")
		}
		if len(b) > 1 && b[0] == 0 && b[1]&0x80 == 0 {
			return errors.New("non-minimal INTEGER encoding in signature")
		}
		if b[0] == 0 {
			b = b[1:]
		}
		if len(b) > size {
			return fmt.Errorf("signature INTEGER is %d bytes, more than %d", len(b), size)
		}
		allZero := true
		for _, c := range b {
			if c != 0 {
				allZero = false
				break
			}
		}
		if allZero {
			return errors.New("zero INTEGER in signature")
		}
		dst := out[i*size : (i+1)*size]
		clear(dst[:size-len(b)])
		copy(dst[size-len(b):], b)
	}
	if !seq.Empty() {
		return errors.New("trailing data inside signature SEQUENCE")
	}
	return nil
}

// VerifyRaw verifies a raw r‖s ES256 signature over msg. It exists for canaries and tests.
func VerifyRaw(pub *ecdsa.PublicKey, msg, raw []byte) bool {
	d := sha256.Sum256(msg)
	return VerifyRawDigest(pub, d[:], raw)
}

// VerifyRawDigest verifies a raw r‖s signature over a digest.
func VerifyRawDigest(pub *ecdsa.PublicKey, digest, raw []byte) bool {
	n := CoordSize(pub.Curve)
	if len(raw) != 2*n {
		return false
	}
	der, err := RawToDER(raw)
	if err != nil {
		return false
	}
	return ecdsa.VerifyASN1(pub, digest, der)
}
