package hsm

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"

	"github.com/miekg/pkcs11"
)

func (s *Slot) readPoint(ctx *pkcs11.Ctx, h pkcs11.SessionHandle, o pkcs11.ObjectHandle) (*ecdsa.PublicKey, error) {
	attrs, err := ctx.GetAttributeValue(h, o, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_EC_POINT, nil)})
	if err != nil {
		return nil, s.call("C_GetAttributeValue", err)
	}
	if len(attrs) != 1 {
		return nil, fmt.Errorf("%w: CKA_EC_POINT missing", ErrBadKey)
	}
	return ParseECPoint(attrs[0].Value)
}

// with runs f on a pooled session under the library's read lock.
func (s *Slot) with(ctx context.Context, f func(se *session) error) error {
	se, err := s.acquire(ctx)
	if err != nil {
		return err
	}
	if err := ctx.Err(); err != nil {
		s.release(se, nil)
		return err
	}
	if err := s.enter(se); err != nil {
		s.release(se, err)
		return err
	}
	err = f(se)
	s.leave(se)
	s.release(se, err)
	return err
}

// Generate creates a P-256 key pair on the token: CKA_LABEL = label on both objects and a random
// 16-byte CKA_ID tying them, so that two keys with one label never collide.
func (s *Slot) Generate(ctx context.Context, label string) (Key, *ecdsa.PublicKey, error) {
	id := make([]byte, 16)
	if _, err := rand.Read(id); err != nil {
		return Key{}, nil, err
	}
	return s.GenerateWithID(ctx, label, id)
}

// GenerateWithID is Generate with a CKA_ID the caller chose (at least 16 random bytes), so that
// the caller can record the key's identity before the token creates it and find the objects
// again if it never learns the outcome (a crash, a timeout).
func (s *Slot) GenerateWithID(ctx context.Context, label string, id []byte) (Key, *ecdsa.PublicKey, error) {
	if s.cfg.ReadOnly {
		return Key{}, nil, ErrReadOnly
	}
	if len(id) < 16 || len(id) > 64 {
		return Key{}, nil, fmt.Errorf("CKA_ID must be 16 to 64 bytes, got %d", len(id))
	}
	id = bytes.Clone(id)
	k := Key{ID: hex.EncodeToString(id), Label: label}
	var pub *ecdsa.PublicKey
	err := s.with(ctx, func(se *session) error {
		c := se.p.mod.ctx
		pubH, privH, err := c.GenerateKeyPair(se.h, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_EC_KEY_PAIR_GEN, nil)},
			[]*pkcs11.Attribute{
				pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PUBLIC_KEY), pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_EC),
				pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true), pkcs11.NewAttribute(pkcs11.CKA_VERIFY, true),
				pkcs11.NewAttribute(pkcs11.CKA_EC_PARAMS, p256Params),
				pkcs11.NewAttribute(pkcs11.CKA_LABEL, label), pkcs11.NewAttribute(pkcs11.CKA_ID, id),
			},
			[]*pkcs11.Attribute{
				pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PRIVATE_KEY), pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_EC),
				pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true), pkcs11.NewAttribute(pkcs11.CKA_SIGN, true),
				pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true), pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, true),
				pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, false),
				pkcs11.NewAttribute(pkcs11.CKA_LABEL, label), pkcs11.NewAttribute(pkcs11.CKA_ID, id),
			})
		if err != nil {
			return s.call("C_GenerateKeyPair", err)
		}
		pub, err = s.readPoint(c, se.h, pubH)
		if err != nil {
			// never leave a half-usable pair behind
			_ = c.DestroyObject(se.h, privH)
			_ = c.DestroyObject(se.h, pubH)
			return err
		}
		s.storeHandle(k, se.p.gen, privH)
		return nil
	})
	if err != nil {
		return Key{}, nil, err
	}
	return k, pub, nil
}

func keyTemplate(k Key, class uint, withClass bool) ([]*pkcs11.Attribute, error) {
	id, err := decodeHex(k.ID)
	if err != nil {
		return nil, err
	}
	t := []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_ID, id), pkcs11.NewAttribute(pkcs11.CKA_LABEL, k.Label)}
	if withClass {
		t = append(t, pkcs11.NewAttribute(pkcs11.CKA_CLASS, class))
	}
	return t, nil
}

// decodeHex parses Key.ID; an ID that is not hex cannot name anything this package created.
func decodeHex(s string) ([]byte, error) {
	b, err := hex.DecodeString(s)
	if err != nil || len(b) == 0 {
		return nil, fmt.Errorf("%w: key id %q is not a hex CKA_ID", ErrKeyNotFound, s)
	}
	return b, nil
}

// find runs one object search; it is the only place that calls C_FindObjectsInit.
func (s *Slot) find(se *session, tmpl []*pkcs11.Attribute, max int) ([]pkcs11.ObjectHandle, error) {
	c := se.p.mod.ctx
	s.searches.Add(1)
	if err := c.FindObjectsInit(se.h, tmpl); err != nil {
		return nil, s.call("C_FindObjectsInit", err)
	}
	objs, _, err := c.FindObjects(se.h, max)
	ferr := c.FindObjectsFinal(se.h)
	if err != nil {
		return nil, s.call("C_FindObjects", err)
	}
	if ferr != nil {
		return nil, s.call("C_FindObjectsFinal", ferr)
	}
	return objs, nil
}

func (s *Slot) storeHandle(k Key, gen uint64, h pkcs11.ObjectHandle) {
	s.keysMu.Lock()
	s.keys[k.ID] = keyEntry{gen: gen, label: k.Label, priv: h}
	s.keysMu.Unlock()
}

func (s *Slot) forgetHandle(id string) {
	s.keysMu.Lock()
	delete(s.keys, id)
	s.keysMu.Unlock()
}

// dropHandles empties the cache: handles do not survive a rebuild.
func (s *Slot) dropHandles() {
	s.keysMu.Lock()
	clear(s.keys)
	s.keysMu.Unlock()
}

// handle returns the cached private-key handle, searching only on a miss.
func (s *Slot) handle(se *session, k Key) (pkcs11.ObjectHandle, error) {
	s.keysMu.RLock()
	e, ok := s.keys[k.ID]
	s.keysMu.RUnlock()
	// the label must match too: the cache answers exactly what a CKA_ID+CKA_LABEL search would
	if ok && e.gen == se.p.gen && e.label == k.Label {
		return e.priv, nil
	}
	tmpl, err := keyTemplate(k, pkcs11.CKO_PRIVATE_KEY, true)
	if err != nil {
		return 0, err
	}
	objs, err := s.find(se, tmpl, 1)
	if err != nil {
		return 0, err
	}
	if len(objs) == 0 {
		return 0, fmt.Errorf("%w: no private key with CKA_ID %s and label %q", ErrKeyNotFound, k.ID, k.Label)
	}
	s.storeHandle(k, se.p.gen, objs[0])
	return objs[0], nil
}

func (s *Slot) signRaw(se *session, key pkcs11.ObjectHandle, digest []byte) ([]byte, error) {
	c := se.p.mod.ctx
	if err := c.SignInit(se.h, ecdsaMech, key); err != nil {
		return nil, s.call("C_SignInit", err)
	}
	sig, err := c.Sign(se.h, digest)
	if err != nil {
		return nil, s.call("C_Sign", err)
	}
	if len(sig) != 64 {
		return nil, fmt.Errorf("%w: the token returned a %d-byte ECDSA signature, want 64", ErrNotP256, len(sig))
	}
	return sig, nil
}

// Sign signs a 32-byte digest with CKM_ECDSA and returns raw r‖s. In steady state it costs one
// session checkout, C_SignInit and C_Sign; a stale cached handle is re-found once.
func (s *Slot) Sign(ctx context.Context, k Key, digest []byte) ([]byte, error) {
	if len(digest) != 32 {
		return nil, fmt.Errorf("digest must be 32 bytes (SHA-256), got %d", len(digest))
	}
	// Written out instead of using s.with: the closure would cost an allocation per signature.
	se, err := s.acquire(ctx)
	if err != nil {
		return nil, err
	}
	if err := ctx.Err(); err != nil {
		s.release(se, nil)
		return nil, err
	}
	if err := s.enter(se); err != nil {
		s.release(se, err)
		return nil, err
	}
	sig, err := s.signKey(se, k, digest)
	s.leave(se)
	s.release(se, err)
	return sig, err
}

func (s *Slot) signKey(se *session, k Key, digest []byte) ([]byte, error) {
	h, err := s.handle(se, k)
	if err != nil {
		return nil, err
	}
	sig, err := s.signRaw(se, h, digest)
	if ClassOf(err) == ClassStaleHandle {
		s.forgetHandle(k.ID)
		if h, err = s.handle(se, k); err != nil {
			if errors.Is(err, ErrKeyNotFound) {
				// A key that vanished under a valid cached handle was deleted elsewhere or the
				// token lost its objects (SoftHSM2 does this when its token directory goes away);
				// say so, because the two need different fixes.
				s.log.Warn("pkcs11 key vanished from the token after its handle was cached", "key_id", k.ID, "label", k.Label)
				return nil, fmt.Errorf("%w (its cached handle became invalid: deleted outside kmsgate, or the token lost its objects)", err)
			}
			return nil, err
		}
		sig, err = s.signRaw(se, h, digest)
	}
	return sig, err
}

// PublicKey reads the public key object's CKA_EC_POINT.
func (s *Slot) PublicKey(ctx context.Context, k Key) (*ecdsa.PublicKey, error) {
	tmpl, err := keyTemplate(k, pkcs11.CKO_PUBLIC_KEY, true)
	if err != nil {
		return nil, err
	}
	var pub *ecdsa.PublicKey
	err = s.with(ctx, func(se *session) error {
		objs, err := s.find(se, tmpl, 1)
		if err != nil {
			return err
		}
		if len(objs) == 0 {
			return fmt.Errorf("%w: no public key with CKA_ID %s and label %q", ErrKeyNotFound, k.ID, k.Label)
		}
		pub, err = s.readPoint(se.p.mod.ctx, se.h, objs[0])
		return err
	})
	return pub, err
}

// Delete destroys every object with the key's CKA_ID and label. Deleting a missing key is not an
// error; a failure on one object does not stop the others.
func (s *Slot) Delete(ctx context.Context, k Key) error {
	if s.cfg.ReadOnly {
		return ErrReadOnly
	}
	tmpl, err := keyTemplate(k, 0, false)
	if err != nil {
		return nil // not a key this slot could have made
	}
	return s.with(ctx, func(se *session) error {
		objs, err := s.find(se, tmpl, 16)
		if err != nil {
			return err
		}
		s.forgetHandle(k.ID)
		var errs []error
		for _, o := range objs {
			if err := se.p.mod.ctx.DestroyObject(se.h, o); err != nil {
				errs = append(errs, s.call("C_DestroyObject", err))
			}
		}
		if len(errs) == len(objs) && len(errs) > 0 {
			return errors.Join(errs...)
		}
		if len(errs) > 0 {
			s.log.Warn("pkcs11 delete left objects behind", "key_id", k.ID, "errors", errors.Join(errs...))
		}
		return nil
	})
}

// Attributes reads boolean attributes of the key's private and public objects (for audits and
// tests: CKA_SENSITIVE, CKA_EXTRACTABLE, …).
func (s *Slot) Attributes(ctx context.Context, k Key, class uint, types ...uint) (map[uint]bool, error) {
	tmpl, err := keyTemplate(k, class, true)
	if err != nil {
		return nil, err
	}
	out := map[uint]bool{}
	err = s.with(ctx, func(se *session) error {
		objs, err := s.find(se, tmpl, 1)
		if err != nil {
			return err
		}
		if len(objs) == 0 {
			return ErrKeyNotFound
		}
		req := make([]*pkcs11.Attribute, len(types))
		for i, t := range types {
			req[i] = pkcs11.NewAttribute(t, nil)
		}
		attrs, err := se.p.mod.ctx.GetAttributeValue(se.h, objs[0], req)
		if err != nil {
			return s.call("C_GetAttributeValue", err)
		}
		for _, a := range attrs {
			out[a.Type] = len(a.Value) == 1 && a.Value[0] != 0
		}
		return nil
	})
	return out, err
}
