package appliance_test

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	jose "github.com/go-jose/go-jose/v4"

	"github.com/kmsgate/kmsgate/appliance"
	"github.com/kmsgate/kmsgate/internal/apptest"
	"github.com/kmsgate/kmsgate/internal/keyutil"
	"github.com/kmsgate/kmsgate/internal/testenv"
	"github.com/kmsgate/kmsgate/providers/httpkms"
)

// TestChainedGateways puts kmsgate A's http provider in front of kmsgate B's remote-KMS contract
// face, B keeping its keys in SoftHSM2: an internal-CA key chain on A is then backed by HSM keys
// behind B. Run once over plain HTTP with an API key, and once in EUDIPLO's mtls mode: A presents a
// self-signed client certificate that B has bound to tenant gateway-a, and no API key at all.
func TestChainedGateways(t *testing.T) {
	for _, mtls := range []bool{false, true} {
		name := "http"
		if mtls {
			name = "mtls"
		}
		t.Run(name, func(t *testing.T) { chainedGateways(t, mtls) })
	}
}

func chainedGateways(t *testing.T, mtls bool) {
	hsm := testenv.NewSoftHSM(t, 1)
	var pki *testPKI
	tweak := func(*appliance.Options) {}
	if mtls {
		pki = newTestPKI(t)
		tweak = func(o *appliance.Options) {
			o.TLSCert, o.TLSKey, o.TLSClientCA = pki.serverCert, pki.serverKey, pki.caFile
		}
	}
	b := apptest.Start(t, apptest.Options{Tweak: tweak, KMSJSON: fmt.Sprintf(
		`{"defaultProvider":"hsm","providers":[{"id":"hsm","type":"pkcs11","library":%q,"slot":%q,"pin":"${B_PIN}"}]}`,
		hsm.Library, hsm.Tokens[0].Label), Env: map[string]string{"B_PIN": hsm.Tokens[0].PIN}})
	bKey := b.CreateTenant("gateway-a")
	remote := fmt.Sprintf(`{"id":"remote","type":"http","baseUrl":%q,"apiKey":"${REMOTE_KEY}"}`, b.URL)
	if mtls {
		b.URL = strings.Replace(b.URL, "http://", "https://", 1)
		b.Client = pki.client(t)
		aCert, aKey, _ := selfSigned(t, "gateway-a")
		bindCert(t, b, "gateway-a", aCert)
		remote = fmt.Sprintf(`{"id":"remote","type":"http","baseUrl":%q,`+
			`"auth":{"type":"mtls","certFile":%q,"keyFile":%q,"caFile":%q}}`, b.URL, aCert, aKey, pki.caFile)
	}
	a := apptest.Start(t, apptest.Options{KMSJSON: `{"defaultProvider":"db","providers":[` + remote + `]}`,
		Env: map[string]string{"REMOTE_KEY": bKey}})
	aKey := a.CreateTenant("issuer")

	st, body := a.Do("GET", "/key-chain/providers/health", aKey, nil)
	if st != 200 || !strings.Contains(string(body), `"providerId":"remote","type":"http","ok":true`) {
		t.Fatalf("remote provider health on A: %d %s", st, body)
	}
	st, body = a.Do("POST", "/key-chain", aKey, map[string]any{"usageType": "attestation", "type": "internalChain",
		"kmsProvider": "remote"})
	if st != 201 {
		t.Fatalf("create chain on A backed by B: %d %s", st, body)
	}
	var created struct{ ID string }
	apptest.JSON(t, body, &created)
	st, body = a.Do("GET", "/key-chain/"+created.ID, aKey, nil)
	var chain struct {
		KMSProvider     string               `json:"kmsProvider"`
		RootCertificate struct{ PEM string } `json:"rootCertificate"`
	}
	apptest.JSON(t, body, &chain)
	if st != 200 || chain.KMSProvider != "remote" || chain.RootCertificate.PEM == "" {
		t.Fatalf("chain on A: %d %s", st, body)
	}
	st, body = a.Do("POST", "/key-chain/"+created.ID+"/jws", aKey, map[string]any{
		"payload": map[string]string{"iss": "https://issuer.example.test", "vct": "urn:test"}, "x5c": "chain"})
	if st != 200 {
		t.Fatalf("jws: %d %s", st, body)
	}
	var res struct{ JWS, Kid string }
	apptest.JSON(t, body, &res)

	// Verify the JWS like a wallet would: x5c chain to the root, then the signature.
	sig, err := jose.ParseSignedCompact(res.JWS, []jose.SignatureAlgorithm{jose.ES256})
	if err != nil {
		t.Fatal(err)
	}
	hdr := sig.Signatures[0].Protected
	if hdr.KeyID != res.Kid {
		t.Fatalf("kid %q vs %q", hdr.KeyID, res.Kid)
	}
	rootBlock, _ := pem.Decode([]byte(chain.RootCertificate.PEM))
	root, err := x509.ParseCertificate(rootBlock.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AddCert(root)
	chains, err := hdr.Certificates(x509.VerifyOptions{Roots: roots})
	if err != nil || len(chains) == 0 || len(chains[0]) != 2 {
		t.Fatalf("x5c does not chain to the root: %v", err)
	}
	leaf := chains[0][0]
	if _, err := sig.Verify(leaf.PublicKey); err != nil {
		t.Fatalf("JWS signature invalid: %v", err)
	}

	// The signing key lives behind B (tenant gateway-a), on the HSM provider, under a name scoped
	// to A's tenant: A's own kid means nothing on B.
	if st, _ := b.Do("GET", "/keys/"+res.Kid, bKey, nil); st != 404 {
		t.Fatalf("B holds a key under A's raw kid %q: %d", res.Kid, st)
	}
	st, body = b.Do("GET", "/keys/"+httpkms.RemoteName("issuer", res.Kid), bKey, nil)
	var bk struct {
		PublicJWK   keyutil.JWK `json:"publicJwk"`
		KMSProvider string      `json:"kmsProvider"`
	}
	apptest.JSON(t, body, &bk)
	pub, err := keyutil.ParsePublicJWK(bk.PublicJWK)
	if st != 200 || err != nil || bk.KMSProvider != "hsm" || !pub.Equal(leaf.PublicKey.(*ecdsa.PublicKey)) {
		t.Fatalf("B does not hold the leaf key on its HSM provider: %d %s", st, body)
	}

	// Two tenants of A pick the same kid on the one remote: both succeed with distinct keys, and
	// one deleting its kid leaves the other's key signing.
	otherKey := a.CreateTenant("other")
	pubs := map[string]string{}
	for tenant, key := range map[string]string{"issuer": aKey, "other": otherKey} {
		st, body := a.Do("POST", "/keys", key, map[string]any{"kid": "shared-kid", "kmsProvider": "remote"})
		var k struct {
			PublicJWK keyutil.JWK `json:"publicJwk"`
		}
		apptest.JSON(t, body, &k)
		if st != 200 || k.PublicJWK.X == "" {
			t.Fatalf("tenant %s generating kid shared-kid on the remote: %d %s", tenant, st, body)
		}
		pubs[tenant] = k.PublicJWK.X
	}
	if pubs["issuer"] == pubs["other"] {
		t.Fatal("two tenants of A got the same remote key for the same kid")
	}
	if st, body := a.Do("DELETE", "/keys/shared-kid", otherKey, nil); st/100 != 2 {
		t.Fatalf("tenant other deleting its kid: %d %s", st, body)
	}
	if st, body := a.Do("POST", "/keys/shared-kid/sign", aKey, map[string]string{"data": "bQ=="}); st != 200 {
		t.Fatalf("tenant issuer's key after the other tenant deleted the same kid: %d %s", st, body)
	}
}

// testPKI is a throwaway CA with a server and a client certificate for mTLS.
type testPKI struct {
	caFile, serverCert, serverKey, clientCert, clientKey string
	ca                                                   *x509.Certificate
}

func newTestPKI(t *testing.T) *testPKI {
	dir := t.TempDir()
	caKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	caTmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), IsCA: true,
		BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	caDER, _ := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	ca, _ := x509.ParseCertificate(caDER)
	p := &testPKI{ca: ca, caFile: filepath.Join(dir, "ca.pem")}
	writePEM(t, p.caFile, "CERTIFICATE", caDER)
	issue := func(name string, usage x509.ExtKeyUsage, serial int64) (string, string) {
		k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		tmpl := &x509.Certificate{SerialNumber: big.NewInt(serial), Subject: pkix.Name{CommonName: name},
			NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
			ExtKeyUsage: []x509.ExtKeyUsage{usage}, KeyUsage: x509.KeyUsageDigitalSignature,
			IPAddresses: []net.IP{net.ParseIP("127.0.0.1")}}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &k.PublicKey, caKey)
		if err != nil {
			t.Fatal(err)
		}
		kd, _ := x509.MarshalPKCS8PrivateKey(k)
		cf, kf := filepath.Join(dir, name+".pem"), filepath.Join(dir, name+"-key.pem")
		writePEM(t, cf, "CERTIFICATE", der)
		writePEM(t, kf, "PRIVATE KEY", kd)
		return cf, kf
	}
	p.serverCert, p.serverKey = issue("server", x509.ExtKeyUsageServerAuth, 2)
	p.clientCert, p.clientKey = issue("client", x509.ExtKeyUsageClientAuth, 3)
	return p
}

func (p *testPKI) client(t *testing.T) *http.Client {
	cert, err := tls.LoadX509KeyPair(p.clientCert, p.clientKey)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(p.ca)
	return &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{
		RootCAs: pool, Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}}}
}

func writePEM(t *testing.T, path, typ string, der []byte) {
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
}
