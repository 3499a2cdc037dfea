package pkcs11

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"testing"

	"github.com/ThalesGroup/crypto11"

	"github.com/kmsgate/kmsgate/internal/testenv"
	"github.com/kmsgate/kmsgate/providers"
)

// TestKeysUsableByAnotherPKCS11Client checks interoperability with an independent PKCS#11 stack
// (crypto11): a key pair kmsgate generates must be found by its CKA_ID and CKA_LABEL and sign with
// the public key kmsgate cached. That is what an operator relies on when another tool (backup,
// migration, an HSM vendor utility) has to work with kmsgate's objects. crypto11 is not used by
// kmsgate itself: its session pool cannot retire dead sessions (see hsm/doc.go).
func TestKeysUsableByAnotherPKCS11Client(t *testing.T) {
	env := testenv.NewSoftHSM(t, 1)
	ctx := context.Background()
	p, err := New(ctx, cfgFor(t, "hsm", map[string]any{"library": env.Library, "slot": env.Tokens[0].Label,
		"pin": env.Tokens[0].PIN}), nil)
	if err != nil {
		t.Fatal(err)
	}
	ref, err := p.Generate(ctx, providers.KeySpec{Tenant: "acme", KID: "interop-kid", Alg: "ES256"})
	if err != nil {
		t.Fatal(err)
	}
	// Finalize kmsgate's use of the library first: two PKCS#11 stacks in one process would both
	// call C_Initialize on it.
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}

	c11, err := crypto11.Configure(&crypto11.Config{Path: env.Library, TokenLabel: env.Tokens[0].Label,
		Pin: env.Tokens[0].PIN})
	if err != nil {
		t.Fatalf("crypto11: %v", err)
	}
	defer c11.Close()
	id, err := hex.DecodeString(ref.ExternalID)
	if err != nil {
		t.Fatalf("ExternalID %q is not the hex CKA_ID: %v", ref.ExternalID, err)
	}
	signer, err := c11.FindKeyPair(id, []byte("interop-kid"))
	if err != nil || signer == nil {
		t.Fatalf("crypto11 cannot find the pair by CKA_ID+CKA_LABEL: %v", err)
	}
	pub, ok := signer.Public().(*ecdsa.PublicKey)
	if !ok || !pub.Equal(ref.Public) {
		t.Fatal("the token's public key differs from the one kmsgate cached")
	}
	d := sha256.Sum256([]byte("interop"))
	der, err := signer.Sign(rand.Reader, d[:], crypto.SHA256)
	if err != nil {
		t.Fatal(err)
	}
	if !ecdsa.VerifyASN1(ref.Public, d[:], der) {
		t.Fatal("signature by the other client does not verify with kmsgate's public key")
	}
}
