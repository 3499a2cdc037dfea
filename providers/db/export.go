package db

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"

	"github.com/kmsgate/kmsgate/internal/errs"
	"github.com/kmsgate/kmsgate/providers"
)

// ExportPrivate opens a db key's sealed record and returns a copy of its private key. Only the
// db provider has this: its keys are kmsgate's own, so the export role may take them out (key-chain
// export); every other backend keeps its private keys. The copy keeps callers from mutating the
// provider's cached key.
func (p *Provider) ExportPrivate(ref providers.KeyRef) (*ecdsa.PrivateKey, error) {
	k, err := p.key(context.Background(), ref)
	if err != nil {
		return nil, err
	}
	// Not cleared: Bytes may share crypto/ecdsa's internal buffer of the cached key.
	d, err := k.Bytes()
	if err != nil {
		return nil, errs.Wrap(errs.Internal, err, "encode key")
	}
	out, err := ecdsa.ParseRawPrivateKey(elliptic.P256(), d)
	if err != nil {
		return nil, errs.Wrap(errs.Internal, err, "decode key")
	}
	return out, nil
}
