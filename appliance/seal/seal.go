// Package seal encrypts private key material at rest with AES-256-GCM under the appliance's master
// key, binding every record to its owner through associated data so that a sealed blob copied to
// another tenant or key id fails to open.
package seal

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
)

// KeySize is the master key length (AES-256).
const KeySize = 32

const version byte = 1

// Sealer seals and opens records. It is safe for concurrent use.
type Sealer struct {
	aead cipher.AEAD
}

// New builds a Sealer from a 32-byte master key.
func New(key []byte) (*Sealer, error) {
	if len(key) != KeySize {
		return nil, fmt.Errorf("master key must be %d bytes, got %d", KeySize, len(key))
	}
	block, err := aes.NewCipher(key)
	if err != nil {
		return nil, fmt.Errorf("master key: %w", err)
	}
	aead, err := cipher.NewGCM(block)
	if err != nil {
		return nil, fmt.Errorf("master key: %w", err)
	}
	return &Sealer{aead: aead}, nil
}

// AAD builds the associated data that binds a record to (purpose, tenant, kid). Length prefixes
// keep ("a","bc") and ("ab","c") apart.
func AAD(purpose, tenant, kid string) []byte {
	b := make([]byte, 0, 16+len(purpose)+len(tenant)+len(kid))
	b = append(b, "kmsgate/v1"...)
	for _, s := range []string{purpose, tenant, kid} {
		b = append(b, byte(len(s)>>8), byte(len(s)))
		b = append(b, s...)
	}
	return b
}

// Seal encrypts plaintext bound to aad. Output: version ‖ nonce ‖ ciphertext+tag.
func (s *Sealer) Seal(plaintext, aad []byte) ([]byte, error) {
	ns := s.aead.NonceSize()
	out := make([]byte, 1+ns, 1+ns+len(plaintext)+s.aead.Overhead())
	out[0] = version
	if _, err := rand.Read(out[1 : 1+ns]); err != nil {
		return nil, fmt.Errorf("seal: nonce: %w", err)
	}
	return s.aead.Seal(out, out[1:1+ns], plaintext, aad), nil
}

// ErrOpen is returned for any record that does not open: wrong master key, wrong owner or tampering.
// The three are deliberately indistinguishable.
var ErrOpen = errors.New("sealed record does not open under this master key and owner")

// Open decrypts a sealed record bound to aad.
func (s *Sealer) Open(sealed, aad []byte) ([]byte, error) {
	ns := s.aead.NonceSize()
	if len(sealed) < 1+ns+s.aead.Overhead() || sealed[0] != version {
		return nil, ErrOpen
	}
	pt, err := s.aead.Open(nil, sealed[1:1+ns], sealed[1+ns:], aad)
	if err != nil {
		return nil, ErrOpen
	}
	return pt, nil
}

// Source says where a master key came from, for the start-up log (never the key itself).
type Source string

// LoadOptions controls where the master key is looked for.
type LoadOptions struct {
	EnvValue  string // value of KMSGATE_MASTER_KEY (base64 of 32 bytes)
	File      string // --master-key-file
	CredsDir  string // $CREDENTIALS_DIRECTORY (systemd LoadCredential=)
	DataDir   string // for dev mode
	DevMode   bool   // generate <data-dir>/master-key when nothing else is configured
	Generated func(path string)
}

// LoadKey finds the master key in order: environment, file, systemd credential, dev-mode file.
func LoadKey(o LoadOptions) ([]byte, Source, error) {
	if o.EnvValue != "" {
		k, err := decodeKey(o.EnvValue)
		if err != nil {
			return nil, "", fmt.Errorf("KMSGATE_MASTER_KEY: %w", err)
		}
		return k, "environment (KMSGATE_MASTER_KEY)", nil
	}
	if o.File != "" {
		k, err := readKeyFile(o.File)
		return k, Source("file " + o.File), err
	}
	if o.CredsDir != "" {
		p := filepath.Join(o.CredsDir, "master-key")
		if _, err := os.Stat(p); err == nil {
			k, err := readKeyFile(p)
			return k, "systemd credential master-key", err
		}
	}
	if !o.DevMode {
		return nil, "", errors.New("no master key: set KMSGATE_MASTER_KEY (base64 of 32 random bytes), " +
			"--master-key-file, or a systemd credential named master-key; `kmsgate serve --dev` generates one for development")
	}
	p := filepath.Join(o.DataDir, "master-key")
	if _, err := os.Stat(p); err == nil {
		k, err := readKeyFile(p)
		return k, Source("dev file " + p), err
	} else if !errors.Is(err, fs.ErrNotExist) {
		return nil, "", fmt.Errorf("master key %s: %w", p, err)
	}
	k := make([]byte, KeySize)
	if _, err := rand.Read(k); err != nil {
		return nil, "", err
	}
	if err := os.MkdirAll(o.DataDir, 0o700); err != nil {
		return nil, "", fmt.Errorf("create data dir: %w", err)
	}
	if err := os.WriteFile(p, []byte(base64.StdEncoding.EncodeToString(k)+"\n"), 0o600); err != nil {
		return nil, "", fmt.Errorf("write dev master key: %w", err)
	}
	if o.Generated != nil {
		o.Generated(p)
	}
	return k, Source("dev file " + p + " (generated)"), nil
}

func readKeyFile(p string) ([]byte, error) {
	st, err := os.Stat(p)
	if err != nil {
		return nil, fmt.Errorf("master key file: %w", err)
	}
	if st.Mode().Perm()&0o077 != 0 {
		return nil, fmt.Errorf("master key file %s is readable by group or others (mode %v): chmod 600 it", p, st.Mode().Perm())
	}
	b, err := os.ReadFile(p)
	if err != nil {
		return nil, fmt.Errorf("master key file: %w", err)
	}
	k, err := decodeKey(string(b))
	if err != nil {
		return nil, fmt.Errorf("master key file %s: %w", p, err)
	}
	return k, nil
}

func decodeKey(s string) ([]byte, error) {
	k, err := base64.StdEncoding.DecodeString(strings.TrimSpace(s))
	if err != nil {
		return nil, errors.New("not valid base64")
	}
	if len(k) != KeySize {
		return nil, fmt.Errorf("must decode to %d bytes, got %d", KeySize, len(k))
	}
	return k, nil
}
