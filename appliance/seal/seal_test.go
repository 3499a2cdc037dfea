package seal

import (
	"bytes"
	"encoding/base64"
	"errors"
	"os"
	"path/filepath"
	"testing"
)

func TestSealBindsOwnerAndKey(t *testing.T) {
	k1 := bytes.Repeat([]byte{1}, 32)
	k2 := bytes.Repeat([]byte{2}, 32)
	s1, _ := New(k1)
	s2, _ := New(k2)
	secret := []byte("private scalar")
	blob, err := s1.Seal(secret, AAD("db-key", "tenant-a", "kid-1"))
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(blob, secret) {
		t.Fatal("sealed blob contains the plaintext")
	}
	got, err := s1.Open(blob, AAD("db-key", "tenant-a", "kid-1"))
	if err != nil || !bytes.Equal(got, secret) {
		t.Fatalf("open with the right owner failed: %v", err)
	}
	for name, open := range map[string]func() ([]byte, error){
		"other tenant":     func() ([]byte, error) { return s1.Open(blob, AAD("db-key", "tenant-b", "kid-1")) },
		"other kid":        func() ([]byte, error) { return s1.Open(blob, AAD("db-key", "tenant-a", "kid-2")) },
		"other purpose":    func() ([]byte, error) { return s1.Open(blob, AAD("chain", "tenant-a", "kid-1")) },
		"shifted boundary": func() ([]byte, error) { return s1.Open(blob, AAD("db-key", "tenant-ak", "id-1")) },
		"other master key": func() ([]byte, error) { return s2.Open(blob, AAD("db-key", "tenant-a", "kid-1")) },
		"tampered": func() ([]byte, error) {
			b := bytes.Clone(blob)
			b[len(b)-1] ^= 1
			return s1.Open(b, AAD("db-key", "tenant-a", "kid-1"))
		},
		"truncated": func() ([]byte, error) { return s1.Open(blob[:10], AAD("db-key", "tenant-a", "kid-1")) },
	} {
		if _, err := open(); !errors.Is(err, ErrOpen) {
			t.Errorf("%s: want ErrOpen, got %v", name, err)
		}
	}
	b2, _ := s1.Seal(secret, AAD("db-key", "tenant-a", "kid-1"))
	if bytes.Equal(blob, b2) {
		t.Error("two seals of the same plaintext are identical: nonce reuse")
	}
}

func TestLoadKey(t *testing.T) {
	good := base64.StdEncoding.EncodeToString(bytes.Repeat([]byte{9}, 32))
	if k, _, err := LoadKey(LoadOptions{EnvValue: good}); err != nil || len(k) != 32 {
		t.Fatalf("env key: %v", err)
	}
	if _, _, err := LoadKey(LoadOptions{EnvValue: "c2hvcnQ="}); err == nil {
		t.Fatal("a short key must be rejected")
	}
	if _, _, err := LoadKey(LoadOptions{}); err == nil {
		t.Fatal("no key outside dev mode must be an error")
	}
	dir := t.TempDir()
	f := filepath.Join(dir, "mk")
	os.WriteFile(f, []byte(good+"\n"), 0o644)
	if _, _, err := LoadKey(LoadOptions{File: f}); err == nil {
		t.Fatal("a group/world-readable key file must be rejected")
	}
	os.Chmod(f, 0o600)
	if _, _, err := LoadKey(LoadOptions{File: f}); err != nil {
		t.Fatal(err)
	}
	creds := t.TempDir()
	os.WriteFile(filepath.Join(creds, "master-key"), []byte(good), 0o400)
	if _, src, err := LoadKey(LoadOptions{CredsDir: creds}); err != nil || src != "systemd credential master-key" {
		t.Fatalf("systemd credential: %v %s", err, src)
	}
	data := t.TempDir()
	var generated string
	k1, _, err := LoadKey(LoadOptions{DevMode: true, DataDir: data, Generated: func(p string) { generated = p }})
	if err != nil || generated == "" {
		t.Fatalf("dev key not generated: %v", err)
	}
	st, _ := os.Stat(generated)
	if st.Mode().Perm() != 0o600 {
		t.Fatalf("dev key mode %v, want 0600", st.Mode().Perm())
	}
	k2, _, err := LoadKey(LoadOptions{DevMode: true, DataDir: data})
	if err != nil || !bytes.Equal(k1, k2) {
		t.Fatal("dev key must be reused on the next start")
	}
}
