// Package config loads kms.json: the provider list with its placeholders, validated strictly so
// that a typo stops the appliance at start-up instead of surfacing on the first signature.
package config

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/kmsgate/kmsgate/providers"
)

// FileName is the provider configuration file inside the config directory.
const FileName = "kms.json"

// KMS is the effective provider configuration.
type KMS struct {
	DefaultProvider string
	Providers       []providers.Config
	// Source is the file it was read from, or "" for the built-in default.
	Source string

	catalog Catalog
}

// Catalog describes the provider types the binary implements: each type's secret config fields
// (JSON names, at any depth of the entry). The composition root derives it from the same table as
// the provider factories, so a new provider type is known and its secrets redacted without a list
// here.
type Catalog map[string][]string

func (c Catalog) types() string {
	return strings.Join(slices.Sorted(maps.Keys(c)), ", ")
}

type fileShape struct {
	DefaultProvider *string           `json:"defaultProvider"`
	Providers       []json.RawMessage `json:"providers"`
}

// Default is the configuration used when there is no kms.json: a single db provider.
func Default(catalog Catalog) *KMS {
	return &KMS{DefaultProvider: "db", Providers: []providers.Config{dbEntry()}, catalog: catalog}
}

func dbEntry() providers.Config {
	return providers.Config{ID: "db", Type: providers.TypeDB, Description: "Keys sealed in the embedded store",
		Raw: json.RawMessage(`{"id":"db","type":"db","description":"Keys sealed in the embedded store"}`)}
}

// LoadKMS reads <dir>/kms.json. A missing file yields Default().
func LoadKMS(dir string, lookup LookupFunc, catalog Catalog) (*KMS, error) {
	path := filepath.Join(dir, FileName)
	data, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) || dir == "" {
		return Default(catalog), nil
	}
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", path, err)
	}
	k, err := ParseKMS(data, lookup, catalog)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	k.Source = path
	return k, nil
}

// ParseKMS parses and validates kms.json content; catalog names the provider types that exist.
func ParseKMS(data []byte, lookup LookupFunc, catalog Catalog) (*KMS, error) {
	var f fileShape
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&f); err != nil {
		return nil, fmt.Errorf("invalid kms.json: %w", err)
	}
	if dec.More() {
		return nil, errors.New("invalid kms.json: trailing data after the top-level object")
	}
	k := &KMS{DefaultProvider: "db", catalog: catalog}
	if f.DefaultProvider != nil {
		dp, err := ExpandString(*f.DefaultProvider, lookup)
		if err != nil {
			return nil, fmt.Errorf("field defaultProvider: %w", err)
		}
		k.DefaultProvider = dp
	}
	seen := map[string]bool{}
	for i, raw := range f.Providers {
		var tree map[string]any
		if err := json.Unmarshal(raw, &tree); err != nil {
			return nil, fmt.Errorf("providers[%d]: must be an object: %w", i, err)
		}
		id, _ := tree["id"].(string)
		typ, _ := tree["type"].(string)
		if id == "" {
			return nil, fmt.Errorf("providers[%d]: field \"id\" is required and must be a non-empty string", i)
		}
		if typ == "" {
			return nil, fmt.Errorf("provider %q: field \"type\" is required and must be a string", id)
		}
		if _, ok := catalog[typ]; !ok {
			return nil, fmt.Errorf("provider %q: field \"type\": unknown type %q (known: %s)", id, typ, catalog.types())
		}
		if seen[id] {
			return nil, fmt.Errorf("providers[%d]: field \"id\": duplicate provider id %q", i, id)
		}
		seen[id] = true
		if d, ok := tree["description"]; ok {
			if _, isStr := d.(string); !isStr {
				return nil, fmt.Errorf("provider %q: field \"description\" must be a string", id)
			}
		}
		expanded, err := ExpandTree(tree, lookup)
		if err != nil {
			return nil, fmt.Errorf("provider %q: field %w", id, err)
		}
		em := expanded.(map[string]any)
		out, err := json.Marshal(em)
		if err != nil {
			return nil, fmt.Errorf("provider %q: %w", id, err)
		}
		desc, _ := em["description"].(string)
		k.Providers = append(k.Providers, providers.Config{ID: id, Type: typ, Description: desc, Raw: out})
	}
	if !seen["db"] {
		k.Providers = append(k.Providers, dbEntry())
	} else {
		for _, p := range k.Providers {
			if p.ID == "db" && p.Type != providers.TypeDB {
				return nil, fmt.Errorf("provider \"db\": field \"type\": the id \"db\" is reserved for the built-in db provider, got type %q", p.Type)
			}
		}
	}
	if !seen[k.DefaultProvider] && k.DefaultProvider != "db" {
		return nil, fmt.Errorf("field defaultProvider: %q names no configured provider (configured: %s)",
			k.DefaultProvider, strings.Join(ids(k.Providers), ", "))
	}
	return k, nil
}

func ids(ps []providers.Config) []string {
	out := make([]string, len(ps))
	for i, p := range ps {
		out[i] = p.ID
	}
	return out
}

// Redacted returns the effective configuration as JSON with every secret replaced by "<redacted>".
func (k *KMS) Redacted() ([]byte, error) {
	type out struct {
		Source          string `json:"source"`
		DefaultProvider string `json:"defaultProvider"`
		Providers       []any  `json:"providers"`
	}
	o := out{Source: k.Source, DefaultProvider: k.DefaultProvider}
	if o.Source == "" {
		o.Source = "(built-in default: no kms.json)"
	}
	for _, p := range k.Providers {
		var tree any
		if err := json.Unmarshal(p.Raw, &tree); err != nil {
			return nil, err
		}
		secrets := map[string]bool{}
		for _, f := range k.catalog[p.Type] {
			secrets[strings.ToLower(f)] = true
		}
		o.Providers = append(o.Providers, redact(tree, secrets))
	}
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	enc.SetIndent("", "  ")
	if err := enc.Encode(o); err != nil {
		return nil, err
	}
	return bytes.TrimRight(buf.Bytes(), "\n"), nil
}

// redact replaces the values of the provider's secret fields, and credentials carried inside any
// URL (userinfo, query values), which an operator may have put in a URL field instead.
func redact(v any, secrets map[string]bool) any {
	switch t := v.(type) {
	case map[string]any:
		m := make(map[string]any, len(t))
		for k, e := range t {
			if secrets[strings.ToLower(k)] {
				if s, ok := e.(string); ok && s == "" {
					m[k] = ""
				} else {
					m[k] = redacted
				}
				continue
			}
			m[k] = redact(e, secrets)
		}
		return m
	case []any:
		out := make([]any, len(t))
		for i, e := range t {
			out[i] = redact(e, secrets)
		}
		return out
	case string:
		return redactURL(t)
	default:
		return v
	}
}

const redacted = "<redacted>"

// redactURL hides the password of a URL's userinfo and every query value; anything that is not an
// absolute URL with a host is returned as it is.
func redactURL(s string) string {
	u, err := url.Parse(s)
	if err != nil || u.Scheme == "" || u.Host == "" || (u.User == nil && u.RawQuery == "") {
		return s
	}
	if u.User != nil {
		if _, hasPass := u.User.Password(); hasPass {
			u.User = url.UserPassword(u.User.Username(), redacted)
		} else {
			u.User = url.User(redacted)
		}
	}
	if u.RawQuery != "" {
		q := u.Query()
		for k := range q {
			q[k] = []string{redacted}
		}
		u.RawQuery = q.Encode()
	}
	out, err := url.PathUnescape(u.String())
	if err != nil {
		return u.String()
	}
	return out
}
