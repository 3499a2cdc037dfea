package keychain

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/google/uuid"

	"github.com/kmsgate/kmsgate/appliance/config"
	"github.com/kmsgate/kmsgate/appliance/store"
	"github.com/kmsgate/kmsgate/appliance/tenants"
	"github.com/kmsgate/kmsgate/internal/errs"
	"github.com/kmsgate/kmsgate/providers"
)

// Bootstrap results per usage type.
const (
	BootCreated = "created"
	BootSkipped = "skipped"
	BootFailed  = "failed"
)

// BootstrapResult says what the bootstrap did about one usage type. Reason never carries a
// backend's own text: it is chosen here from the error's kind.
type BootstrapResult struct {
	UsageType string `json:"usageType"`
	Status    string `json:"status"`
	ID        string `json:"id,omitempty"`
	Provider  string `json:"kmsProvider,omitempty"`
	Reason    string `json:"reason,omitempty"`
	Code      string `json:"code,omitempty"`
}

// BootstrapReport is what a tenant's bootstrap created, skipped and failed to create. Failed usage
// types are recorded and retried by the rotation scheduler and at start-up until they succeed.
type BootstrapReport struct {
	Chains []BootstrapResult `json:"chains"`
}

// Failed returns the usage types that could not be created.
func (r *BootstrapReport) Failed() []BootstrapResult {
	if r == nil {
		return nil
	}
	var out []BootstrapResult
	for _, c := range r.Chains {
		if c.Status == BootFailed {
			out = append(out, c)
		}
	}
	return out
}

// bootUsages are the usage types a new tenant gets a chain for.
var bootUsages = []string{UsageAccess, UsageAttestation, UsageEncrypt}

// prefixBoot namespaces the records of usage types whose bootstrap failed: chainboot/<tenant>.
// It does not start with prefixChain, so chain listings never see it.
const prefixBoot = "chainboot/"

// bootRecord lists a tenant's usage types still to be bootstrapped.
type bootRecord struct {
	Tenant     string    `json:"tenant"`
	UsageTypes []string  `json:"usageTypes"`
	Since      time.Time `json:"since"`
}

// Bootstrap gives a tenant the chains the seed promises: an access and an attestation chain
// (internal CA, on the tenant's default provider, or db when that provider cannot create keys and
// the tenant may use db) and an encrypt chain on db (only when the tenant may use db: its private
// key is sealed in the store and exportable, which a tenant restricted to an HSM has not chosen).
// Each usage type the tenant lacks is created on its own; those it already has are left alone, so
// it is safe to run again and never overrides chains that came from a config folder. Usage types
// that fail are recorded and retried (RetryBootstraps) until they succeed.
func (s *Service) Bootstrap(ctx context.Context, tenant string) (*BootstrapReport, error) {
	return s.bootstrap(ctx, tenant, bootUsages)
}

func (s *Service) bootstrap(ctx context.Context, tenant string, usages []string) (*BootstrapReport, error) {
	// One bootstrap per tenant at a time (a tenant create racing the scheduler's retry must not
	// make two chains of a type). The NUL cannot occur in chain ids, so no chain shares the name.
	defer s.lock(tenant, "\x00bootstrap")()
	t, err := s.ten.Tenant(ctx, tenant)
	if err != nil {
		return nil, fmt.Errorf("tenant %s: %w", tenant, err)
	}
	have, err := s.idx.usages(ctx, s, tenant)
	if err != nil {
		return nil, err
	}
	allowed := func(id string) bool { return len(t.AllowedProviders) == 0 || slices.Contains(t.AllowedProviders, id) }
	rep := &BootstrapReport{Chains: []BootstrapResult{}}
	var failed []string
	for _, usage := range usages {
		r := BootstrapResult{UsageType: usage}
		prov, skip := s.bootProvider(ctx, tenant, usage, allowed)
		switch {
		case have[usage]:
			r.Status, r.Reason = BootSkipped, "the tenant already has a key chain of this usage type"
		case prov == nil:
			r.Status, r.Reason = BootSkipped, skip
		default:
			typ, use := TypeInternalChain, KeyUseSign
			if usage == UsageEncrypt {
				typ, use = TypeStandalone, KeyUseEncrypt
			}
			r.Provider = prov.ID()
			id, err := s.create(ctx, tenant, prov, usage, use, typ, "Generated at tenant creation", Policy{})
			if err != nil {
				r.Status, r.Reason, r.Code = BootFailed, bootReason(err), bootCode(err)
				failed = append(failed, usage)
				s.log.Warn("tenant bootstrap: key chain not created", "tenant", tenant, "usage_type", usage,
					"provider", prov.ID(), "error", err)
			} else {
				r.Status, r.ID = BootCreated, id
			}
		}
		rep.Chains = append(rep.Chains, r)
	}
	if err := s.recordBoot(ctx, tenant, failed); err != nil {
		return rep, err
	}
	return rep, nil
}

// bootProvider picks the provider for a bootstrapped usage type, or says why there is none.
func (s *Service) bootProvider(ctx context.Context, tenant, usage string, allowed func(string) bool) (providers.Provider, string) {
	db, dbErr := s.reg.Get(dbProviderID)
	if usage == UsageEncrypt {
		switch {
		case dbErr != nil:
			return nil, "the encrypt key chain needs the db provider, and none is configured"
		case !allowed(dbProviderID):
			return nil, "the encrypt key chain needs the db provider, which the tenant may not use"
		}
		return db, ""
	}
	prov, err := s.ten.ProviderFor(ctx, &tenants.Principal{TenantID: tenant}, "", s.reg)
	if err == nil && prov.Capabilities().CanCreate {
		return prov, ""
	}
	if dbErr == nil && allowed(dbProviderID) {
		return db, ""
	}
	return nil, "the tenant's default provider cannot create keys, and the tenant may not use db"
}

// bootReason is the caller-safe reason of a failed bootstrap: chosen by the error's kind, never
// the backend's text (which goes to the log).
func bootReason(err error) string {
	switch errs.KindOf(err) {
	case errs.Unavailable:
		return "the provider is unavailable; kmsgate retries until it is back"
	case errs.Throttled:
		return "the provider is throttling requests; kmsgate retries"
	case errs.Forbidden:
		if errs.CodeOf(err) == "quota_exceeded" {
			return "the tenant's key-chain quota is reached; kmsgate retries"
		}
		return "refused by policy; kmsgate retries"
	case errs.NotSupported:
		return "the provider cannot create this key; kmsgate retries"
	}
	return "internal error (see the server log); kmsgate retries"
}

func bootCode(err error) string {
	if c := errs.CodeOf(err); c != "" {
		return c
	}
	return errs.KindOf(err).String()
}

// recordBoot stores the usage types still to be bootstrapped, or removes the record when none are.
func (s *Service) recordBoot(ctx context.Context, tenant string, failed []string) error {
	key := prefixBoot + tenant
	if len(failed) == 0 {
		if err := s.st.Delete(ctx, key); err != nil && !errors.Is(err, store.ErrNotFound) {
			return fmt.Errorf("clear bootstrap record of tenant %s: %w", tenant, err)
		}
		return nil
	}
	rec := bootRecord{Tenant: tenant, UsageTypes: failed, Since: s.now()}
	var old bootRecord
	if err := s.st.Get(ctx, key, &old); err == nil && !old.Since.IsZero() {
		rec.Since = old.Since
	}
	if err := s.st.Put(ctx, key, rec); err != nil {
		return fmt.Errorf("record failed bootstrap of tenant %s: %w", tenant, err)
	}
	return nil
}

// RetryBootstraps retries every usage type whose bootstrap failed (on each scheduler tick and at
// start-up) and forgets those that now exist. It returns how many chains it created.
func (s *Service) RetryBootstraps(ctx context.Context) int {
	var recs []bootRecord
	err := s.st.List(ctx, prefixBoot, func(key string, val []byte) error {
		var r bootRecord
		if err := json.Unmarshal(val, &r); err != nil {
			s.log.Error("bootstrap retry: unreadable record", "key", key, "error", err)
			return nil
		}
		recs = append(recs, r)
		return nil
	})
	if err != nil {
		s.log.Error("bootstrap retry: list records", "error", err)
		return 0
	}
	created := 0
	for _, r := range recs {
		if ctx.Err() != nil {
			break
		}
		usages := slices.DeleteFunc(slices.Clone(r.UsageTypes), func(u string) bool { return !slices.Contains(bootUsages, u) })
		rep, err := s.bootstrap(ctx, r.Tenant, usages)
		if errors.Is(err, tenants.ErrTenantNotFound) {
			_ = s.st.Delete(ctx, prefixBoot+r.Tenant)
			continue
		}
		if err != nil {
			s.log.Error("bootstrap retry failed", "tenant", r.Tenant, "error", err)
			continue
		}
		for _, c := range rep.Chains {
			if c.Status == BootCreated {
				created++
				s.log.Info("bootstrap retry: key chain created", "tenant", r.Tenant, "usage_type", c.UsageType, "chain", c.ID)
			}
		}
	}
	return created
}

// FileResult reports what the config import did with one file.
type FileResult struct {
	Path   string
	Tenant string
	ID     string
	// Action is "imported", "replaced", "skipped" or "failed".
	Action string
	Err    error
}

// ImportOptions control the config-folder import.
type ImportOptions struct {
	Dir    string
	Force  bool
	Lookup config.LookupFunc
	// TenantCreated runs for tenants the import created (bootstrap of the usage types the folder
	// did not provide).
	TenantCreated func(ctx context.Context, tenant string) error
}

// fileNamespace makes ids of files without "id" stable: uuid v5 of "<tenant>/<file name>", so the
// same file maps to the same chain on every start instead of a new chain each time.
var fileNamespace = uuid.MustParse("6f1f4d3c-1b2e-5a7d-9c8b-4b6b8e0e1a10")

// StableID is the id a config file without "id" gets.
func StableID(tenant, fileName string) string {
	return uuid.NewSHA1(fileNamespace, []byte(tenant+"/"+fileName)).String()
}

// ImportFolder imports <dir>/<tenant>/key-chains/*.json. A tenant folder with a key-chains
// directory creates the tenant when missing. One bad file is reported and logged with its path;
// the others still import. Existing chains are skipped unless Force.
func (s *Service) ImportFolder(ctx context.Context, o ImportOptions) []FileResult {
	var out []FileResult
	if o.Dir == "" {
		return nil
	}
	ents, err := os.ReadDir(o.Dir)
	if err != nil {
		if !errors.Is(err, os.ErrNotExist) {
			s.log.Error("config import: cannot read config folder", "path", o.Dir, "error", err)
		}
		return nil
	}
	for _, e := range ents {
		if !e.IsDir() {
			continue // kms.json and other root files are not tenants
		}
		tenant := e.Name()
		kcDir := filepath.Join(o.Dir, tenant, "key-chains")
		files, err := os.ReadDir(kcDir)
		if err != nil {
			if !errors.Is(err, os.ErrNotExist) {
				out = append(out, s.reportFail(FileResult{Path: kcDir, Tenant: tenant, Action: "failed", Err: err}))
			}
			continue
		}
		created, err := s.ten.EnsureTenant(ctx, tenant, "")
		if err != nil {
			out = append(out, s.reportFail(FileResult{Path: kcDir, Tenant: tenant, Action: "failed",
				Err: fmt.Errorf("create tenant: %w", err)}))
			continue
		}
		names := make([]string, 0, len(files))
		for _, f := range files {
			if !f.IsDir() && strings.HasSuffix(strings.ToLower(f.Name()), ".json") {
				names = append(names, f.Name())
			}
		}
		sort.Strings(names)
		for _, n := range names {
			r := s.importFile(ctx, tenant, filepath.Join(kcDir, n), n, o)
			if r.Err != nil {
				s.reportFail(r)
			} else {
				s.log.Info("config import: key chain "+r.Action, "path", r.Path, "tenant", tenant, "chain", r.ID)
			}
			out = append(out, r)
		}
		if created && o.TenantCreated != nil {
			if err := o.TenantCreated(ctx, tenant); err != nil {
				out = append(out, s.reportFail(FileResult{Path: kcDir, Tenant: tenant, Action: "failed",
					Err: fmt.Errorf("bootstrap tenant: %w", err)}))
			}
		}
	}
	return out
}

func (s *Service) reportFail(r FileResult) FileResult {
	s.log.Error("config import: file failed", "path", r.Path, "tenant", r.Tenant, "error", r.Err)
	return r
}

func (s *Service) importFile(ctx context.Context, tenant, path, name string, o ImportOptions) FileResult {
	r := FileResult{Path: path, Tenant: tenant, Action: "failed"}
	data, err := os.ReadFile(path)
	if err != nil {
		r.Err = err
		return r
	}
	var tree any
	if err := json.Unmarshal(data, &tree); err != nil {
		r.Err = fmt.Errorf("not valid JSON: %w", err)
		return r
	}
	lookup := o.Lookup
	if lookup == nil {
		lookup = os.LookupEnv
	}
	tree, err = config.ExpandTree(tree, lookup)
	if err != nil {
		r.Err = fmt.Errorf("placeholder: %w", err)
		return r
	}
	expanded, err := json.Marshal(tree)
	if err != nil {
		r.Err = err
		return r
	}
	var req ImportRequest
	dec := json.NewDecoder(bytes.NewReader(expanded))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&req); err != nil {
		r.Err = fmt.Errorf("not a key-chain import file: %w", err)
		return r
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		r.Err = errors.New("data after the JSON object")
		return r
	}
	if req.ID == "" {
		req.ID = StableID(tenant, name)
	}
	r.ID = req.ID
	exists, err := s.exists(ctx, tenant, req.ID)
	if err != nil {
		r.Err = err
		return r
	}
	if exists && !o.Force {
		r.Action = "skipped"
		return r
	}
	if _, err := s.Import(ctx, &tenants.Principal{TenantID: tenant}, req); err != nil {
		r.Err = err
		return r
	}
	r.Action = "imported"
	if exists {
		r.Action = "replaced"
	}
	return r
}
