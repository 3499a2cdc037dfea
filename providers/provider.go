// Package providers defines the key-backend contract that every kmsgate provider type honours
// (db, pkcs11, vault, aws-kms, http) and the registry that is built from kms.json.
//
// The contract is deliberately small: a provider creates, imports, deletes and signs with keys it
// owns, and reports its health. It never sees tenants' credentials or HTTP; the appliance persists
// the KeyRef a provider returns and hands it back on every later call.
package providers

import (
	"context"
	"crypto/ecdsa"
	"time"
)

// Algorithms kmsgate understands. ES256 (ECDSA P-256 with SHA-256) is the only one shipped today,
// but every call carries an alg so a provider can add more without changing the contract.
const (
	ES256 = "ES256"
)

// Provider types as they appear in kms.json.
const (
	TypeDB     = "db"
	TypePKCS11 = "pkcs11"
	TypeVault  = "vault"
	TypeAWSKMS = "aws-kms"
	TypeHTTP   = "http"
)

// Capabilities tells callers what a provider can do, so they never discover it by failing half-way.
type Capabilities struct {
	CanCreate bool `json:"canCreate"`
	CanImport bool `json:"canImport"`
	CanDelete bool `json:"canDelete"`
	// CanSignDigest is false for backends that hash the message themselves (the http contract
	// without kmsgate's digest extension). Callers that hold only a digest must then send the
	// whole message instead (certificates: the TBSCertificate bytes).
	CanSignDigest  bool     `json:"canSignDigest"`
	CanSignMessage bool     `json:"canSignMessage"`
	SupportedAlgs  []string `json:"supportedAlgs"`
	DefaultAlg     string   `json:"defaultAlg"`
}

// Supports reports whether alg is one of the provider's algorithms.
func (c Capabilities) Supports(alg string) bool {
	for _, a := range c.SupportedAlgs {
		if a == alg {
			return true
		}
	}
	return false
}

// KeySpec names a key to create or import. Tenant and KID together are unique within kmsgate;
// providers that share a namespace across tenants (one PKCS#11 token, one Vault mount) must derive
// an external name that cannot collide and return it as KeyRef.ExternalID.
type KeySpec struct {
	Tenant string
	KID    string
	Alg    string
	// ExternalID is an optional identity hint: a fresh random token (hex, see ValidHint) the
	// appliance records in a create intent before it calls the backend. Providers that implement
	// Namer name the new backend object after it, so that a key whose create outlived its caller
	// (a crash between the backend call and the store write) can be found and deleted again.
	// Providers that cannot choose their objects' ids (aws-kms) attach it as a tag instead.
	ExternalID string
}

// Namer is implemented by providers that honour KeySpec.ExternalID: ExternalIDFor returns, before
// the create runs, the KeyRef.ExternalID a Generate or Import of spec will return. "" means the
// identity cannot be predicted (no hint, or a backend that assigns ids itself).
type Namer interface {
	ExternalIDFor(spec KeySpec) (string, error)
}

// ValidHint reports whether h is a well-formed KeySpec.ExternalID hint: 32 to 64 lowercase hex
// digits. Keeping it to hex lets every backend use it as (part of) a name or a CKA_ID as is.
func ValidHint(h string) bool {
	if len(h) < 32 || len(h) > 64 || len(h)%2 != 0 {
		return false
	}
	for i := 0; i < len(h); i++ {
		if c := h[i]; !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f') {
			return false
		}
	}
	return true
}

// KeyRef is everything the appliance persists about a key and hands back to the provider on later
// calls. It never holds private material: every provider, db included, keeps its keys itself and
// finds them again by ExternalID.
type KeyRef struct {
	ProviderID string
	Tenant     string
	KID        string
	Alg        string
	ExternalID string
	Public     *ecdsa.PublicKey
}

// Health is a provider's answer to a health probe.
type Health struct {
	OK        bool   `json:"ok"`
	LatencyMs int64  `json:"latencyMs"`
	Error     string `json:"error,omitempty"`
}

// Provider is one configured key backend (one entry of kms.json).
//
// Every method that can block takes a context and must honour its deadline. Sign methods return
// the fixed-width raw r‖s signature (64 bytes for P-256), never DER.
type Provider interface {
	ID() string
	Type() string
	Description() string
	Capabilities() Capabilities

	// Generate creates a new key pair inside the backend.
	Generate(ctx context.Context, spec KeySpec) (KeyRef, error)
	// Import stores an existing private key; providers that cannot import return ErrNotSupported.
	Import(ctx context.Context, spec KeySpec, priv *ecdsa.PrivateKey) (KeyRef, error)
	// Delete removes the key from the backend. It is best effort and idempotent: deleting a key
	// that is already gone is not an error.
	Delete(ctx context.Context, ref KeyRef) error
	// PublicKey returns the key's public half as the backend reports it.
	PublicKey(ctx context.Context, ref KeyRef) (*ecdsa.PublicKey, error)

	// SignMessage hashes msg with the algorithm's hash (SHA-256 for ES256) and signs it.
	SignMessage(ctx context.Context, ref KeyRef, alg string, msg []byte) ([]byte, error)
	// SignDigest signs a digest the caller already computed (32 bytes for ES256).
	SignDigest(ctx context.Context, ref KeyRef, alg string, digest []byte) ([]byte, error)

	// Health probes the backend under ctx's deadline. It never panics and never blocks past ctx.
	Health(ctx context.Context) Health
	// Close releases the backend's resources (sessions, connections).
	Close() error
}

// HealthProbe runs p.Health under timeout and fills LatencyMs, so that a provider that ignores its
// context still cannot hold a caller for longer than the timeout.
func HealthProbe(ctx context.Context, p Provider, timeout time.Duration) Health {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	start := time.Now()
	ch := make(chan Health, 1)
	go func() {
		defer func() {
			if r := recover(); r != nil {
				ch <- Health{OK: false, Error: "health probe panicked"}
			}
		}()
		ch <- p.Health(ctx)
	}()
	select {
	case h := <-ch:
		if h.LatencyMs == 0 {
			h.LatencyMs = time.Since(start).Milliseconds()
		}
		return h
	case <-ctx.Done():
		return Health{OK: false, LatencyMs: time.Since(start).Milliseconds(),
			Error: "health probe timed out after " + timeout.String()}
	}
}
