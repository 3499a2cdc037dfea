package tenants

import (
	"context"
	"errors"
	"fmt"

	"github.com/kmsgate/kmsgate/appliance/store"
)

// RefreshRecord brings the in-memory credential index up to date after the store record key was
// written or deleted, by this or another replica: a revoked or deleted credential is refused from
// now on, and one created elsewhere is accepted. It reports whether key was a credential record.
func (s *Service) RefreshRecord(ctx context.Context, key string) (bool, error) {
	id, ok := store.ParseCredentialKey(key)
	if !ok {
		return false, nil
	}
	var c store.Credential
	err := s.st.Get(ctx, key, &c)
	switch {
	case errors.Is(err, store.ErrNotFound) || (err == nil && c.RevokedAt != nil):
		s.forgetCreds([]string{id})
	case err != nil:
		// The record could not be read: refuse the credential rather than keep trusting a copy
		// that may be revoked; the next full refresh restores it if it is still active.
		s.forgetCreds([]string{id})
		return true, fmt.Errorf("re-read credential %s: %w", id, err)
	case c.ID == id:
		s.remember(&c)
	}
	return true, nil
}
