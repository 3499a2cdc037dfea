package tenants

// Credential returns the principal of an active credential by its id; false when the id is
// unknown or the credential was revoked. It reads the in-memory index, which follows the store's
// change notices, so a revocation through any replica shows here within the notice delay. Tokens
// kmsgate issued name their client this way, so that revoking the client refuses its tokens too.
func (s *Service) Credential(id string) (*Principal, bool) {
	s.mu.RLock()
	c := s.creds[id]
	s.mu.RUnlock()
	if c == nil {
		return nil, false
	}
	return c.principal, true
}
