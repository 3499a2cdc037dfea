package keychain

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/pem"
	"fmt"
	"strings"
	"time"

	"github.com/kmsgate/kmsgate/internal/errs"
	"github.com/kmsgate/kmsgate/internal/keyutil"
)

// badCert is the 400 every certificate validation failure answers with.
func badCert(format string, args ...any) error {
	return errs.Errorf(errs.BadInput, format, args...).WithCode("invalid_certificate")
}

func badRequest(code, format string, args ...any) error {
	return errs.Errorf(errs.BadInput, format, args...).WithCode(code)
}

// label names certificate i of a crt array for error messages.
func label(field string, i, n int) string {
	role := "intermediate"
	switch {
	case i == 0 && n == 1:
		role = "only certificate"
	case i == 0:
		role = "leaf"
	case i == n-1:
		role = "last/root"
	}
	return fmt.Sprintf("%s[%d] (%s)", field, i, role)
}

// parseCertEntry accepts one certificate as PEM or as standard base64 DER (EUDIPLO L accepts both).
func parseCertEntry(s string) (*x509.Certificate, error) {
	t := strings.TrimSpace(s)
	if t == "" {
		return nil, fmt.Errorf("is empty")
	}
	if strings.HasPrefix(t, "-----BEGIN") {
		blk, rest := pem.Decode([]byte(t))
		if blk == nil {
			return nil, fmt.Errorf("is not valid PEM")
		}
		if blk.Type != "CERTIFICATE" {
			return nil, fmt.Errorf("is a PEM %q block, not a CERTIFICATE", blk.Type)
		}
		if len(bytes.TrimSpace(rest)) != 0 {
			return nil, fmt.Errorf("holds more than one PEM block: give one certificate per entry")
		}
		c, err := x509.ParseCertificate(blk.Bytes)
		if err != nil {
			return nil, fmt.Errorf("is not a valid X.509 certificate: %w", err)
		}
		return c, nil
	}
	der, err := base64.StdEncoding.DecodeString(strings.Join(strings.Fields(t), ""))
	if err != nil {
		return nil, fmt.Errorf("is neither PEM nor base64 DER")
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("is neither PEM nor base64 DER of an X.509 certificate: %w", err)
	}
	return c, nil
}

// Bounds of a stored certificate chain. A real chain is a leaf, maybe an intermediate or two and
// a root: a few KiB. Without a bound one tenant could store a megabyte-long chain that every JWS
// with x5c=chain decodes and sends.
const (
	MaxChainCerts = 10
	MaxChainDER   = 64 << 10
)

func chainTooLong(field string, format string, args ...any) error {
	return badField(IssueTooBig, []any{field}, "chain_too_long", field+" "+format, args...)
}

// badEntry is a certificate failure of entry i of field.
func badEntry(field string, i int, format string, args ...any) error {
	return at(badCert(format, args...), IssueCustom, entryPath(field, i)...)
}

// checkChainSize enforces MaxChainCerts and MaxChainDER on parsed certificates.
func checkChainSize(field string, certs []*x509.Certificate) error {
	if len(certs) > MaxChainCerts {
		return chainTooLong(field, "holds %d certificates; at most %d are accepted", len(certs), MaxChainCerts)
	}
	total := 0
	for _, c := range certs {
		total += len(c.Raw)
	}
	if total > MaxChainDER {
		return chainTooLong(field, "holds %d bytes of DER; at most %d are accepted", total, MaxChainDER)
	}
	return nil
}

// validateChain parses and checks an imported certificate array: at most MaxChainCerts entries
// and MaxChainDER bytes, no certificate twice, every entry parses, is a P-256 EC certificate, is
// valid at now, and each entry is signed by the next one (leaf first) with no issuer link pointing
// back to an earlier entry. A last entry that is self-issued must carry a valid self-signature.
// Every failure names the entry.
func validateChain(field string, entries []string, now time.Time) ([]*x509.Certificate, error) {
	n := len(entries)
	if n > MaxChainCerts {
		return nil, chainTooLong(field, "holds %d certificates; at most %d are accepted", n, MaxChainCerts)
	}
	size := 0
	for _, e := range entries {
		size += len(e)
	}
	// PEM and base64 are 4/3 of the DER plus line breaks: anything above twice the DER bound
	// cannot fit and is refused before it is decoded.
	if size > 2*MaxChainDER {
		return nil, chainTooLong(field, "is %d bytes long; at most %d bytes of DER are accepted", size, MaxChainDER)
	}
	certs := make([]*x509.Certificate, n)
	seen := make(map[[sha256.Size]byte]int, n)
	for i, e := range entries {
		c, err := parseCertEntry(e)
		if err != nil {
			return nil, badEntry(field, i, "%s %v", label(field, i, n), err)
		}
		pub, ok := c.PublicKey.(*ecdsa.PublicKey)
		if !ok || pub.Curve != elliptic.P256() {
			return nil, badEntry(field, i, "%s does not hold a P-256 EC public key", label(field, i, n))
		}
		if now.Before(c.NotBefore) {
			return nil, badEntry(field, i, "%s (subject %q) is not valid before %s", label(field, i, n), dnString(c.Subject),
				c.NotBefore.UTC().Format(time.RFC3339))
		}
		if now.After(c.NotAfter) {
			return nil, badEntry(field, i, "%s (subject %q) expired at %s", label(field, i, n), dnString(c.Subject),
				c.NotAfter.UTC().Format(time.RFC3339))
		}
		sum := sha256.Sum256(c.Raw)
		if j, dup := seen[sum]; dup {
			return nil, at(badRequest("duplicate_certificate", "%s repeats %s: give each certificate once",
				label(field, i, n), label(field, j, n)), IssueCustom, entryPath(field, i)...)
		}
		seen[sum] = i
		certs[i] = c
	}
	if err := checkChainSize(field, certs); err != nil {
		return nil, err
	}
	for i := 0; i+1 < n; i++ {
		child, parent := certs[i], certs[i+1]
		if !bytes.Equal(child.RawIssuer, parent.RawSubject) {
			return nil, badEntry(field, i, "%s: its issuer %q is not the subject %q of %s: certificates must be leaf first and each one issued by the next",
				label(field, i, n), dnString(child.Issuer), dnString(parent.Subject), label(field, i+1, n))
		}
		if err := child.CheckSignatureFrom(parent); err != nil {
			return nil, badEntry(field, i, "%s is not validly signed by %s: %v", label(field, i, n), label(field, i+1, n), err)
		}
	}
	// After the order check, so a chain given root first is told to be leaf first, not a loop.
	if err := checkLoop(field, certs); err != nil {
		return nil, err
	}
	if n > 0 {
		last := certs[n-1]
		if bytes.Equal(last.RawIssuer, last.RawSubject) && (last.BasicConstraintsValid && last.IsCA) {
			if err := last.CheckSignatureFrom(last); err != nil {
				return nil, badEntry(field, n-1, "%s: its self-signature does not verify: %v", label(field, n-1, n), err)
			}
		}
	}
	return certs, nil
}

// checkLoop refuses a chain in which a certificate is issued by one that comes before it: the
// issuer links then run in a circle instead of ending at a root. "Issued by" means the issuer name
// matches the earlier certificate's subject and the signature verifies with its key, so a CA
// that re-keys under the same name (a self-issued rollover certificate) is not taken for a loop.
func checkLoop(field string, certs []*x509.Certificate) error {
	n := len(certs)
	for i := 1; i < n; i++ {
		for j := 0; j < i; j++ {
			if !bytes.Equal(certs[i].RawIssuer, certs[j].RawSubject) {
				continue
			}
			if certs[j].CheckSignature(certs[i].SignatureAlgorithm, certs[i].RawTBSCertificate, certs[i].Signature) == nil {
				return at(badRequest("chain_loop", "%s is issued by %s, which comes before it: the issuer links loop",
					label(field, i, n), label(field, j, n)), IssueCustom, entryPath(field, i)...)
			}
		}
	}
	return nil
}

// requireKeyMatch checks that cert holds pub.
func requireKeyMatch(field string, i, n int, cert *x509.Certificate, pub *ecdsa.PublicKey, what string) error {
	cp, _ := cert.PublicKey.(*ecdsa.PublicKey)
	if !keyutil.SameKey(cp, pub) {
		return badEntry(field, i, "%s: its public key does not match the %s", label(field, i, n), what)
	}
	return nil
}

// requireCA checks that cert may sign certificates.
func requireCA(field string, i, n int, cert *x509.Certificate) error {
	if !cert.BasicConstraintsValid || !cert.IsCA {
		return badEntry(field, i, "%s is not a CA certificate (basicConstraints CA=true is required for the root)", label(field, i, n))
	}
	if cert.KeyUsage != 0 && cert.KeyUsage&x509.KeyUsageCertSign == 0 {
		return badEntry(field, i, "%s lacks the keyCertSign key usage required for the root", label(field, i, n))
	}
	return nil
}

// pemChain normalises parsed certificates to one stored PEM string.
func pemChain(certs []*x509.Certificate) string {
	p := make([]string, len(certs))
	for i, c := range certs {
		p[i] = pemOf(c)
	}
	return joinPEM(p...)
}

// splitPEMStrict returns every CERTIFICATE block of s re-encoded on its own, unparsed, so
// validateChain reports parse errors per entry.
func splitPEMStrict(s string) []string {
	var out []string
	rest := []byte(s)
	for {
		var blk *pem.Block
		blk, rest = pem.Decode(rest)
		if blk == nil {
			return out
		}
		if blk.Type == "CERTIFICATE" {
			out = append(out, string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: blk.Bytes})))
		}
	}
}
