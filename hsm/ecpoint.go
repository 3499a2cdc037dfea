package hsm

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"fmt"

	"golang.org/x/crypto/cryptobyte"
	"golang.org/x/crypto/cryptobyte/asn1"

	"github.com/kmsgate/kmsgate/internal/keyutil"
)

// p256Params is CKA_EC_PARAMS for P-256: the DER-encoded OID 1.2.840.10045.3.1.7.
var p256Params = []byte{0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07}

// ParseECPoint parses CKA_EC_POINT as a P-256 public key. PKCS#11 says the value is a DER OCTET
// STRING wrapping the uncompressed point, but some tokens return the bare point, so both are
// accepted; either way the point must be on P-256.
func ParseECPoint(v []byte) (*ecdsa.PublicKey, error) {
	in := cryptobyte.String(v)
	var inner cryptobyte.String
	if in.ReadASN1(&inner, asn1.OCTET_STRING) && in.Empty() && len(inner) == 65 && inner[0] == 4 {
		if pub, err := keyutil.ParseUncompressedPoint(elliptic.P256(), inner); err == nil {
			return pub, nil
		}
	}
	if len(v) == 65 && v[0] == 4 {
		pub, err := keyutil.ParseUncompressedPoint(elliptic.P256(), v)
		if err != nil {
			return nil, fmt.Errorf("%w: %v", ErrBadKey, err)
		}
		return pub, nil
	}
	return nil, fmt.Errorf("%w: CKA_EC_POINT is %d bytes and neither a DER OCTET STRING holding an uncompressed P-256 point nor the bare point", ErrBadKey, len(v))
}
