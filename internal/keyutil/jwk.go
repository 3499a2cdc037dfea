// Package keyutil holds the key encodings shared by providers and the API: EC JWKs, uncompressed
// points, and the conversions between raw r‖s and DER ECDSA signatures.
package keyutil

import (
	"crypto/ecdh"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/subtle"
	"crypto/x509"
	"encoding/base64"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
)

// JWK is an EC JSON Web Key (RFC 7517/7518). D is set only for private keys.
type JWK struct {
	Kty string `json:"kty"`
	Crv string `json:"crv,omitempty"`
	X   string `json:"x,omitempty"`
	Y   string `json:"y,omitempty"`
	D   string `json:"d,omitempty"`
	Kid string `json:"kid,omitempty"`
	Alg string `json:"alg,omitempty"`
	Use string `json:"use,omitempty"`
}

// Public returns a copy without private members.
func (j JWK) Public() JWK {
	j.D = ""
	return j
}

var b64 = base64.RawURLEncoding

// CurveForAlg returns the curve of a JOSE algorithm, or an error for an algorithm kmsgate does
// not implement. It is the one place that maps algorithms to curves.
func CurveForAlg(alg string) (elliptic.Curve, error) {
	switch alg {
	case "ES256":
		return elliptic.P256(), nil
	default:
		return nil, fmt.Errorf("unsupported algorithm %q (supported: ES256)", alg)
	}
}

// CoordSize is the byte width of one coordinate/scalar for the curve.
func CoordSize(c elliptic.Curve) int { return (c.Params().BitSize + 7) / 8 }

// PublicJWK encodes pub as a JWK with fixed-width coordinates.
func PublicJWK(pub *ecdsa.PublicKey, kid, alg string) (JWK, error) {
	if pub == nil || pub.Curve != elliptic.P256() {
		return JWK{}, errors.New("only P-256 public keys are supported")
	}
	pt, err := pub.Bytes()
	if err != nil {
		return JWK{}, fmt.Errorf("encode public key: %w", err)
	}
	n := CoordSize(pub.Curve)
	return JWK{Kty: "EC", Crv: "P-256", X: b64.EncodeToString(pt[1 : 1+n]),
		Y: b64.EncodeToString(pt[1+n:]), Kid: kid, Alg: alg}, nil
}

// PrivateJWK encodes priv including d.
func PrivateJWK(priv *ecdsa.PrivateKey, kid, alg string) (JWK, error) {
	j, err := PublicJWK(&priv.PublicKey, kid, alg)
	if err != nil {
		return JWK{}, err
	}
	d, err := priv.Bytes()
	if err != nil {
		return JWK{}, fmt.Errorf("encode private key: %w", err)
	}
	j.D = b64.EncodeToString(d)
	return j, nil
}

func decodeCoord(name, s string, size int) ([]byte, error) {
	if s == "" {
		return nil, fmt.Errorf("jwk: %q is missing", name)
	}
	b, err := b64.DecodeString(s)
	if err != nil {
		return nil, fmt.Errorf("jwk: %q is not base64url: %w", name, err)
	}
	if len(b) != size {
		return nil, fmt.Errorf("jwk: %q must be %d bytes, got %d", name, size, len(b))
	}
	return b, nil
}

// ParsePublicJWK validates kty/crv and that (x, y) is a point on P-256.
func ParsePublicJWK(j JWK) (*ecdsa.PublicKey, error) {
	if j.Kty != "EC" {
		return nil, fmt.Errorf("jwk: kty must be \"EC\", got %q", j.Kty)
	}
	if j.Crv != "P-256" {
		return nil, fmt.Errorf("jwk: crv must be \"P-256\", got %q", j.Crv)
	}
	x, err := decodeCoord("x", j.X, 32)
	if err != nil {
		return nil, err
	}
	y, err := decodeCoord("y", j.Y, 32)
	if err != nil {
		return nil, err
	}
	pt := make([]byte, 0, 65)
	pt = append(append(append(pt, 4), x...), y...)
	return ParseUncompressedPoint(elliptic.P256(), pt)
}

// ParsePrivateJWK validates a private EC JWK: kty, crv, the point is on the curve, d is in range
// and d·G equals (x, y).
func ParsePrivateJWK(j JWK) (*ecdsa.PrivateKey, error) {
	pub, err := ParsePublicJWK(j)
	if err != nil {
		return nil, err
	}
	d, err := decodeCoord("d", j.D, 32)
	if err != nil {
		return nil, err
	}
	priv, err := ecdsa.ParseRawPrivateKey(elliptic.P256(), d)
	if err != nil {
		return nil, fmt.Errorf("jwk: \"d\" is not a valid P-256 scalar: %w", err)
	}
	if !priv.PublicKey.Equal(pub) {
		return nil, errors.New("jwk: \"d\" does not match \"x\"/\"y\"")
	}
	return priv, nil
}

// ParseUncompressedPoint parses 0x04‖X‖Y and checks the point is on the curve (crypto/ecdh
// rejects off-curve points and the identity).
func ParseUncompressedPoint(c elliptic.Curve, pt []byte) (*ecdsa.PublicKey, error) {
	if c != elliptic.P256() {
		return nil, errors.New("only P-256 is supported")
	}
	if _, err := ecdh.P256().NewPublicKey(pt); err != nil {
		return nil, fmt.Errorf("not a point on P-256: %w", err)
	}
	return ecdsa.ParseUncompressedPublicKey(c, pt)
}

// SameKey reports whether two public keys are equal in constant time over their encodings.
func SameKey(a, b *ecdsa.PublicKey) bool {
	if a == nil || b == nil {
		return false
	}
	ab, err1 := a.Bytes()
	bb, err2 := b.Bytes()
	return err1 == nil && err2 == nil && subtle.ConstantTimeCompare(ab, bb) == 1
}

// bigFromRaw is used by the DER helpers.
func bigFromRaw(b []byte) *big.Int { return new(big.Int).SetBytes(b) }

// PublicPEM encodes pub as a PEM "PUBLIC KEY" (SPKI) block.
func PublicPEM(pub *ecdsa.PublicKey) ([]byte, error) {
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return nil, fmt.Errorf("marshal public key: %w", err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}), nil
}
