package providers

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/kmsgate/kmsgate/internal/errs"
)

// Config is one provider entry of kms.json after placeholder expansion. Raw holds the whole entry
// (id, type and description included) for the type's factory to decode strictly.
type Config struct {
	ID          string
	Type        string
	Description string
	Raw         json.RawMessage
}

// Errorf builds a configuration error that names the provider and its type.
func (c Config) Errorf(format string, a ...any) error {
	return fmt.Errorf("provider %q (type %s): %s", c.ID, c.Type, fmt.Sprintf(format, a...))
}

// ParseTimeout reads an optional positive Go duration such as "10s"; "" gives def.
func ParseTimeout(s string, def time.Duration) (time.Duration, error) {
	if s == "" {
		return def, nil
	}
	d, err := time.ParseDuration(s)
	if err != nil || d <= 0 {
		return 0, fmt.Errorf("timeout %q is not a positive Go duration (e.g. \"10s\")", s)
	}
	return d, nil
}

// Common holds the fields every provider entry has. Factories embed it in their config struct so
// that strict decoding accepts them.
type Common struct {
	ID          string `json:"id"`
	Type        string `json:"type"`
	Description string `json:"description,omitempty"`
}

// DecodeStrict decodes a provider entry into dst, rejecting unknown fields with an error that
// names the field and the provider.
func DecodeStrict(cfg Config, dst any) error {
	dec := json.NewDecoder(bytes.NewReader(cfg.Raw))
	dec.DisallowUnknownFields()
	if err := dec.Decode(dst); err != nil {
		return fmt.Errorf("provider %q (type %s): %w", cfg.ID, cfg.Type, err)
	}
	return nil
}

// Factory builds a provider from its config. It fails only for configuration errors (a missing
// required field, a malformed value); a backend that is unreachable at start-up must still yield a
// provider whose Health reports the problem, so that one broken backend never stops the appliance.
type Factory func(ctx context.Context, cfg Config) (Provider, error)

// Registry holds the configured providers. It is immutable after construction.
type Registry struct {
	byID       map[string]Provider
	order      []string
	defaultID  string
	healthWait time.Duration
}

// NewRegistry builds every provider in cfgs with the factory for its type and wraps it in the
// decorator that checks, stamps and measures every call (observe may be nil: no metrics). On
// error the providers built so far are closed.
func NewRegistry(ctx context.Context, cfgs []Config, defaultID string, factories map[string]Factory, observe ObserverFor) (*Registry, error) {
	r := &Registry{byID: make(map[string]Provider, len(cfgs)), defaultID: defaultID, healthWait: 5 * time.Second}
	for _, c := range cfgs {
		f, ok := factories[c.Type]
		if !ok {
			r.Close()
			return nil, UnknownTypeError(c.ID, c.Type, slices.Sorted(maps.Keys(factories)))
		}
		p, err := f(ctx, c)
		if err != nil {
			r.Close()
			return nil, err
		}
		var obs Observer
		if observe != nil {
			obs = observe(c.ID)
		}
		r.byID[c.ID] = Instrument(p, obs)
		r.order = append(r.order, c.ID)
	}
	if _, ok := r.byID[defaultID]; !ok {
		r.Close()
		return nil, fmt.Errorf("defaultProvider %q names no configured provider", defaultID)
	}
	return r, nil
}

// UnknownTypeError is the error for a provider entry whose type is none of known.
func UnknownTypeError(id, typ string, known []string) error {
	return fmt.Errorf("provider %q: field \"type\": unknown type %q (known: %s)", id, typ, strings.Join(known, ", "))
}

// Get returns the provider with id, or the default provider when id is empty.
func (r *Registry) Get(id string) (Provider, error) {
	if id == "" {
		id = r.defaultID
	}
	if p, ok := r.byID[id]; ok {
		return p, nil
	}
	return nil, errs.Errorf(errs.BadInput, "unknown kmsProvider %q (configured: %s)", id, r.idList()).
		WithCode("unknown_provider")
}

func (r *Registry) idList() string {
	ids := slices.Clone(r.order)
	sort.Strings(ids)
	b, _ := json.Marshal(ids)
	return string(b)
}

// DefaultID is the id of the default provider.
func (r *Registry) DefaultID() string { return r.defaultID }

// IDs lists the provider ids in configuration order.
func (r *Registry) IDs() []string { return slices.Clone(r.order) }

// All lists the providers in configuration order.
func (r *Registry) All() []Provider {
	out := make([]Provider, 0, len(r.order))
	for _, id := range r.order {
		out = append(out, r.byID[id])
	}
	return out
}

// HealthReport is one provider's health, as the API reports it.
type HealthReport struct {
	ProviderID string `json:"providerId"`
	Type       string `json:"type"`
	Health
}

// HealthAll probes every provider (or only those in ids, when given) in parallel under timeout.
// A failing or hanging provider never delays or fails the others.
func (r *Registry) HealthAll(ctx context.Context, timeout time.Duration, ids ...string) []HealthReport {
	ps := r.All()
	if len(ids) > 0 {
		ps = ps[:0:0]
		for _, id := range ids {
			if p, ok := r.byID[id]; ok {
				ps = append(ps, p)
			}
		}
	}
	out := make([]HealthReport, len(ps))
	var wg sync.WaitGroup
	for i, p := range ps {
		wg.Add(1)
		go func() {
			defer wg.Done()
			out[i] = HealthReport{ProviderID: p.ID(), Type: p.Type(), Health: HealthProbe(ctx, p, timeout)}
		}()
	}
	wg.Wait()
	return out
}

// Close closes every provider and joins their errors.
func (r *Registry) Close() error {
	var errList []error
	for _, id := range r.order {
		if err := r.byID[id].Close(); err != nil {
			errList = append(errList, fmt.Errorf("close provider %q: %w", id, err))
		}
	}
	return errors.Join(errList...)
}

// Constructor is the shape of a provider package's New.
type Constructor[P Provider] func(ctx context.Context, cfg Config, logger *slog.Logger) (P, error)

// FactoryFor adapts a provider package's New to a Factory. It returns a nil interface on error,
// never an interface holding a nil pointer.
func FactoryFor[P Provider](newFn Constructor[P], logger *slog.Logger) Factory {
	return func(ctx context.Context, cfg Config) (Provider, error) {
		p, err := newFn(ctx, cfg, logger)
		if err != nil {
			return nil, err
		}
		return p, nil
	}
}
