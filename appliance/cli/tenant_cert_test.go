package cli_test

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kmsgate/kmsgate/internal/apptest"
)

func writeSelfSigned(t *testing.T, name string) (file, pin string) {
	t.Helper()
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &k.PublicKey, k)
	if err != nil {
		t.Fatal(err)
	}
	file = filepath.Join(t.TempDir(), name+".pem")
	if err := os.WriteFile(file, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	c, _ := x509.ParseCertificate(der)
	h := sha256.Sum256(c.RawSubjectPublicKeyInfo)
	return file, base64.StdEncoding.EncodeToString(h[:])
}

type certBinding struct {
	ID     string   `json:"id"`
	Tenant string   `json:"tenant"`
	Roles  []string `json:"roles"`
	SPKI   string   `json:"spki"`
}

// TestTenantAddCert: add-cert binds a certificate offline and through the running server's admin
// socket, prints {id, tenant, roles, spki}, refuses a second binding of the same key and a file
// that holds no certificate; tenant list shows the bindings and tenant revoke removes one.
func TestTenantAddCert(t *testing.T) {
	data := t.TempDir()
	dirs := []string{"--data-dir", data}
	if out, err := run(t, append([]string{"tenant", "create", "acme"}, dirs...)...); err != nil {
		t.Fatalf("create: %v %s", err, out)
	}
	f1, pin1 := writeSelfSigned(t, "one")
	out, err := run(t, append([]string{"tenant", "add-cert", "acme", "--cert", f1, "--roles", "sign"}, dirs...)...)
	if err != nil {
		t.Fatalf("offline add-cert: %v %s", err, out)
	}
	var b1 certBinding
	if err := json.Unmarshal([]byte(out), &b1); err != nil || b1.Tenant != "acme" || b1.SPKI != pin1 ||
		len(b1.Roles) != 1 || b1.Roles[0] != "sign" || b1.ID == "" {
		t.Fatalf("offline add-cert printed %s (%v)", out, err)
	}
	if out, err := run(t, append([]string{"tenant", "add-cert", "acme", "--cert", f1}, dirs...)...); err == nil ||
		!strings.Contains(err.Error(), "already bound") {
		t.Fatalf("binding the same key twice: %v %s", err, out)
	}
	notCert := filepath.Join(t.TempDir(), "x.pem")
	_ = os.WriteFile(notCert, []byte("hello"), 0o600)
	if out, err := run(t, append([]string{"tenant", "add-cert", "acme", "--cert", notCert}, dirs...)...); err == nil {
		t.Fatalf("binding a file without a certificate: %s", out)
	}

	apptest.Start(t, apptest.Options{DataDir: data})
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		c, err := net.Dial("unix", filepath.Join(data, "admin.sock"))
		if err == nil {
			c.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("admin socket not listening: %v", err)
		}
	}
	f2, pin2 := writeSelfSigned(t, "two")
	out, err = run(t, append([]string{"tenant", "add-cert", "acme", "--cert", f2}, dirs...)...)
	var b2 certBinding
	if err != nil || json.Unmarshal([]byte(out), &b2) != nil || b2.SPKI != pin2 || len(b2.Roles) != 2 {
		t.Fatalf("add-cert through the socket: %v %s", err, out)
	}
	if out, err := run(t, append([]string{"tenant", "add-cert", "nosuch", "--cert", f2}, dirs...)...); err == nil ||
		!strings.Contains(err.Error(), "tenant_not_found") {
		t.Fatalf("add-cert for an unknown tenant: %v %s", err, out)
	}
	out, err = run(t, append([]string{"tenant", "list"}, dirs...)...)
	if err != nil || !strings.Contains(out, pin1) || !strings.Contains(out, pin2) {
		t.Fatalf("tenant list does not show both bindings: %v %s", err, out)
	}
	if out, err := run(t, append([]string{"tenant", "revoke", "--credential", b1.ID}, dirs...)...); err != nil ||
		!strings.Contains(out, b1.ID) {
		t.Fatalf("revoke binding: %v %s", err, out)
	}
	out, err = run(t, append([]string{"tenant", "list"}, dirs...)...)
	if err != nil || strings.Contains(out, pin1) || !strings.Contains(out, pin2) {
		t.Fatalf("tenant list after revoking one binding: %v %s", err, out)
	}
	// A revoked key may be bound again.
	if out, err := run(t, append([]string{"tenant", "add-cert", "acme", "--cert", f1}, dirs...)...); err != nil {
		t.Fatalf("re-binding a revoked key: %v %s", err, out)
	}
}
