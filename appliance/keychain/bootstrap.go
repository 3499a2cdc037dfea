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
	"sort"
	"strings"

	"github.com/google/uuid"

	"github.com/kmsgate/kmsgate/appliance/config"
	"github.com/kmsgate/kmsgate/appliance/tenants"
)

// Bootstrap gives a tenant the chains the seed promises: an access and an attestation chain
// (internal CA, on the tenant's default provider, or db when that provider cannot create keys)
// and an encrypt chain on db. Usage types the tenant already has are left alone, so it is safe to
// run again and never overrides chains that came from a config folder.
func (s *Service) Bootstrap(ctx context.Context, tenant string) error {
	chains, err := s.list(ctx, tenantPrefix(tenant))
	if err != nil {
		return err
	}
	have := map[string]bool{}
	for _, c := range chains {
		have[c.UsageType] = true
	}
	p := &tenants.Principal{TenantID: tenant}
	var failures []error
	for _, usage := range []string{UsageAccess, UsageAttestation} {
		if have[usage] {
			continue
		}
		prov, err := s.ten.ProviderFor(ctx, p, "", s.reg)
		if err != nil || !prov.Capabilities().CanCreate {
			if prov, err = s.reg.Get(dbProviderID); err != nil {
				failures = append(failures, fmt.Errorf("%s chain: %w", usage, err))
				continue
			}
		}
		if _, err := s.create(ctx, tenant, prov, usage, TypeInternalChain, "Generated at tenant creation", Policy{}); err != nil {
			failures = append(failures, fmt.Errorf("%s chain: %w", usage, err))
		}
	}
	if !have[UsageEncrypt] {
		prov, err := s.reg.Get(dbProviderID)
		if err == nil {
			_, err = s.create(ctx, tenant, prov, UsageEncrypt, TypeStandalone, "Generated at tenant creation", Policy{})
		}
		if err != nil {
			failures = append(failures, fmt.Errorf("encrypt chain: %w", err))
		}
	}
	return errors.Join(failures...)
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
			s.log.Error("config import: cannot read config folder", "path", o.Dir, "err", err)
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
	s.log.Error("config import: file failed", "path", r.Path, "tenant", r.Tenant, "err", r.Err)
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
