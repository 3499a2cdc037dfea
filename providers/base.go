package providers

import (
	"reflect"
	"slices"
	"strings"
)

// Base carries the identity every provider has (its kms.json id, type and description) and
// implements the three identity methods of Provider, so provider packages embed it instead of
// repeating them.
type Base struct {
	id, typ, desc string
}

// NewBase builds the identity of a provider of type typ with the given id and description.
func NewBase(typ, id, desc string) Base { return Base{id: id, typ: typ, desc: desc} }

// ID is the provider's kms.json id.
func (b Base) ID() string { return b.id }

// Type is the provider's kms.json type.
func (b Base) Type() string { return b.typ }

// Description is the provider's free-text description.
func (b Base) Description() string { return b.desc }

// SecretFields lists the JSON names of the fields of cfg (a provider's config struct, or a pointer
// to one) tagged `secret:"true"`, including those of embedded and nested structs. Configuration
// output uses it to redact a provider's secrets without a central list of field names.
func SecretFields(cfg any) []string {
	var out []string
	collectSecrets(reflect.TypeOf(cfg), &out, map[reflect.Type]bool{})
	slices.Sort(out)
	return slices.Compact(out)
}

func collectSecrets(t reflect.Type, out *[]string, seen map[reflect.Type]bool) {
	for t != nil && (t.Kind() == reflect.Pointer || t.Kind() == reflect.Slice || t.Kind() == reflect.Map) {
		t = t.Elem()
	}
	if t == nil || t.Kind() != reflect.Struct || seen[t] {
		return
	}
	seen[t] = true
	for i := range t.NumField() {
		f := t.Field(i)
		name, _, _ := strings.Cut(f.Tag.Get("json"), ",")
		if name == "-" {
			continue
		}
		if name == "" {
			name = f.Name
		}
		if f.Tag.Get("secret") == "true" {
			*out = append(*out, name)
			continue
		}
		collectSecrets(f.Type, out, seen)
	}
}
