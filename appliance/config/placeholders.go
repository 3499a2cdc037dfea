package config

import (
	"fmt"
	"strings"
)

// LookupFunc reads an environment variable; os.LookupEnv fits.
type LookupFunc func(name string) (string, bool)

// ExpandString resolves ${NAME} and ${NAME:default} placeholders in s in one pass: a value taken
// from the environment is never expanded again, so a secret containing "${" stays intact. An empty
// variable counts as unset (so its default applies). A placeholder whose variable is unset and has
// no default is an error naming the variable. Text that is not a well-formed placeholder is kept.
func ExpandString(s string, lookup LookupFunc) (string, error) {
	if !strings.Contains(s, "${") {
		return s, nil
	}
	var b strings.Builder
	for {
		i := strings.Index(s, "${")
		if i < 0 {
			b.WriteString(s)
			return b.String(), nil
		}
		b.WriteString(s[:i])
		rest := s[i+2:]
		end := strings.IndexByte(rest, '}')
		if end < 0 {
			b.WriteString(s[i:])
			return b.String(), nil
		}
		body := rest[:end]
		name, def, hasDef := strings.Cut(body, ":")
		if !validName(name) {
			// Not a placeholder (e.g. "${ not a name }"): keep the two opening bytes literally and
			// continue scanning after them.
			b.WriteString("${")
			s = rest
			continue
		}
		v, ok := lookup(name)
		switch {
		case ok && v != "":
			b.WriteString(v)
		case hasDef:
			b.WriteString(def)
		default:
			return "", &UnsetVarError{Name: name}
		}
		s = rest[end+1:]
	}
}

func validName(n string) bool {
	if n == "" {
		return false
	}
	for i, c := range n {
		switch {
		case c == '_', c >= 'A' && c <= 'Z', c >= 'a' && c <= 'z':
		case c >= '0' && c <= '9' && i > 0:
		default:
			return false
		}
	}
	return true
}

// UnsetVarError reports a placeholder without a value or default.
type UnsetVarError struct{ Name string }

func (e *UnsetVarError) Error() string {
	return fmt.Sprintf("environment variable %s is not set and the placeholder has no default", e.Name)
}

// ExpandTree resolves placeholders in every string of a decoded JSON value (maps, slices, strings),
// returning a new value. Keys are not expanded.
func ExpandTree(v any, lookup LookupFunc) (any, error) {
	switch t := v.(type) {
	case string:
		return ExpandString(t, lookup)
	case map[string]any:
		out := make(map[string]any, len(t))
		for k, e := range t {
			x, err := ExpandTree(e, lookup)
			if err != nil {
				return nil, fmt.Errorf("%s: %w", k, err)
			}
			out[k] = x
		}
		return out, nil
	case []any:
		out := make([]any, len(t))
		for i, e := range t {
			x, err := ExpandTree(e, lookup)
			if err != nil {
				return nil, fmt.Errorf("[%d]: %w", i, err)
			}
			out[i] = x
		}
		return out, nil
	default:
		return v, nil
	}
}
