// Package keychain implements kmsgate's key chains: per-tenant bundles of a signing key, its X.509
// certificate chain, an optional root CA key, the keys rotated out and still in their grace
// period, and a rotation policy. It is the EUDIPLO-compatible domain behind the /key-chain API,
// with deviations kmsgate chose on purpose: a previous key is deleted once its grace period
// ends, imported certificates are validated, and certificates follow a corrected profile.
//
// Keys live in the chain's provider. The chain record stores only the provider's reference and the
// public JWK (store.KeyRef, the same encoding the contract face uses); certificates are signed by
// the key's own provider, so private keys never leave their backend.
package keychain

import (
	"crypto/ecdsa"
	"time"

	"github.com/kmsgate/kmsgate/appliance/keys"
	"github.com/kmsgate/kmsgate/appliance/store"
	"github.com/kmsgate/kmsgate/internal/keyutil"
	"github.com/kmsgate/kmsgate/providers"
)

// Usage types (EUDIPLO's usageType enum).
const (
	UsageAccess      = "access"
	UsageAttestation = "attestation"
	UsageTrustList   = "trustList"
	UsageStatusList  = "statusList"
	UsageEncrypt     = "encrypt"
)

// Chain types (derived, as in EUDIPLO: internalChain when a root key and certificate are stored).
const (
	TypeStandalone    = "standalone"
	TypeInternalChain = "internalChain"
)

// Key usages (EUDIPLO's `usage` column): the encrypt chain is an ECDH key and never signs.
const (
	KeyUseSign    = "sign"
	KeyUseEncrypt = "encrypt"
)

// Bounds for request validation.
const (
	MaxDescriptionLen = 1000
	MinDays           = 1
	MaxDays           = 3650
	// DefaultCertValidityDays applies to leaves when the policy names none.
	DefaultCertValidityDays = 365
	// RootValidityDays is the root CA lifetime (10 years, as EUDIPLO).
	RootValidityDays = 10 * 365
	// importDefaultIntervalDays is the interval an import with rotation enabled gets when it names
	// none (EUDIPLO K behaviour; create sets no default).
	importDefaultIntervalDays = 90
	// DefaultGrace is how long a rotated-out key stays published before it is deleted.
	DefaultGrace = 30 * 24 * time.Hour
)

var usageTypes = map[string]bool{UsageAccess: true, UsageAttestation: true, UsageTrustList: true,
	UsageStatusList: true, UsageEncrypt: true}

// ValidUsageType reports whether u is one of the usage types.
func ValidUsageType(u string) bool { return usageTypes[u] }

// Chain is the persisted key chain: what EUDIPLO stores per key chain, plus the provider
// references kmsgate needs to reach its keys.
type Chain struct {
	ID          string `json:"id"`
	Tenant      string `json:"tenant"`
	Description string `json:"description,omitempty"`
	UsageType   string `json:"usageType"`
	Usage       string `json:"usage"`
	Provider    string `json:"kmsProvider"`

	Active            store.KeyRef `json:"active"`
	ActiveCertificate string       `json:"activeCertificate"`

	Root            *store.KeyRef `json:"root,omitempty"`
	RootCertificate string        `json:"rootCertificate,omitempty"`

	// PreviousKeys are the keys rotated out and not yet deleted, oldest first; each stays
	// published until its own grace period ends.
	PreviousKeys []PreviousKey `json:"previousKeys,omitempty"`

	// Previous, PreviousCertificate and PreviousKeyExpiry are the single previous slot of records
	// written before PreviousKeys existed; migrate moves them into PreviousKeys on read and they
	// are never written again.
	Previous            *store.KeyRef `json:"previous,omitempty"`
	PreviousCertificate string        `json:"previousCertificate,omitempty"`
	PreviousKeyExpiry   *time.Time    `json:"previousKeyExpiry,omitempty"`

	Rotation      Policy     `json:"rotation"`
	LastRotatedAt *time.Time `json:"lastRotatedAt,omitempty"`
	CreatedAt     time.Time  `json:"createdAt"`
	UpdatedAt     time.Time  `json:"updatedAt"`

	// Version counts the writes of this record; every write checks, in the same store
	// transaction, that the record still has the version it was read at (see occ.go).
	Version int64 `json:"version,omitempty"`

	// base is the state the record had when it was read (never stored).
	base chainBase
}

// PreviousKey is a rotated-out key with the certificate chain it had and the end of its grace.
type PreviousKey struct {
	Key         store.KeyRef `json:"key"`
	Certificate string       `json:"certificate,omitempty"`
	Expiry      time.Time    `json:"expiry"`
}

// MaxPreviousKeys bounds the keys a chain keeps in their grace period: a rotation that would keep
// more is refused (409) rather than deleting a key whose tokens may still be in use.
const MaxPreviousKeys = 16

// migrate moves a legacy single previous key into PreviousKeys.
func (c *Chain) migrate() {
	if c.Previous == nil {
		c.PreviousCertificate, c.PreviousKeyExpiry = "", nil
		return
	}
	pk := PreviousKey{Key: *c.Previous, Certificate: c.PreviousCertificate}
	if c.PreviousKeyExpiry != nil {
		pk.Expiry = *c.PreviousKeyExpiry
	}
	c.PreviousKeys = append([]PreviousKey{pk}, c.PreviousKeys...)
	c.Previous, c.PreviousCertificate, c.PreviousKeyExpiry = nil, "", nil
}

// latestPrevious is the most recently rotated-out key, or nil.
func (c *Chain) latestPrevious() *PreviousKey {
	if len(c.PreviousKeys) == 0 {
		return nil
	}
	return &c.PreviousKeys[len(c.PreviousKeys)-1]
}

// Policy is the stored rotation policy.
type Policy struct {
	Enabled          bool `json:"enabled"`
	IntervalDays     int  `json:"intervalDays,omitempty"`
	CertValidityDays int  `json:"certValidityDays,omitempty"`
}

// Type derives standalone/internalChain like EUDIPLO: internal when root key and cert are stored.
func (c *Chain) Type() string {
	if c.Root != nil && c.RootCertificate != "" {
		return TypeInternalChain
	}
	return TypeStandalone
}

// keys lists every key the chain holds (for deletion).
func (c *Chain) keys() []store.KeyRef {
	out := []store.KeyRef{c.Active}
	for _, p := range c.PreviousKeys {
		out = append(out, p.Key)
	}
	if c.Root != nil {
		out = append(out, *c.Root)
	}
	return out
}

// nextRotation is (lastRotatedAt or createdAt) + intervalDays; ok=false when rotation is off.
func (c *Chain) nextRotation() (time.Time, bool) {
	if !c.Rotation.Enabled || c.Rotation.IntervalDays <= 0 {
		return time.Time{}, false
	}
	base := c.CreatedAt
	if c.LastRotatedAt != nil {
		base = *c.LastRotatedAt
	}
	return base.Add(time.Duration(c.Rotation.IntervalDays) * 24 * time.Hour), true
}

func (c *Chain) certValidityDays() int {
	if c.Rotation.CertValidityDays > 0 {
		return c.Rotation.CertValidityDays
	}
	return DefaultCertValidityDays
}

// storedKey converts a provider KeyRef into its persisted form inside a chain (the chain record
// holds the tenant).
func storedKey(ref providers.KeyRef, jwkAlg string) (store.KeyRef, error) {
	k, err := keys.Persisted(ref, jwkAlg)
	k.Tenant = ""
	return k, err
}

func publicOf(k store.KeyRef) (*ecdsa.PublicKey, error) {
	return keyutil.ParsePublicJWK(k.PublicJWK)
}

// ---- request DTOs (the shapes EUDIPLO's key-chain API accepts) ----

// PolicyInput is the rotationPolicy object of create/import/update requests. Pointers tell
// "absent" from zero so update can patch and validation can say what is missing.
type PolicyInput struct {
	Enabled          *bool `json:"enabled"`
	IntervalDays     *int  `json:"intervalDays,omitempty"`
	CertValidityDays *int  `json:"certValidityDays,omitempty"`
}

// CreateRequest is KeyChainCreateDto.
type CreateRequest struct {
	UsageType      string       `json:"usageType"`
	Type           string       `json:"type"`
	Description    *string      `json:"description,omitempty"`
	KMSProvider    string       `json:"kmsProvider,omitempty"`
	RotationPolicy *PolicyInput `json:"rotationPolicy,omitempty"`
}

// ImportRequest is KeyChainImportDto and the config-folder file format. ActiveKey and ActiveCrt
// are kmsgate extensions written by Export for internal chains, so that an export re-imports
// without losing the active leaf; PrivateKeyExportable is informational (written by Export).
type ImportRequest struct {
	ID                   string       `json:"id,omitempty"`
	Description          *string      `json:"description,omitempty"`
	UsageType            string       `json:"usageType"`
	Key                  *keyutil.JWK `json:"key"`
	Crt                  []string     `json:"crt,omitempty"`
	KMSProvider          string       `json:"kmsProvider,omitempty"`
	RotationPolicy       *PolicyInput `json:"rotationPolicy,omitempty"`
	ActiveKey            *keyutil.JWK `json:"activeKey,omitempty"`
	ActiveCrt            []string     `json:"activeCrt,omitempty"`
	PrivateKeyExportable *bool        `json:"privateKeyExportable,omitempty"`
}

// UpdateRequest is KeyChainUpdateDto.
type UpdateRequest struct {
	Description       *string      `json:"description,omitempty"`
	RotationPolicy    *PolicyInput `json:"rotationPolicy,omitempty"`
	ActiveCertificate *string      `json:"activeCertificate,omitempty"`
}

// SignRequest is the body of POST /key-chain/{id}/sign: exactly one of data or digest (bytes,
// already base64-decoded by the API).
type SignRequest struct {
	Data   []byte
	Digest []byte
	Alg    string
}

// SignResult is a raw signature and the kid that made it.
type SignResult struct {
	Signature []byte
	KID       string
}

// X5C choices for JWS.
const (
	X5CLeaf  = "leaf"
	X5CChain = "chain"
	X5CNone  = "none"
)

// JWSRequest is the body of POST /key-chain/{id}/jws.
type JWSRequest struct {
	Payload []byte         // JSON
	Header  map[string]any // extra protected headers
	X5C     string
}

// JWSResult is a compact JWS and its kid.
type JWSResult struct {
	JWS string `json:"jws"`
	KID string `json:"kid"`
}

// ---- response DTOs (the shapes EUDIPLO's key-chain API returns) ----

// PublicKeyInfo is the activePublicKey/previousPublicKey of a response: no coordinates.
type PublicKeyInfo struct {
	Kty string `json:"kty"`
	Alg string `json:"alg,omitempty"`
	Kid string `json:"kid,omitempty"`
	Crv string `json:"crv,omitempty"`
}

// CertificateInfo describes a stored PEM chain by its first certificate.
type CertificateInfo struct {
	PEM          string     `json:"pem"`
	Subject      string     `json:"subject,omitempty"`
	Issuer       string     `json:"issuer,omitempty"`
	NotBefore    *time.Time `json:"notBefore,omitempty"`
	NotAfter     *time.Time `json:"notAfter,omitempty"`
	SerialNumber string     `json:"serialNumber,omitempty"`
}

// PolicyInfo is the rotationPolicy of a response.
type PolicyInfo struct {
	Enabled          bool       `json:"enabled"`
	IntervalDays     *int       `json:"intervalDays,omitempty"`
	CertValidityDays *int       `json:"certValidityDays,omitempty"`
	NextRotationAt   *time.Time `json:"nextRotationAt,omitempty"`
}

// Response is KeyChainResponseDto.
type Response struct {
	ID                  string           `json:"id"`
	UsageType           string           `json:"usageType"`
	Type                string           `json:"type"`
	Description         string           `json:"description,omitempty"`
	KMSProvider         string           `json:"kmsProvider"`
	ActivePublicKey     PublicKeyInfo    `json:"activePublicKey"`
	ActiveCertificate   *CertificateInfo `json:"activeCertificate,omitempty"`
	RootCertificate     *CertificateInfo `json:"rootCertificate,omitempty"`
	PreviousPublicKey   *PublicKeyInfo   `json:"previousPublicKey,omitempty"`
	PreviousCertificate *CertificateInfo `json:"previousCertificate,omitempty"`
	PreviousKeyExpiry   *time.Time       `json:"previousKeyExpiry,omitempty"`
	RotationPolicy      PolicyInfo       `json:"rotationPolicy"`
	LastRotatedAt       *time.Time       `json:"lastRotatedAt,omitempty"`
	CreatedAt           time.Time        `json:"createdAt"`
	UpdatedAt           time.Time        `json:"updatedAt"`
}

// ExportPolicy is the rotationPolicy of an export.
type ExportPolicy struct {
	Enabled          bool `json:"enabled"`
	IntervalDays     *int `json:"intervalDays,omitempty"`
	CertValidityDays *int `json:"certValidityDays,omitempty"`
}

// Export is KeyChainExportDto (the import-file format) plus kmsgate's extensions: for an internal
// chain `activeKey`/`activeCrt` carry the active leaf so nothing is lost on re-import, and
// `privateKeyExportable` says whether `key` holds private material (false for external
// providers, whose keys never leave the backend: such an export cannot be re-imported).
type Export struct {
	ID                   string        `json:"id"`
	Description          string        `json:"description,omitempty"`
	UsageType            string        `json:"usageType"`
	Key                  keyutil.JWK   `json:"key"`
	Crt                  []string      `json:"crt,omitempty"`
	KMSProvider          string        `json:"kmsProvider,omitempty"`
	RotationPolicy       *ExportPolicy `json:"rotationPolicy,omitempty"`
	ActiveKey            *keyutil.JWK  `json:"activeKey,omitempty"`
	ActiveCrt            []string      `json:"activeCrt,omitempty"`
	PrivateKeyExportable bool          `json:"privateKeyExportable"`
}

// ProviderInfo is one entry of GET /key-chain/providers.
type ProviderInfo struct {
	Name         string                 `json:"name"`
	Type         string                 `json:"type"`
	Description  string                 `json:"description,omitempty"`
	Capabilities providers.Capabilities `json:"capabilities"`
}

// ProvidersResponse is GET /key-chain/providers.
type ProvidersResponse struct {
	Providers []ProviderInfo `json:"providers"`
	Default   string         `json:"default"`
}

// JWKS is a JSON Web Key Set of public keys.
type JWKS struct {
	Keys []keyutil.JWK `json:"keys"`
}
