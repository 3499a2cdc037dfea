package vault

import (
	"fmt"
	"strings"
)

// encodeName turns a tenant or kid into a Vault-safe path segment, injectively: ASCII letters and
// digits stay, '-' and '.' stay when not first or last (Vault names must start and end with a word
// character), and every other byte, '_' included, becomes "_XX" (hex). Because a literal '_' is
// never emitted, two different inputs can never map to the same name ("a/b" → "a_2Fb",
// "a_2Fb" → "a_5F2Fb"), so tenants cannot collide on one mount or key.
func encodeName(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9':
			b.WriteByte(c)
		case (c == '-' || c == '.') && i > 0 && i < len(s)-1:
			b.WriteByte(c)
		default:
			fmt.Fprintf(&b, "_%02X", c)
		}
	}
	return b.String()
}

// Vault accepts long names, but mount paths and key names end up in URLs and logs; 200 bytes of
// encoded name is far beyond any kid the appliance generates.
const maxEncodedName = 200

func mountFor(prefix, tenant string) string { return prefix + encodeName(tenant) }

// splitExternalID splits "mount/key" at the last slash (mount prefixes may contain slashes, key
// names never do).
func splitExternalID(id string) (mount, key string, ok bool) {
	i := strings.LastIndexByte(id, '/')
	if i <= 0 || i == len(id)-1 {
		return "", "", false
	}
	return id[:i], id[i+1:], true
}
