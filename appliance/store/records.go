package store

import (
	"context"
	"errors"
	"strings"
	"time"

	"github.com/kmsgate/kmsgate/internal/keyutil"
)

// Key prefixes. Tenant-scoped records put the tenant first so a tenant's records list together,
// separated by NUL, which cannot occur in ids (ids are validated before they reach the store).
const (
	prefixTenant     = "tenant/"
	prefixCredential = "cred/"
	prefixKey        = "key/"
	prefixMeta       = "meta/"
	prefixDBKey      = "dbkey/"
)

// DBKeyKey is where the db provider keeps one sealed private key.
func DBKeyKey(id string) string { return prefixDBKey + id }

// TenantKey, CredentialKey, KeyRecordKey and MetaKey build record keys.
func TenantKey(id string) string     { return prefixTenant + id }
func CredentialKey(id string) string { return prefixCredential + id }
func KeyRecordKey(tenant, kid string) string {
	return prefixKey + tenant + "\x00" + kid
}
func KeyRecordPrefix(tenant string) string { return prefixKey + tenant + "\x00" }
func MetaKey(name string) string           { return prefixMeta + name }

// TenantPrefix, CredentialPrefix and KeyRecordsPrefix (every tenant's key records) are list
// prefixes.
const (
	TenantPrefix     = prefixTenant
	CredentialPrefix = prefixCredential
	KeyRecordsPrefix = prefixKey
)

// Tenant is an isolated namespace of keys and key chains.
type Tenant struct {
	ID   string `json:"id"`
	Name string `json:"name"`
	// Providers the tenant may use; empty means every configured provider.
	AllowedProviders []string  `json:"allowedProviders,omitempty"`
	DefaultProvider  string    `json:"defaultProvider,omitempty"`
	CreatedAt        time.Time `json:"createdAt"`
	// RevokedAt is set by a tenant revoke. Revoking the tenant's credentials covers kmsgate's own
	// credentials; external issuers' tokens name the tenant itself, so it is marked too.
	RevokedAt *time.Time `json:"revokedAt,omitempty"`
}

// Credential is an API key, or a client-certificate binding when SPKI is set. Only the SHA-256 of
// an API key's secret is stored; a binding stores the SHA-256 of the certificate's public key.
type Credential struct {
	ID              string     `json:"id"`
	TenantID        string     `json:"tenantId,omitempty"` // empty for admin credentials
	Name            string     `json:"name,omitempty"`
	SecretHash      []byte     `json:"secretHash"`
	SPKI            []byte     `json:"spki,omitempty"` // SHA-256 of the bound certificate's SubjectPublicKeyInfo
	Roles           []string   `json:"roles"`
	DefaultProvider string     `json:"defaultProvider,omitempty"`
	CreatedAt       time.Time  `json:"createdAt"`
	RevokedAt       *time.Time `json:"revokedAt,omitempty"`
}

// KeyRef is the persisted reference to a key in its provider, shared by both faces: a key record
// of the remote-KMS contract (stored on its own, with tenant, imported flag and timestamps) and
// each key of a key chain (stored inside the chain record, which holds tenant and times itself).
// The private key always stays in the provider. Records written before the reference was shared
// still decode: the field names are those both older forms used, and their "material" field
// (never filled any more) is ignored.
type KeyRef struct {
	Tenant     string      `json:"tenant,omitempty"`
	KID        string      `json:"kid"`
	ProviderID string      `json:"providerId"`
	ExternalID string      `json:"externalId,omitempty"`
	Alg        string      `json:"alg"`
	PublicJWK  keyutil.JWK `json:"publicJwk"`
	Imported   bool        `json:"imported,omitempty"`
	CreatedAt  time.Time   `json:"createdAt,omitzero"`
	UpdatedAt  time.Time   `json:"updatedAt,omitzero"`
}

// SealedKeys is the db provider's key store: sealed private keys in their own namespace.
type SealedKeys struct{ St *Store }

// Load returns the sealed key id, or found=false when it does not exist.
func (k SealedKeys) Load(ctx context.Context, id string) ([]byte, bool, error) {
	var b []byte
	err := k.St.Get(ctx, DBKeyKey(id), &b)
	if errors.Is(err, ErrNotFound) {
		return nil, false, nil
	}
	return b, err == nil, err
}

// Save writes a new sealed key; ids are random, so an existing one is an error.
func (k SealedKeys) Save(ctx context.Context, id string, sealed []byte) error {
	return k.St.Create(ctx, DBKeyKey(id), sealed)
}

// Remove deletes a sealed key; a missing one is not an error.
func (k SealedKeys) Remove(ctx context.Context, id string) error {
	return k.St.Delete(ctx, DBKeyKey(id))
}

// ParseKeyRecordKey splits a key record's store key into tenant and kid; ok is false for any
// other key.
func ParseKeyRecordKey(key string) (tenant, kid string, ok bool) {
	rest, ok := strings.CutPrefix(key, prefixKey)
	if !ok {
		return "", "", false
	}
	return strings.Cut(rest, "\x00")
}

// ParseCredentialKey returns the credential id of a credential record's store key.
func ParseCredentialKey(key string) (id string, ok bool) {
	return strings.CutPrefix(key, prefixCredential)
}

// ParseDBKeyKey returns the sealed key id of a db provider key record's store key.
func ParseDBKeyKey(key string) (id string, ok bool) { return strings.CutPrefix(key, prefixDBKey) }
