package awskms

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/credentials"
	"github.com/aws/aws-sdk-go-v2/service/kms"
	"github.com/aws/aws-sdk-go-v2/service/kms/types"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/kmsgate/kmsgate/internal/errs"
	"github.com/kmsgate/kmsgate/internal/testenv"
	"github.com/kmsgate/kmsgate/providers"
	"github.com/kmsgate/kmsgate/providers/providertest"
)

// Dummy credentials for local-kms, which does not check them.
const (
	testAccessKey = "AKIAKMSGATETEST00000"
	testSecretKey = "kmsgate-test-secret-key-not-real"
)

func newProvider(t *testing.T, cfg map[string]any) (*Provider, error) {
	t.Helper()
	cfg["id"], cfg["type"] = "aws", "aws-kms"
	raw, _ := json.Marshal(cfg)
	return New(context.Background(), providers.Config{ID: "aws", Type: "aws-kms", Raw: raw}, nil)
}

func localConfig(k *testenv.LocalKMS) map[string]any {
	return map[string]any{"region": k.Region, "endpoint": k.Endpoint, "accessKeyId": testAccessKey,
		"secretAccessKey": testSecretKey, "timeout": "5s"}
}

func randomUUID() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	b[6], b[8] = b[6]&0x0f|0x40, b[8]&0x3f|0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:])
}

func TestContractLocalKMS(t *testing.T) {
	k := testenv.StartLocalKMS(t)
	providertest.Run(t, providertest.Harness{
		New: func(t *testing.T) providers.Provider {
			p, err := newProvider(t, localConfig(k))
			if err != nil {
				t.Fatal(err)
			}
			return p
		},
		TenantScoped: true,
		MissingRef: func(s providers.KeySpec) providers.KeyRef {
			return providers.KeyRef{Tenant: s.Tenant, KID: s.KID, Alg: s.Alg, ExternalID: randomUUID()}
		},
		StopBackend:  func(*testing.T) { k.Stop() },
		StartBackend: func(*testing.T) { k.Start(t) },
	})
}

// The key is created as the seed describes (spec, usage, tags) and deletion uses the 7-day window.
func TestKeyShapeAndDeletionWindow(t *testing.T) {
	k := testenv.StartLocalKMS(t)
	p, err := newProvider(t, localConfig(k))
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	ref, err := p.Generate(ctx, providers.KeySpec{Tenant: "tenant-1", KID: "chain-active", Alg: "ES256"})
	if err != nil {
		t.Fatal(err)
	}
	client := kms.New(kms.Options{Region: k.Region, BaseEndpoint: aws.String(k.Endpoint),
		Credentials: credentials.NewStaticCredentialsProvider(testAccessKey, testSecretKey, "")})
	d, err := client.DescribeKey(ctx, &kms.DescribeKeyInput{KeyId: aws.String(ref.ExternalID)})
	if err != nil {
		t.Fatal(err)
	}
	if d.KeyMetadata.KeySpec != types.KeySpecEccNistP256 || d.KeyMetadata.KeyUsage != types.KeyUsageTypeSignVerify {
		t.Fatalf("key is %s/%s, want ECC_NIST_P256/SIGN_VERIFY", d.KeyMetadata.KeySpec, d.KeyMetadata.KeyUsage)
	}
	tags, err := client.ListResourceTags(ctx, &kms.ListResourceTagsInput{KeyId: aws.String(ref.ExternalID)})
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]string{}
	for _, tg := range tags.Tags {
		got[aws.ToString(tg.TagKey)] = aws.ToString(tg.TagValue)
	}
	want := map[string]string{"TenantId": "tenant-1", "LocalKeyId": "chain-active", "ManagedBy": "kmsgate"}
	for kk, v := range want {
		if got[kk] != v {
			t.Fatalf("tag %s = %q, want %q (all tags %v)", kk, got[kk], v, got)
		}
	}
	if err := p.Delete(ctx, ref); err != nil {
		t.Fatal(err)
	}
	d, err = client.DescribeKey(ctx, &kms.DescribeKeyInput{KeyId: aws.String(ref.ExternalID)})
	if err != nil {
		t.Fatal(err)
	}
	if d.KeyMetadata.KeyState != types.KeyStatePendingDeletion || d.KeyMetadata.DeletionDate == nil {
		t.Fatalf("after Delete the key is %s, want PendingDeletion", d.KeyMetadata.KeyState)
	}
	if days := time.Until(*d.KeyMetadata.DeletionDate).Hours() / 24; days < 6.9 || days > 7.1 {
		t.Fatalf("deletion is due in %.2f days, want the 7-day minimum window", days)
	}
	if _, err := p.PublicKey(ctx, ref); err == nil {
		t.Fatal("PublicKey after Delete was served (cache not invalidated?)")
	}
}

// local-kms cannot throttle, so this test alone uses a tiny fake endpoint that answers every call
// with KMS's ThrottlingException, to check the real SDK error becomes KindThrottled + Retry-After.
func TestThrottlingFake(t *testing.T) {
	var calls atomic.Int32
	srv := &http.Server{ReadHeaderTimeout: 5 * time.Second, Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		calls.Add(1)
		w.Header().Set("Content-Type", "application/x-amz-json-1.1")
		w.WriteHeader(http.StatusBadRequest)
		_, _ = w.Write([]byte(`{"__type":"ThrottlingException","message":"Rate exceeded"}`))
	})}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(ln)
	defer srv.Close()
	p, err := newProvider(t, map[string]any{"region": "eu-central-1", "endpoint": "http://" + ln.Addr().String(),
		"accessKeyId": testAccessKey, "secretAccessKey": testSecretKey, "timeout": "20s"})
	if err != nil {
		t.Fatal(err)
	}
	_, err = p.SignMessage(context.Background(), providers.KeyRef{ExternalID: randomUUID()}, "ES256", []byte("m"))
	if errs.KindOf(err) != errs.Throttled || errs.RetryAfterOf(err) != time.Second {
		t.Fatalf("throttled sign: %v (kind %v, retry-after %v), want KindThrottled with 1s", err, errs.KindOf(err), errs.RetryAfterOf(err))
	}
	if p.ThrottledCount() != 1 {
		t.Fatalf("ThrottledCount = %d, want 1", p.ThrottledCount())
	}
	reg := prometheus.NewPedanticRegistry()
	if err := reg.Register(p); err != nil {
		t.Fatal(err)
	}
	mfs, gerr := reg.Gather()
	if gerr != nil || len(mfs) != 1 || mfs[0].GetName() != "kmsgate_awskms_throttled_total" ||
		len(mfs[0].GetMetric()) != 1 || mfs[0].GetMetric()[0].GetCounter().GetValue() != 1 {
		t.Fatalf("throttling metric not exported as 1: %v %v", mfs, gerr)
	}
	if strings.Contains(err.Error(), testSecretKey) {
		t.Fatal("error leaks the secret key")
	}
	if n := calls.Load(); n < 1 || n > 3 {
		t.Fatalf("backend saw %d attempts, want 1..3 (bounded retries)", n)
	}
}

func TestConfig(t *testing.T) {
	bad := map[string]map[string]any{
		"missing region":     {},
		"key without secret": {"region": "eu-central-1", "accessKeyId": "AKIA"},
		"secret without key": {"region": "eu-central-1", "secretAccessKey": "s"},
		"unknown field":      {"region": "eu-central-1", "profile": "x"},
		"bad timeout":        {"region": "eu-central-1", "timeout": "-1s"},
	}
	for name, cfg := range bad {
		t.Run(name, func(t *testing.T) {
			if _, err := newProvider(t, cfg); err == nil {
				t.Fatal("accepted")
			} else if strings.Contains(err.Error(), "\"s\"") {
				t.Fatalf("error echoes the secret: %v", err)
			}
		})
	}
	// An unreachable endpoint is not a configuration error; health says what is wrong.
	p, err := newProvider(t, map[string]any{"region": "eu-central-1", "endpoint": "http://127.0.0.1:1",
		"accessKeyId": testAccessKey, "secretAccessKey": testSecretKey, "timeout": "2s"})
	if err != nil {
		t.Fatal(err)
	}
	h := p.Health(context.Background())
	if h.OK || !strings.Contains(h.Error, "unreachable") || strings.Contains(h.Error, testSecretKey) ||
		strings.Contains(h.Error, "127.0.0.1") {
		t.Fatalf("health of an unreachable endpoint: %+v", h)
	}
	if _, err := p.Import(context.Background(), providers.KeySpec{KID: "x"}, nil); errs.KindOf(err) != errs.NotSupported {
		t.Fatalf("Import: %v, want KindNotSupported", err)
	}
}
