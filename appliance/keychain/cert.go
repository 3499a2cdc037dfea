package keychain

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha1"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/hex"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"net/url"
	"strings"
	"time"

	"golang.org/x/crypto/cryptobyte"
	cbasn1 "golang.org/x/crypto/cryptobyte/asn1"

	"github.com/kmsgate/kmsgate/appliance/keys"
	"github.com/kmsgate/kmsgate/internal/errs"
	"github.com/kmsgate/kmsgate/internal/keyutil"
	"github.com/kmsgate/kmsgate/providers"
)

// oidECDSAWithSHA256 is the only signature algorithm kmsgate certificates use.
var oidECDSAWithSHA256 = asn1.ObjectIdentifier{1, 2, 840, 10045, 4, 3, 2}

// certProfile holds the deployment-wide parts of the certificate profile.
type certProfile struct {
	country string
	host    string // SAN from the public URL; "" = no SAN
}

func newCertProfile(publicURL, country string) certProfile {
	if country == "" {
		country = "DE"
	}
	p := certProfile{country: country}
	if publicURL != "" {
		if u, err := url.Parse(publicURL); err == nil {
			p.host = u.Hostname()
		}
	}
	return p
}

// signer is a key that signs through the key lifecycle and its provider.
type signer struct {
	lc   *keys.Lifecycle
	prov providers.Provider
	ref  providers.KeyRef
}

func (s *Service) signerOf(prov providers.Provider, ref providers.KeyRef) signer {
	return signer{lc: s.lc, prov: prov, ref: ref}
}

// sign signs msg with ES256, sending only the digest when the backend accepts one (less data to
// a remote KMS) and the whole message otherwise.
func (s signer) sign(ctx context.Context, msg []byte) ([]byte, error) {
	caps := s.prov.Capabilities()
	if caps.CanSignDigest {
		d := sha256.Sum256(msg)
		return s.lc.Sign(ctx, s.prov, caps, s.ref, providers.ES256, d[:], true)
	}
	return s.lc.Sign(ctx, s.prov, caps, s.ref, providers.ES256, msg, false)
}

// ski is the RFC 5280 method-1 key identifier: SHA-1 over the 65-byte uncompressed EC point. Set
// explicitly on every certificate because Go only fills it for CAs, and newer Go versions use a
// truncated SHA-256 instead.
func ski(pub *ecdsa.PublicKey) ([]byte, error) {
	pt, err := pub.Bytes()
	if err != nil {
		return nil, fmt.Errorf("encode public key: %w", err)
	}
	h := sha1.Sum(pt)
	return h[:], nil
}

// randomSerial is 16 random bytes as a positive INTEGER (top bit cleared so it never needs a pad
// byte; a zero first byte is replaced so the serial always has 16 significant bytes).
func randomSerial() (*big.Int, error) {
	b := make([]byte, 16)
	if _, err := rand.Read(b); err != nil {
		return nil, fmt.Errorf("serial: %w", err)
	}
	b[0] &= 0x7f
	if b[0] == 0 {
		b[0] = 1
	}
	return new(big.Int).SetBytes(b), nil
}

// certSpec is one certificate to issue.
type certSpec struct {
	commonName string
	ca         bool
	days       int
	subjectPub *ecdsa.PublicKey
	// issuer is the CA certificate for CA-signed leaves; nil for self-signed certificates.
	issuer *x509.Certificate
	now    time.Time
}

// issue builds a certificate and has the issuing key's provider sign it.
//
// x509.CreateCertificate needs a crypto.Signer, but providers that only sign whole messages
// cannot implement one. So the TBSCertificate is produced by CreateCertificate with a throwaway
// in-memory signer and a parent whose PublicKey is nil (Go then skips its signer/parent key-match
// check); since SKI, AKI and the issuer name are all set explicitly, the TBS does not depend on the
// throwaway key. The real signature over the TBS comes from the provider and the certificate is
// assembled by hand, then parsed and verified so a broken backend cannot produce a bad chain.
func (p certProfile) issue(ctx context.Context, spec certSpec, by signer) (*x509.Certificate, error) {
	subjectKeyID, err := ski(spec.subjectPub)
	if err != nil {
		return nil, err
	}
	serial, err := randomSerial()
	if err != nil {
		return nil, err
	}
	// notBefore is rounded down to the hour so mdoc MSO timestamps (also hour-rounded) fall inside
	// the validity.
	nb := spec.now.UTC().Truncate(time.Hour)
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{Country: []string{p.country}, CommonName: spec.commonName},
		NotBefore:             nb,
		NotAfter:              nb.Add(time.Duration(spec.days) * 24 * time.Hour),
		BasicConstraintsValid: true,
		IsCA:                  spec.ca,
		SubjectKeyId:          subjectKeyID,
		SignatureAlgorithm:    x509.ECDSAWithSHA256,
	}
	if spec.ca {
		tmpl.MaxPathLen = -1 // no pathLen constraint, as EUDIPLO's root
		// keyEncipherment (EUDIPLO's profile) is deliberately absent: it is meaningless for EC keys,
		// which cannot encrypt, and strict validators flag it.
		tmpl.KeyUsage = x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature
	} else {
		tmpl.KeyUsage = x509.KeyUsageDigitalSignature
	}
	if p.host != "" {
		if ip := net.ParseIP(p.host); ip != nil {
			tmpl.IPAddresses = []net.IP{ip}
		} else {
			tmpl.DNSNames = []string{p.host}
		}
	}
	parent := tmpl
	if spec.issuer != nil {
		cp := *spec.issuer
		cp.PublicKey = nil
		parent = &cp
		tmpl.AuthorityKeyId = spec.issuer.SubjectKeyId
	}
	throwaway, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("throwaway key: %w", err)
	}
	draft, err := x509.CreateCertificate(rand.Reader, tmpl, parent, spec.subjectPub, throwaway)
	if err != nil {
		return nil, fmt.Errorf("build certificate: %w", err)
	}
	parsed, err := x509.ParseCertificate(draft)
	if err != nil {
		return nil, fmt.Errorf("parse draft certificate: %w", err)
	}
	tbs := parsed.RawTBSCertificate
	raw, err := by.sign(ctx, tbs)
	if err != nil {
		return nil, fmt.Errorf("sign certificate: %w", err)
	}
	sigDER, err := keyutil.RawToDER(raw)
	if err != nil {
		return nil, fmt.Errorf("certificate signature from provider: %w", err)
	}
	var b cryptobyte.Builder
	b.AddASN1(cbasn1.SEQUENCE, func(b *cryptobyte.Builder) {
		b.AddBytes(tbs)
		b.AddASN1(cbasn1.SEQUENCE, func(b *cryptobyte.Builder) { b.AddASN1ObjectIdentifier(oidECDSAWithSHA256) })
		b.AddASN1BitString(sigDER)
	})
	der, err := b.Bytes()
	if err != nil {
		return nil, fmt.Errorf("assemble certificate: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("parse certificate: %w", err)
	}
	issuer := spec.issuer
	if issuer == nil {
		issuer = cert
	}
	// A self-signed leaf is no CA, so CheckSignatureFrom would refuse it as its own parent:
	// check the raw signature against its own key instead.
	if spec.issuer == nil && !spec.ca {
		err = cert.CheckSignature(cert.SignatureAlgorithm, cert.RawTBSCertificate, cert.Signature)
	} else {
		err = cert.CheckSignatureFrom(issuer)
	}
	if err != nil {
		return nil, errs.Wrap(errs.Internal, err, "the provider's certificate signature does not verify")
	}
	return cert, nil
}

// pemOf encodes one certificate as PEM.
func pemOf(c *x509.Certificate) string {
	return string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw}))
}

// joinPEM joins PEM certificates the way EUDIPLO stores chains (newline-separated, leaf first).
func joinPEM(pems ...string) string {
	out := make([]string, 0, len(pems))
	for _, p := range pems {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	if len(out) == 0 {
		return ""
	}
	return strings.Join(out, "\n") + "\n"
}

// parsePEMChain parses every CERTIFICATE block of s in order.
func parsePEMChain(s string) ([]*x509.Certificate, error) {
	var out []*x509.Certificate
	rest := []byte(s)
	for {
		var blk *pem.Block
		blk, rest = pem.Decode(rest)
		if blk == nil {
			break
		}
		if blk.Type != "CERTIFICATE" {
			continue
		}
		c, err := x509.ParseCertificate(blk.Bytes)
		if err != nil {
			return nil, fmt.Errorf("certificate %d: %w", len(out), err)
		}
		out = append(out, c)
	}
	return out, nil
}

// splitPEM returns each certificate of a stored chain as its own PEM string.
func splitPEM(s string) []string {
	certs, err := parsePEMChain(s)
	if err != nil {
		return nil
	}
	out := make([]string, len(certs))
	for i, c := range certs {
		out[i] = pemOf(c)
	}
	return out
}

var attrNames = map[string]string{
	"2.5.4.6": "C", "2.5.4.10": "O", "2.5.4.11": "OU", "2.5.4.3": "CN", "2.5.4.7": "L", "2.5.4.8": "ST",
	"2.5.4.9": "STREET", "2.5.4.17": "postalCode", "2.5.4.5": "serialNumber", "2.5.4.97": "organizationIdentifier",
	"0.9.2342.19200300.100.1.25": "DC", "1.2.840.113549.1.9.1": "emailAddress",
}

// dnString formats a name as EUDIPLO does ("C=DE, CN=..."), in encoded order. Go's
// pkix.Name.String() would give the reversed RFC 4514 form "CN=...,C=DE".
func dnString(n pkix.Name) string {
	parts := make([]string, 0, len(n.Names))
	for _, a := range n.Names {
		k, ok := attrNames[a.Type.String()]
		if !ok {
			k = a.Type.String()
		}
		parts = append(parts, fmt.Sprintf("%s=%v", k, a.Value))
	}
	return strings.Join(parts, ", ")
}

// certInfo describes a stored PEM chain by its first certificate; nil for an empty chain. When
// parsing fails only the PEM is returned, as EUDIPLO does.
func certInfo(chain string) *CertificateInfo {
	if strings.TrimSpace(chain) == "" {
		return nil
	}
	ci := &CertificateInfo{PEM: chain}
	certs, err := parsePEMChain(chain)
	if err != nil || len(certs) == 0 {
		return ci
	}
	c := certs[0]
	nb, na := c.NotBefore.UTC(), c.NotAfter.UTC()
	ci.Subject, ci.Issuer = dnString(c.Subject), dnString(c.Issuer)
	ci.NotBefore, ci.NotAfter = &nb, &na
	ci.SerialNumber = hex.EncodeToString(c.SerialNumber.Bytes())
	return ci
}
