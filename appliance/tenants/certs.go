package tenants

import (
	"context"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"slices"

	"github.com/kmsgate/kmsgate/appliance/store"
	"github.com/kmsgate/kmsgate/internal/errs"
)

// A client certificate authenticates by its public key alone (the SHA-256 of its
// SubjectPublicKeyInfo, the "pin"): the TLS handshake proves the client holds the private key, so
// the pin works for self-signed certificates and for ones no configured CA issued, and renewing a
// certificate over the same key keeps its binding.

// CertBinding is printed by `kmsgate tenant add-cert`.
type CertBinding struct {
	ID     string   `json:"id"`
	Tenant string   `json:"tenant"`
	Roles  []string `json:"roles"`
	SPKI   string   `json:"spki"`
}

// SPKIPin returns the pin of a certificate: SHA-256 over its SubjectPublicKeyInfo.
func SPKIPin(cert *x509.Certificate) [sha256.Size]byte {
	return sha256.Sum256(cert.RawSubjectPublicKeyInfo)
}

// FormatPin renders a pin as standard base64, the form curl's --pinnedpubkey sha256// takes and
// `openssl pkey -pubin -outform der | openssl dgst -sha256 -binary | base64` prints.
func FormatPin(pin []byte) string {
	if len(pin) == 0 {
		return ""
	}
	return base64.StdEncoding.EncodeToString(pin)
}

// ParseCertificate reads one certificate from PEM (the first CERTIFICATE block) or DER.
func ParseCertificate(data []byte) (*x509.Certificate, error) {
	der := data
	for rest := data; ; {
		var b *pem.Block
		b, rest = pem.Decode(rest)
		if b == nil {
			break
		}
		if b.Type == "CERTIFICATE" {
			der = b.Bytes
			break
		}
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, errs.Errorf(errs.BadInput, "not a PEM or DER X.509 certificate: %v", err).
			WithCode("invalid_certificate")
	}
	return cert, nil
}

// AddCert binds a client certificate to a tenant with roles (default manage,sign). The binding is
// a credential record, so `tenant list` shows it, `tenant revoke` revokes it, and the change
// notices that carry API-key revocations to other replicas carry it too. A public key can be bound
// to one tenant at a time; once that binding is revoked it may be bound again.
func (s *Service) AddCert(ctx context.Context, tenantID string, certData []byte, roles []string, name string) (*CertBinding, error) {
	if _, err := s.Tenant(ctx, tenantID); err != nil {
		return nil, err
	}
	if len(roles) == 0 {
		roles = DefaultRoles
	}
	if err := ValidateRoles(roles); err != nil {
		return nil, errs.Errorf(errs.BadInput, "%v", err).WithCode("invalid_roles")
	}
	cert, err := ParseCertificate(certData)
	if err != nil {
		return nil, err
	}
	pin := SPKIPin(cert)
	if name == "" {
		name = cert.Subject.CommonName
	}
	// The id derives from the pin, so two concurrent bindings of one key (on two replicas) meet on
	// one record and the transaction lets only one of them in.
	c := &store.Credential{ID: hex.EncodeToString(pin[:8]), TenantID: tenantID, Name: name, SPKI: pin[:],
		Roles: slices.Clone(roles), CreatedAt: s.now().UTC()}
	err = s.st.Update(ctx, func(tx *store.Txn) error {
		var old store.Credential
		err := tx.Get(store.CredentialKey(c.ID), &old)
		switch {
		case err == nil && old.RevokedAt == nil:
			return errs.Errorf(errs.Conflict, "this certificate's public key is already bound (credential %s of tenant %q): "+
				"revoke that binding first", old.ID, old.TenantID).WithCode("certificate_already_bound")
		case err != nil && !errors.Is(err, store.ErrNotFound):
			return err
		}
		return tx.Put(store.CredentialKey(c.ID), c)
	})
	if err != nil {
		return nil, err
	}
	s.remember(c)
	return &CertBinding{ID: c.ID, Tenant: tenantID, Roles: c.Roles, SPKI: FormatPin(pin[:])}, nil
}

// AuthenticateCert returns the principal bound to a certificate's pin, or nil when no active
// binding holds it. It reads memory only: the handshake and every request may call it.
func (s *Service) AuthenticateCert(pin []byte) *Principal {
	s.mu.RLock()
	c := s.pins[string(pin)]
	s.mu.RUnlock()
	if c == nil {
		return nil
	}
	return c.principal
}
