// Package awskms is the "aws-kms" provider: ECC_NIST_P256 SIGN_VERIFY keys in AWS KMS (or any
// server speaking its API, via endpoint). Signing always sends a SHA-256 digest (MessageType
// DIGEST), so messages and digests take the same path and messages of any size can be signed.
package awskms

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/sha256"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync/atomic"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/aws/ratelimit"
	"github.com/aws/aws-sdk-go-v2/aws/retry"
	"github.com/aws/aws-sdk-go-v2/config"
	"github.com/aws/aws-sdk-go-v2/credentials"
	"github.com/aws/aws-sdk-go-v2/service/kms"
	"github.com/aws/aws-sdk-go-v2/service/kms/types"
	"github.com/aws/smithy-go"

	"github.com/kmsgate/kmsgate/internal/errs"
	"github.com/kmsgate/kmsgate/internal/keyutil"
	"github.com/kmsgate/kmsgate/providers"
	"github.com/kmsgate/kmsgate/providers/jwkcache"
)

// Config is the kms.json entry of an aws-kms provider.
type Config struct {
	providers.Common
	Region          string `json:"region"`
	AccessKeyID     string `json:"accessKeyId,omitempty" secret:"true"`
	SecretAccessKey string `json:"secretAccessKey,omitempty" secret:"true"`
	// Endpoint overrides the KMS endpoint (VPC endpoints, local-kms).
	Endpoint string `json:"endpoint,omitempty"`
	// Timeout bounds every call, as a Go duration ("10s").
	Timeout string `json:"timeout,omitempty"`
}

const (
	// IntentTag is the tag that carries a key's create-intent id (KeySpec.ExternalID).
	IntentTag = "KmsgateIntent"
	// DefaultTimeout bounds each KMS call.
	DefaultTimeout = 10 * time.Second
	// PendingWindowDays is the shortest deletion window AWS allows.
	PendingWindowDays = 7
	// throttleRetryAfter is the Retry-After hint for throttled calls: KMS quotas are per second.
	throttleRetryAfter = time.Second
)

// API is the subset of the KMS client the provider uses (the *kms.Client satisfies it).
type API interface {
	CreateKey(context.Context, *kms.CreateKeyInput, ...func(*kms.Options)) (*kms.CreateKeyOutput, error)
	GetPublicKey(context.Context, *kms.GetPublicKeyInput, ...func(*kms.Options)) (*kms.GetPublicKeyOutput, error)
	Sign(context.Context, *kms.SignInput, ...func(*kms.Options)) (*kms.SignOutput, error)
	ScheduleKeyDeletion(context.Context, *kms.ScheduleKeyDeletionInput, ...func(*kms.Options)) (*kms.ScheduleKeyDeletionOutput, error)
	ListKeys(context.Context, *kms.ListKeysInput, ...func(*kms.Options)) (*kms.ListKeysOutput, error)
}

// Provider is one configured aws-kms provider.
type Provider struct {
	providers.Base
	api       API
	timeout   time.Duration
	log       *slog.Logger
	cache     *jwkcache.Cache
	throttled atomic.Uint64
}

// New builds the provider. Credentials are static when both keys are given, else the SDK default
// chain (env, shared files, IMDS/ECS roles, web identity). Nothing is called at start-up.
func New(ctx context.Context, cfg providers.Config, logger *slog.Logger) (*Provider, error) {
	var c Config
	if err := providers.DecodeStrict(cfg, &c); err != nil {
		return nil, err
	}
	bad := cfg.Errorf
	if c.Region == "" {
		return nil, bad("region is required")
	}
	if (c.AccessKeyID == "") != (c.SecretAccessKey == "") {
		return nil, bad("accessKeyId and secretAccessKey must be given together (or both omitted for the SDK credential chain)")
	}
	timeout, err := providers.ParseTimeout(c.Timeout, DefaultTimeout)
	if err != nil {
		return nil, bad("%v", err)
	}
	opts := []func(*config.LoadOptions) error{
		config.WithRegion(c.Region),
		// Client-side retry quotas turn a burst of failures into "retry quota exceeded" errors that
		// hide the real cause; the gateway reports throttling to its callers instead.
		config.WithRetryer(func() aws.Retryer {
			return retry.NewStandard(func(o *retry.StandardOptions) { o.RateLimiter = ratelimit.None })
		}),
	}
	if c.AccessKeyID != "" {
		opts = append(opts, config.WithCredentialsProvider(
			credentials.NewStaticCredentialsProvider(c.AccessKeyID, c.SecretAccessKey, "")))
	}
	awsCfg, err := config.LoadDefaultConfig(ctx, opts...)
	if err != nil {
		return nil, bad("load AWS configuration: %v", err)
	}
	client := kms.NewFromConfig(awsCfg, func(o *kms.Options) {
		if c.Endpoint != "" {
			o.BaseEndpoint = aws.String(c.Endpoint)
		}
	})
	return NewWithAPI(cfg.ID, cfg.Description, client, timeout, logger), nil
}

// NewWithAPI builds a provider over any KMS API implementation. Tests use it to inject faults a
// real server cannot produce (throttling).
func NewWithAPI(id, desc string, api API, timeout time.Duration, logger *slog.Logger) *Provider {
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	if timeout <= 0 {
		timeout = DefaultTimeout
	}
	return &Provider{Base: providers.NewBase(providers.TypeAWSKMS, id, desc), api: api, timeout: timeout, cache: jwkcache.New(),
		log: logger.With("provider", id, "type", providers.TypeAWSKMS)}
}

func (p *Provider) Capabilities() providers.Capabilities {
	return providers.Capabilities{CanCreate: true, CanImport: false, CanDelete: true, CanSignDigest: true,
		CanSignMessage: true, SupportedAlgs: []string{providers.ES256}, DefaultAlg: providers.ES256}
}

// ThrottledCount is how many calls KMS throttled, for the appliance's metrics.
func (p *Provider) ThrottledCount() uint64 { return p.throttled.Load() }

func (p *Provider) fail(kind errs.Kind, op, msg string, cause error) *errs.Error {
	return &errs.Error{Kind: kind, Provider: p.ID(), Op: op, Msg: msg, Err: cause}
}

// classify maps a KMS error to a provider error kind. SDK errors name the operation and request
// id, never credentials, so they are safe to keep as the cause.
func (p *Provider) classify(op string, err error) error {
	var api smithy.APIError
	if !errors.As(err, &api) {
		if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
			return p.fail(errs.Unavailable, op, "AWS KMS did not answer in time", err)
		}
		return p.fail(errs.Unavailable, op, "AWS KMS unreachable", err)
	}
	code := api.ErrorCode()
	switch code {
	case "NotFoundException":
		return p.fail(errs.NotFound, op, "key not found in AWS KMS", err)
	case "KMSInvalidStateException":
		if strings.Contains(strings.ToLower(api.ErrorMessage()), "pending deletion") {
			return p.fail(errs.NotFound, op, "key is pending deletion in AWS KMS", err)
		}
		return p.fail(errs.Forbidden, op, "key is disabled or in a state that does not allow this", err)
	case "DisabledException":
		return p.fail(errs.Forbidden, op, "key is disabled in AWS KMS", err)
	case "ThrottlingException", "LimitExceededException", "RequestLimitExceeded", "TooManyRequestsException",
		"ServiceQuotaExceededException", "ProvisionedThroughputExceededException":
		p.throttled.Add(1)
		e := p.fail(errs.Throttled, op, "AWS KMS throttled the request ("+code+")", err)
		e.RetryAfter = throttleRetryAfter
		return e
	case "AccessDeniedException", "UnrecognizedClientException", "InvalidSignatureException",
		"IncorrectKeyException", "ExpiredTokenException", "InvalidClientTokenId":
		return p.fail(errs.Forbidden, op, "AWS KMS refused the credentials or policy ("+code+")", err)
	case "InvalidKeyUsageException", "ValidationException", "TagException", "InvalidArnException",
		"KMSInvalidSignatureException":
		return p.fail(errs.BadInput, op, "AWS KMS rejected the request ("+code+")", err)
	case "KMSInternalException", "DependencyTimeoutException", "KeyUnavailableException", "InternalFailure",
		"ServiceUnavailable":
		return p.fail(errs.Unavailable, op, "AWS KMS is unavailable ("+code+")", err)
	}
	return p.fail(errs.Internal, op, "AWS KMS error ("+code+")", err)
}

func (p *Provider) Generate(ctx context.Context, spec providers.KeySpec) (providers.KeyRef, error) {
	const op = "generate"
	if spec.KID == "" {
		return providers.KeyRef{}, p.fail(errs.BadInput, op, "kid is required", nil)
	}
	tags := []types.Tag{
		{TagKey: aws.String("TenantId"), TagValue: aws.String(truncate(spec.Tenant, 256))},
		{TagKey: aws.String("LocalKeyId"), TagValue: aws.String(truncate(spec.KID, 256))},
		{TagKey: aws.String("ManagedBy"), TagValue: aws.String("kmsgate")},
	}
	if spec.ExternalID != "" {
		// KMS assigns key ids itself, so the create intent's id cannot name the key; as a tag it
		// lets an operator find a key a crash orphaned (the sweep logs the intent id).
		tags = append(tags, types.Tag{TagKey: aws.String(IntentTag), TagValue: aws.String(truncate(spec.ExternalID, 256))})
	}
	cctx, cancel := context.WithTimeout(ctx, p.timeout)
	defer cancel()
	out, err := p.api.CreateKey(cctx, &kms.CreateKeyInput{
		KeySpec:     types.KeySpecEccNistP256,
		KeyUsage:    types.KeyUsageTypeSignVerify,
		Description: aws.String(truncate("kmsgate "+spec.Tenant+"/"+spec.KID, 8192)),
		Tags:        tags,
	})
	if err != nil {
		return providers.KeyRef{}, p.classify(op, err)
	}
	if out.KeyMetadata == nil || out.KeyMetadata.KeyId == nil {
		return providers.KeyRef{}, p.fail(errs.Internal, op, "CreateKey returned no KeyId", nil)
	}
	keyID := *out.KeyMetadata.KeyId
	pub, err := p.fetchPublic(ctx, keyID)
	if err != nil {
		// Without its public key the new key is useless to the caller: do not leave it behind.
		dctx, dcancel := context.WithTimeout(context.WithoutCancel(ctx), p.timeout)
		defer dcancel()
		if derr := p.scheduleDeletion(dctx, keyID); derr != nil {
			p.log.Warn("could not schedule deletion of a key whose public key was unreadable", "key_id", keyID, "error", derr)
		}
		return providers.KeyRef{}, err
	}
	p.cache.Put(keyID, pub)
	return providers.KeyRef{ProviderID: p.ID(), Tenant: spec.Tenant, KID: spec.KID, Alg: providers.ES256,
		ExternalID: keyID, Public: pub}, nil
}

func truncate(s string, n int) string {
	if len(s) > n {
		return s[:n]
	}
	return s
}

// Import is refused: AWS KMS only imports symmetric/HMAC material in this form, not EC signing keys.
func (p *Provider) Import(context.Context, providers.KeySpec, *ecdsa.PrivateKey) (providers.KeyRef, error) {
	return providers.KeyRef{}, p.fail(errs.NotSupported, "import",
		"AWS KMS does not support importing EC private keys; create the key in KMS", nil)
}

// Delete schedules deletion with the shortest window; a key already gone or already pending
// deletion counts as deleted.
func (p *Provider) Delete(ctx context.Context, ref providers.KeyRef) error {
	p.cache.Delete(ref.ExternalID)
	if ref.ExternalID == "" {
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, p.timeout)
	defer cancel()
	return p.scheduleDeletion(ctx, ref.ExternalID)
}

func (p *Provider) scheduleDeletion(ctx context.Context, keyID string) error {
	_, err := p.api.ScheduleKeyDeletion(ctx, &kms.ScheduleKeyDeletionInput{KeyId: aws.String(keyID),
		PendingWindowInDays: aws.Int32(PendingWindowDays)})
	if err == nil || errs.KindOf(p.classify("delete", err)) == errs.NotFound {
		return nil
	}
	var api smithy.APIError
	if errors.As(err, &api) && api.ErrorCode() == "KMSInvalidStateException" {
		return nil // already pending deletion
	}
	return p.classify("delete", err)
}

func (p *Provider) PublicKey(ctx context.Context, ref providers.KeyRef) (*ecdsa.PublicKey, error) {
	if ref.ExternalID == "" {
		return nil, p.fail(errs.NotFound, "public key", "reference has no AWS KeyId", nil)
	}
	return p.cache.GetOrFetch(ctx, ref.ExternalID, func(ctx context.Context) (*ecdsa.PublicKey, error) {
		return p.fetchPublic(ctx, ref.ExternalID)
	})
}

func (p *Provider) fetchPublic(ctx context.Context, keyID string) (*ecdsa.PublicKey, error) {
	const op = "public key"
	ctx, cancel := context.WithTimeout(ctx, p.timeout)
	defer cancel()
	out, err := p.api.GetPublicKey(ctx, &kms.GetPublicKeyInput{KeyId: aws.String(keyID)})
	if err != nil {
		return nil, p.classify(op, err)
	}
	if out.KeySpec != types.KeySpecEccNistP256 {
		return nil, p.fail(errs.NotSupported, op, fmt.Sprintf("key %s is %s, not ECC_NIST_P256", keyID, out.KeySpec), nil)
	}
	k, err := x509.ParsePKIXPublicKey(out.PublicKey)
	if err != nil {
		return nil, p.fail(errs.Internal, op, "GetPublicKey returned an unparsable SubjectPublicKeyInfo", err)
	}
	pub, ok := k.(*ecdsa.PublicKey)
	if !ok || pub.Curve != elliptic.P256() {
		return nil, p.fail(errs.Internal, op, "GetPublicKey returned a key that is not P-256", nil)
	}
	return pub, nil
}

// SignMessage hashes locally and signs the digest: KMS RAW messages are limited to 4096 bytes,
// while TBSCertificates and SD-JWTs can be larger.
func (p *Provider) SignMessage(ctx context.Context, ref providers.KeyRef, alg string, msg []byte) ([]byte, error) {
	d := sha256.Sum256(msg)
	return p.signDigest(ctx, "sign", ref, d[:])
}

func (p *Provider) SignDigest(ctx context.Context, ref providers.KeyRef, alg string, digest []byte) ([]byte, error) {
	const op = "sign digest"
	if len(digest) != sha256.Size {
		return nil, p.fail(errs.BadInput, op, fmt.Sprintf("digest must be %d bytes, got %d", sha256.Size, len(digest)), nil)
	}
	return p.signDigest(ctx, op, ref, digest)
}

func (p *Provider) signDigest(ctx context.Context, op string, ref providers.KeyRef, digest []byte) ([]byte, error) {
	if ref.ExternalID == "" {
		return nil, p.fail(errs.NotFound, op, "reference has no AWS KeyId", nil)
	}
	ctx, cancel := context.WithTimeout(ctx, p.timeout)
	defer cancel()
	out, err := p.api.Sign(ctx, &kms.SignInput{KeyId: aws.String(ref.ExternalID), Message: digest,
		MessageType: types.MessageTypeDigest, SigningAlgorithm: types.SigningAlgorithmSpecEcdsaSha256})
	if err != nil {
		return nil, p.classify(op, err)
	}
	raw, err := keyutil.DERToRaw(out.Signature, 32)
	if err != nil {
		return nil, p.fail(errs.Internal, op, "AWS KMS returned a malformed DER signature", err)
	}
	return raw, nil
}

// Health lists one key: it proves the endpoint answers and the credentials are accepted. It makes
// a single attempt so that a down endpoint is reported within the probe's deadline.
func (p *Provider) Health(ctx context.Context) providers.Health {
	start := time.Now()
	ctx, cancel := context.WithTimeout(ctx, p.timeout)
	defer cancel()
	_, err := p.api.ListKeys(ctx, &kms.ListKeysInput{Limit: aws.Int32(1)}, func(o *kms.Options) { o.RetryMaxAttempts = 1 })
	h := providers.Health{OK: err == nil, LatencyMs: time.Since(start).Milliseconds()}
	if err != nil {
		// The SDK error names the endpoint and request: log it, answer with the safe message.
		ce := p.classify("health", err)
		p.log.Warn("aws-kms health probe failed", "provider", p.ID(), "error", ce)
		h.Error = errs.PublicMessage(ce)
	}
	return h
}

// Close has nothing to release: the SDK's HTTP client is pooled and garbage-collected.
func (p *Provider) Close() error { return nil }

// SecretFields lists the config fields (JSON names) that hold secrets, for redacted output.
func SecretFields() []string { return providers.SecretFields(Config{}) }
