package main

import (
	"bufio"
	"bytes"
	"os/exec"
	"sort"
	"strings"
	"testing"
)

const module = "github.com/kmsgate/kmsgate"

// layerRule forbids the packages matched by from to depend, directly or transitively, on any
// package under one of the forbidden paths (module-relative; "" is the whole module).
type layerRule struct {
	from      func(rel string) bool
	desc      string
	forbidden []string
}

func is(paths ...string) func(string) bool {
	return func(rel string) bool {
		for _, p := range paths {
			if under(rel, p) {
				return true
			}
		}
		return false
	}
}

// under reports whether the module-relative package rel is p or below it ("" matches everything).
func under(rel, p string) bool {
	return p == "" || rel == p || strings.HasPrefix(rel, p+"/")
}

// layerRules is the dependency direction api → appliance/* → providers → hsm, plus the leaves.
var layerRules = []layerRule{
	{is("hsm"), "hsm", []string{"providers", "appliance", "api"}},
	{is("metrics"), "metrics", []string{"hsm", "api"}},
	{is("providers"), "providers/...", []string{"appliance", "api"}},
	{is("internal/errs", "internal/keyutil"), "leaf packages internal/errs, internal/keyutil", []string{""}},
	// appliance itself is the composition root and appliance/cli the command line above it; every
	// other package under appliance/ is a domain service that the API depends on, never the reverse.
	{func(rel string) bool {
		return under(rel, "appliance") && rel != "appliance" && !under(rel, "appliance/cli")
	},
		"appliance domain packages", []string{"api"}},
	{is("api"), "api", []string{"appliance/cli"}},
}

// goList runs `go list` with args and returns one line per package.
func goList(t *testing.T, env []string, args ...string) []string {
	t.Helper()
	cmd := exec.Command("go", append([]string{"list"}, args...)...)
	cmd.Env = append(cmd.Environ(), env...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("go list %s: %v\n%s", strings.Join(args, " "), err, stderr.String())
	}
	var lines []string
	sc := bufio.NewScanner(bytes.NewReader(out))
	sc.Buffer(make([]byte, 0, 1<<20), 1<<24)
	for sc.Scan() {
		if l := strings.TrimSpace(sc.Text()); l != "" {
			lines = append(lines, l)
		}
	}
	return lines
}

// checkLayering returns one message per forbidden dependency. deps maps each module-relative
// package to its module-relative transitive dependencies.
func checkLayering(deps map[string][]string) []string {
	var bad []string
	for pkg, ds := range deps {
		for _, r := range layerRules {
			if !r.from(pkg) {
				continue
			}
			for _, d := range ds {
				for _, f := range r.forbidden {
					if under(d, f) && d != pkg {
						bad = append(bad, pkg+" ("+r.desc+") depends on "+d)
					}
				}
			}
		}
	}
	sort.Strings(bad)
	return bad
}

// TestLayering fails when a package depends on a layer above it. It reads the transitive
// dependencies of every non-test package from `go list`, so an indirect violation (metrics → x →
// hsm) counts too.
func TestLayering(t *testing.T) {
	deps := map[string][]string{}
	for _, l := range goList(t, nil, "-f", "{{.ImportPath}}{{range .Deps}} {{.}}{{end}}", "./...") {
		f := strings.Fields(l)
		rel, ok := relPath(f[0])
		if !ok {
			continue
		}
		ds := []string{}
		for _, d := range f[1:] {
			if r, ok := relPath(d); ok {
				ds = append(ds, r)
			}
		}
		deps[rel] = ds
	}
	for _, want := range []string{"hsm", "metrics", "providers", "api", "appliance/tenants", "internal/errs"} {
		if _, ok := deps[want]; !ok {
			t.Fatalf("go list did not report package %s: the layering rules would check nothing", want)
		}
	}
	for _, msg := range checkLayering(deps) {
		t.Error(msg)
	}
}

// TestCheckLayeringCatches proves the rules can fail, on made-up dependency sets.
func TestCheckLayeringCatches(t *testing.T) {
	for _, c := range []struct{ pkg, dep string }{
		{"metrics", "hsm"}, {"hsm", "providers"}, {"providers/vault", "appliance/store"},
		{"internal/errs", "internal/keyutil"}, {"appliance/keys", "api"}, {"api", "appliance/cli"},
	} {
		if bad := checkLayering(map[string][]string{c.pkg: {c.dep}}); len(bad) != 1 {
			t.Errorf("%s → %s: got %q, want one violation", c.pkg, c.dep, bad)
		}
	}
	for _, c := range []struct{ pkg, dep string }{
		{"api", "appliance/keys"}, {"appliance", "api"}, {"appliance/cli", "api"}, {"providers/vault", "providers"},
		{"metrics", "apix"},
	} {
		if bad := checkLayering(map[string][]string{c.pkg: {c.dep}}); len(bad) != 0 {
			t.Errorf("%s → %s is allowed, got %q", c.pkg, c.dep, bad)
		}
	}
}

// TestCgoFreePackages checks that api, metrics and providers (the contract, not the pkcs11
// implementation) build without cgo: no non-standard package among their dependencies has cgo
// files, so `CGO_ENABLED=0 go build ./api ./metrics ./providers` works.
func TestCgoFreePackages(t *testing.T) {
	lines := goList(t, []string{"CGO_ENABLED=1"}, "-deps", "-f", "{{.ImportPath}} {{.Standard}} {{len .CgoFiles}}",
		"./api", "./metrics", "./providers")
	if len(lines) < 10 {
		t.Fatalf("go list -deps reported only %d packages", len(lines))
	}
	for _, l := range lines {
		f := strings.Fields(l)
		if len(f) != 3 {
			t.Fatalf("unexpected go list line %q", l)
		}
		if f[1] == "false" && f[2] != "0" {
			t.Errorf("%s uses cgo but is a dependency of api, metrics or providers, which must build with CGO_ENABLED=0", f[0])
		}
	}
}

func relPath(importPath string) (string, bool) {
	if importPath == module {
		return ".", true
	}
	rel, ok := strings.CutPrefix(importPath, module+"/")
	return rel, ok
}
