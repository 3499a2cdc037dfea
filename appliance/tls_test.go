package appliance_test

import (
	"crypto/tls"
	"crypto/x509"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/kmsgate/kmsgate/appliance"
	"github.com/kmsgate/kmsgate/internal/apptest"
)

// TestTLSOffersAEADSuitesOnly: a TLS 1.2 client that offers only CBC-SHA1 suites must fail the
// handshake; AEAD suites over TLS 1.2 and TLS 1.3 work; TLS 1.1 is refused.
func TestTLSOffersAEADSuitesOnly(t *testing.T) {
	pki := newTestPKI(t)
	in := apptest.Start(t, apptest.Options{Tweak: func(o *appliance.Options) {
		o.TLSCert, o.TLSKey = pki.serverCert, pki.serverKey
	}})
	addr := strings.TrimPrefix(in.URL, "http://")
	pool := x509.NewCertPool()
	pool.AddCert(pki.ca)
	dial := func(minV, maxV uint16, suites ...uint16) (*tls.ConnectionState, error) {
		c, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", addr, &tls.Config{RootCAs: pool, MinVersion: minV, MaxVersion: maxV,
			CipherSuites: suites})
		if err != nil {
			return nil, err
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(5 * time.Second))
		st := c.ConnectionState()
		return &st, nil
	}
	if _, err := dial(tls.VersionTLS12, tls.VersionTLS12, tls.TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA,
		tls.TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA); err == nil {
		t.Fatal("TLS 1.2 handshake with only CBC-SHA1 suites succeeded")
	}
	for _, suite := range []uint16{tls.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256, tls.TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
		tls.TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256} {
		st, err := dial(tls.VersionTLS12, tls.VersionTLS12, suite)
		if err != nil {
			t.Fatalf("TLS 1.2 with %s: %v", tls.CipherSuiteName(suite), err)
		}
		if st.CipherSuite != suite {
			t.Fatalf("negotiated %s, offered only %s", tls.CipherSuiteName(st.CipherSuite), tls.CipherSuiteName(suite))
		}
	}
	if st, err := dial(tls.VersionTLS13, tls.VersionTLS13); err != nil || st.Version != tls.VersionTLS13 {
		t.Fatalf("TLS 1.3: %v", err)
	}
	if _, err := dial(tls.VersionTLS10, tls.VersionTLS11); err == nil {
		t.Fatal("TLS 1.1 handshake succeeded")
	}
}
