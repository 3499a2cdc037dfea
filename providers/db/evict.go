package db

// Evict drops the unsealed copy of sealed key id from memory, after its record was deleted
// (through another replica, which cannot reach this one's cache). Ids are never reused, so this is
// the only change of a sealed key a cache must follow.
func (p *Provider) Evict(id string) {
	p.mu.Lock()
	delete(p.cache, id)
	p.mu.Unlock()
}
