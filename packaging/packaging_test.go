package packaging_test

// These tests build the real kmsgate binary, package it with packaging/build-deb.sh and inspect
// the .deb with dpkg-deb: control fields, file list and modes, conffiles, the systemd unit's
// hardening, the maintainer scripts' behaviour (run against a scratch root with stubbed user and
// systemd tools), and — with the packaged binary — the shipped kms.json files and the SoftHSM2
// example end to end through `kmsgate doctor`.
//
// A module that does not compile, or a missing tool (dpkg-deb, dpkg, systemd-analyze, softhsm2-util),
// fails the tests; under `go test -short` they are skipped (testenv.NeedsBackend). KMSGATE_PACKAGING_BIN
// names a prebuilt binary to package instead (stamped with -X main.version=v1.2.3-4-gabcdef0-dirty).

import (
	"bufio"
	"bytes"
	"encoding/base64"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kmsgate/kmsgate/internal/testenv"
)

const rawVersion = "v1.2.3-4-gabcdef0-dirty"
const debVersion = "1.2.3+4.gabcdef0.dirty"

func findRoot() (string, error) {
	wd, err := os.Getwd()
	if err != nil {
		return "", err
	}
	root := filepath.Dir(wd) // go test runs in packaging/
	if _, err := os.Stat(filepath.Join(root, "go.mod")); err != nil {
		return "", fmt.Errorf("cannot find the repository root from %s: %v", wd, err)
	}
	return root, nil
}

func repoRoot(t *testing.T) string {
	t.Helper()
	root, err := findRoot()
	if err != nil {
		t.Fatal(err)
	}
	return root
}

func run(t *testing.T, dir string, env []string, name string, args ...string) (string, string, error) {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), env...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	return out.String(), errb.String(), err
}

func mustRun(t *testing.T, dir string, env []string, name string, args ...string) string {
	t.Helper()
	out, errOut, err := run(t, dir, env, name, args...)
	if err != nil {
		t.Fatalf("%s %s: %v\nstdout:\n%s\nstderr:\n%s", name, strings.Join(args, " "), err, out, errOut)
	}
	return out
}

// pkg is the package built once for all tests.
type pkg struct {
	deb     string // path of the .deb
	tree    string // dpkg-deb -x
	control string // dpkg-deb -e
}

var (
	buildOnce sync.Once
	built     *pkg
	buildErr  error
	buildDir  string // removed by TestMain
)

func TestMain(m *testing.M) {
	code := m.Run()
	if buildDir != "" {
		os.RemoveAll(buildDir)
	}
	os.Exit(code)
}

func debArch() string {
	switch runtime.GOARCH {
	case "arm":
		return "armhf"
	case "386":
		return "i386"
	case "ppc64le":
		return "ppc64el"
	default:
		return runtime.GOARCH
	}
}

func build(t *testing.T) *pkg {
	t.Helper()
	for _, tool := range []string{"dpkg-deb", "dpkg"} {
		testenv.NeedsBackend(t, tool)
	}
	buildOnce.Do(func() {
		built, buildErr = doBuild()
		if built == nil && buildErr == nil {
			buildErr = fmt.Errorf("building the package failed")
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return built
}

func doBuild() (*pkg, error) {
	root, err := findRoot()
	if err != nil {
		return nil, err
	}
	// Not t.TempDir(): the package outlives the first test that asks for it.
	dir, err := os.MkdirTemp("", "kmsgate-packaging-test")
	if err != nil {
		return nil, err
	}
	buildDir = dir
	p := &pkg{}
	bin := filepath.Join(dir, "kmsgate")
	gobin := "go"
	cmd := exec.Command(gobin, "build", "-o", bin, "-ldflags", "-X main.version="+rawVersion+" -X main.commit=abcdef0",
		"github.com/kmsgate/kmsgate")
	if prebuilt := os.Getenv("KMSGATE_PACKAGING_BIN"); prebuilt != "" {
		// A binary built elsewhere, stamped with rawVersion (go build -ldflags "-X main.version=...").
		cmd = exec.Command("cp", prebuilt, bin)
	}
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "CGO_ENABLED=1")
	if out, err := cmd.CombinedOutput(); err != nil {
		return nil, fmt.Errorf("build the kmsgate binary to package: %v\n%s", err, out)
	}
	dist := filepath.Join(dir, "dist")
	cmd = exec.Command(filepath.Join(root, "packaging", "build-deb.sh"), bin, rawVersion)
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "DIST_DIR="+dist, "DEB_COMPRESS=gzip") // xz takes 20 s on two cores
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return nil, fmt.Errorf("build-deb.sh: %v\n%s%s", err, stdout.String(), stderr.String())
	}
	p.deb = strings.TrimSpace(stdout.String())
	p.tree = filepath.Join(dir, "tree")
	p.control = filepath.Join(dir, "control")
	for _, c := range [][]string{{"-x", p.deb, p.tree}, {"-e", p.deb, p.control}} {
		if out, err := exec.Command("dpkg-deb", c...).CombinedOutput(); err != nil {
			return nil, fmt.Errorf("dpkg-deb %v: %v\n%s", c, err, out)
		}
	}
	return p, nil
}

func TestDebianVersionSanitizing(t *testing.T) {
	testenv.NeedsBackend(t, "dpkg")
	script := filepath.Join(repoRoot(t), "packaging", "build-deb.sh")
	for in, want := range map[string]string{
		"18b7711-dirty":           "0.0.0~git18b7711.dirty",
		"18b7711":                 "0.0.0~git18b7711",
		"v1.2.3":                  "1.2.3",
		"v1.2.3-4-gabcdef0":       "1.2.3+4.gabcdef0",
		"v1.2.3-4-gabcdef0-dirty": "1.2.3+4.gabcdef0.dirty",
		"v2.0.0-rc1":              "2.0.0~rc1",
		"dev":                     "0.0.0~dev",
	} {
		got := strings.TrimSpace(mustRun(t, "", nil, script, "--print-version", in))
		if got != want {
			t.Errorf("Debian version of %q = %q, want %q", in, got, want)
		}
		if out, err := exec.Command("dpkg", "--validate-version", got).CombinedOutput(); err != nil {
			t.Errorf("dpkg rejects %q: %s", got, out)
		}
	}
	// Ordering: a pre-release before its release, commits after a tag after it, untagged first.
	for _, c := range [][2]string{{"0.0.0~git18b7711", "1.2.3"}, {"2.0.0~rc1", "2.0.0"}, {"1.2.3", "1.2.3+4.gabcdef0"}} {
		if err := exec.Command("dpkg", "--compare-versions", c[0], "lt", c[1]).Run(); err != nil {
			t.Errorf("want %s < %s", c[0], c[1])
		}
	}
	if _, _, err := run(t, "", nil, script, "only-one-arg"); err == nil {
		t.Error("build-deb.sh with one argument succeeded")
	}
	if _, _, err := run(t, "", nil, script, "/nonexistent/kmsgate", "1.0"); err == nil {
		t.Error("build-deb.sh with a missing binary succeeded")
	}
}

func TestControlFields(t *testing.T) {
	p := build(t)
	if got, want := filepath.Base(p.deb), "kmsgate_"+debVersion+"_"+debArch()+".deb"; got != want {
		t.Errorf("package file %s, want %s", got, want)
	}
	f := map[string]string{}
	for _, k := range []string{"Package", "Version", "Architecture", "Section", "Depends", "Recommends",
		"Description", "Maintainer", "Installed-Size", "Priority"} {
		f[k] = strings.TrimSpace(mustRun(t, "", nil, "dpkg-deb", "-f", p.deb, k))
	}
	want := map[string]string{"Package": "kmsgate", "Version": debVersion, "Architecture": debArch(),
		"Section": "utils", "Recommends": "softhsm2, opensc", "Priority": "optional"}
	for k, v := range want {
		if f[k] != v {
			t.Errorf("%s: %q, want %q", k, f[k], v)
		}
	}
	deps := regexp.MustCompile(`,\s*`).Split(f["Depends"], -1)
	if len(deps) == 0 || !strings.HasPrefix(deps[0], "libc6") {
		t.Errorf("Depends %q does not start with libc6", f["Depends"])
	}
	if !regexp.MustCompile(`^libc6 \(>= 2\.\d+\)$`).MatchString(deps[0]) {
		t.Errorf("Depends %q: a cgo binary needs a versioned libc6 dependency", f["Depends"])
	}
	if !contains(deps, "passwd") {
		t.Errorf("Depends %q lacks passwd (useradd/groupadd in postinst)", f["Depends"])
	}
	if len(strings.Split(f["Description"], "\n")) < 3 || f["Maintainer"] == "" {
		t.Errorf("Description needs a synopsis and a long description, and Maintainer a value: %q / %q",
			f["Description"], f["Maintainer"])
	}
	if n, err := strconv.Atoi(f["Installed-Size"]); err != nil || n < 100 {
		t.Errorf("Installed-Size %q", f["Installed-Size"])
	}
	conffiles, err := os.ReadFile(filepath.Join(p.control, "conffiles"))
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.Fields(string(conffiles)); strings.Join(got, " ") != "/etc/kmsgate/kms.json /etc/default/kmsgate" {
		t.Errorf("conffiles %q", got)
	}
	for _, s := range []string{"postinst", "prerm", "postrm"} {
		st, err := os.Stat(filepath.Join(p.control, s))
		if err != nil {
			t.Fatal(err)
		}
		if st.Mode().Perm() != 0o755 {
			t.Errorf("%s mode %v, want 0755", s, st.Mode().Perm())
		}
		if out, err := exec.Command("sh", "-n", filepath.Join(p.control, s)).CombinedOutput(); err != nil {
			t.Errorf("%s: syntax: %s", s, out)
		}
	}
}

func contains(list []string, s string) bool {
	for _, v := range list {
		if v == s {
			return true
		}
	}
	return false
}

func TestFileListAndModes(t *testing.T) {
	p := build(t)
	listing := mustRun(t, "", nil, "dpkg-deb", "-c", p.deb)
	type entry struct{ mode, owner string }
	got := map[string]entry{}
	sc := bufio.NewScanner(strings.NewReader(listing))
	for sc.Scan() {
		// -rwxr-xr-x root/root  17948232 2026-11-26 21:08 ./usr/bin/kmsgate
		fs := strings.Fields(sc.Text())
		if len(fs) < 6 {
			t.Fatalf("unexpected dpkg-deb -c line %q", sc.Text())
		}
		if fs[0][0] == 'd' {
			continue
		}
		got[strings.TrimPrefix(fs[5], ".")] = entry{fs[0], fs[1]}
	}
	want := map[string]string{
		"/usr/bin/kmsgate":                       "-rwxr-xr-x",
		"/lib/systemd/system/kmsgate.service":    "-rw-r--r--",
		"/etc/kmsgate/kms.json":                  "-rw-r-----",
		"/etc/default/kmsgate":                   "-rw-r-----",
		"/usr/share/doc/kmsgate/README.Debian":   "-rw-r--r--",
		"/usr/share/doc/kmsgate/examples/README": "-rw-r--r--",
	}
	for _, d := range []string{"softhsm", "usb-hsm", "pcscd", "network-hsm", "pcie-hsm", "exec-stack", "tls"} {
		want["/usr/share/doc/kmsgate/examples/dropins/"+d+".conf"] = "-rw-r--r--"
	}
	for _, e := range []string{"pkcs11", "nitrokey", "yubihsm", "cloudhsm", "luna", "vault", "aws-kms"} {
		want["/usr/share/doc/kmsgate/examples/kms.json."+e] = "-rw-r--r--"
	}
	for path, mode := range want {
		e, ok := got[path]
		switch {
		case !ok:
			t.Errorf("missing %s", path)
		case e.mode != mode || e.owner != "root/root":
			t.Errorf("%s: %s %s, want %s root/root", path, e.mode, e.owner, mode)
		}
	}
	var extra []string
	for path := range got {
		if _, ok := want[path]; !ok {
			extra = append(extra, path)
		}
	}
	sort.Strings(extra)
	if len(extra) > 0 {
		t.Errorf("unexpected files in the package: %v", extra)
	}
	// No master key in the package: it is generated per host by postinst.
	if strings.Contains(listing, "master-key") {
		t.Error("the package ships a master-key file")
	}
	out := mustRun(t, "", nil, filepath.Join(p.tree, "usr/bin/kmsgate"), "version")
	if !strings.Contains(out, rawVersion) {
		t.Errorf("packaged binary: `kmsgate version` = %q, want it to contain %s", out, rawVersion)
	}
}

// unit is a parsed systemd unit or drop-in: section -> directive -> values in order.
type unit map[string]map[string][]string

func parseUnit(t *testing.T, path string) unit {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	u := unit{}
	section := ""
	for i, line := range strings.Split(string(b), "\n") {
		line = strings.TrimSpace(line)
		switch {
		case line == "" || line[0] == '#' || line[0] == ';':
		case strings.HasSuffix(line, "\\"):
			t.Errorf("%s:%d: continuation lines are not expected", path, i+1)
		case line[0] == '[' && line[len(line)-1] == ']':
			section = line[1 : len(line)-1]
			if section != "Unit" && section != "Service" && section != "Install" {
				t.Errorf("%s:%d: unexpected section %s", path, i+1, line)
			}
			if u[section] == nil {
				u[section] = map[string][]string{}
			}
		default:
			k, v, ok := strings.Cut(line, "=")
			if !ok || section == "" || !regexp.MustCompile(`^[A-Z][A-Za-z]+$`).MatchString(k) {
				t.Errorf("%s:%d: not a directive: %q", path, i+1, line)
				continue
			}
			u[section][k] = append(u[section][k], v)
		}
	}
	return u
}

func (u unit) last(section, key string) (string, bool) {
	v := u[section][key]
	if len(v) == 0 {
		return "", false
	}
	return v[len(v)-1], true
}

func TestUnitHardening(t *testing.T) {
	p := build(t)
	u := parseUnit(t, filepath.Join(p.tree, "lib/systemd/system/kmsgate.service"))
	want := map[string]string{
		"Type":                    "exec",
		"ExecStart":               "/usr/bin/kmsgate serve",
		"User":                    "kmsgate",
		"Group":                   "kmsgate",
		"NoNewPrivileges":         "yes",
		"ProtectSystem":           "strict",
		"StateDirectory":          "kmsgate",
		"StateDirectoryMode":      "0700",
		"ConfigurationDirectory":  "kmsgate",
		"ProtectHome":             "yes",
		"PrivateTmp":              "yes",
		"PrivateDevices":          "yes",
		"ProtectKernelTunables":   "yes",
		"ProtectKernelModules":    "yes",
		"ProtectKernelLogs":       "yes",
		"ProtectControlGroups":    "yes",
		"ProtectClock":            "yes",
		"RestrictNamespaces":      "yes",
		"RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
		"LockPersonality":         "yes",
		"RestrictSUIDSGID":        "yes",
		"RestrictRealtime":        "yes",
		"MemoryDenyWriteExecute":  "yes",
		"RemoveIPC":               "yes",
		"SystemCallArchitectures": "native",
		"CapabilityBoundingSet":   "",
		"AmbientCapabilities":     "",
		"UMask":                   "0077",
		"LoadCredential":          "master-key:/etc/kmsgate/master-key",
		"EnvironmentFile":         "-/etc/default/kmsgate",
		"Restart":                 "on-failure",
		"KillSignal":              "SIGTERM",
		"LimitCORE":               "0",
	}
	for k, v := range want {
		got, ok := u.last("Service", k)
		if !ok || got != v {
			t.Errorf("[Service] %s=%q (set: %v), want %q", k, got, ok, v)
		}
	}
	if len(u["Service"]["CapabilityBoundingSet"]) != 1 || len(u["Service"]["AmbientCapabilities"]) != 1 {
		t.Error("capabilities must be emptied exactly once, not emptied and then granted")
	}
	if sf := u["Service"]["SystemCallFilter"]; len(sf) == 0 || sf[0] != "@system-service" {
		t.Errorf("SystemCallFilter %q must start with @system-service", sf)
	}
	rw := u["Service"]["ReadWritePaths"]
	if !contains(rw, "/var/lib/kmsgate") || !contains(rw, "-/var/lib/softhsm/tokens") {
		t.Errorf("ReadWritePaths %q: want /var/lib/kmsgate and the optional SoftHSM2 token dir", rw)
	}
	if n, err := strconv.Atoi(firstOf(u["Service"]["LimitNOFILE"])); err != nil || n < 4096 {
		t.Errorf("LimitNOFILE %q", u["Service"]["LimitNOFILE"])
	}
	// The stop timeout must exceed kmsgate's 30 s drain.
	stop, err := time.ParseDuration(firstOf(u["Service"]["TimeoutStopSec"]) + "s")
	if err != nil || stop <= 30*time.Second {
		t.Errorf("TimeoutStopSec %q must be a number of seconds above the 30 s drain", u["Service"]["TimeoutStopSec"])
	}
	env := strings.Join(u["Service"]["Environment"], " ")
	if !strings.Contains(env, "KMSGATE_DATA_DIR=/var/lib/kmsgate") {
		t.Errorf("Environment %q must pin the data dir to the StateDirectory", env)
	}
	if got, _ := u.last("Install", "WantedBy"); got != "multi-user.target" {
		t.Errorf("WantedBy=%q", got)
	}

	// The drop-ins relax exactly what their HSM family needs.
	dropins := filepath.Join(p.tree, "usr/share/doc/kmsgate/examples/dropins")
	for name, directives := range map[string]map[string]string{
		"softhsm.conf":     {"SupplementaryGroups": "softhsm"},
		"usb-hsm.conf":     {"PrivateDevices": "no", "DevicePolicy": "closed", "DeviceAllow": "char-usb_device rw", "RestrictAddressFamilies": "AF_NETLINK"},
		"pcscd.conf":       {},
		"network-hsm.conf": {"RemoveIPC": "no", "RestrictAddressFamilies": "AF_NETLINK"},
		"pcie-hsm.conf":    {"PrivateDevices": "no", "DevicePolicy": "closed"},
		"exec-stack.conf":  {"MemoryDenyWriteExecute": "no"},
		"tls.conf":         {"Environment": "KMSGATE_TLS_CERT=%d/tls-cert KMSGATE_TLS_KEY=%d/tls-key"},
	} {
		d := parseUnit(t, filepath.Join(dropins, name))
		for k, v := range directives {
			if got, ok := d.last("Service", k); !ok || got != v {
				t.Errorf("%s: [Service] %s=%q, want %q", name, k, got, v)
			}
		}
		// Never loosen what no HSM needs.
		for _, k := range []string{"User", "ExecStart", "NoNewPrivileges", "CapabilityBoundingSet", "AmbientCapabilities",
			"ProtectSystem", "ProtectHome", "SystemCallFilter"} {
			if _, ok := d["Service"][k]; ok {
				t.Errorf("%s must not touch %s", name, k)
			}
		}
		if name == "pcscd.conf" && !contains(d["Unit"]["After"], "pcscd.socket") {
			t.Errorf("pcscd.conf must order kmsgate after pcscd.socket")
		}
	}
}

func firstOf(v []string) string {
	if len(v) == 0 {
		return ""
	}
	return v[0]
}

// systemdRoot lays out the extracted package plus the host's own units (targets the unit refers
// to) as an alternative root for systemd-analyze, with every drop-in installed when withDropins.
func systemdRoot(t *testing.T, p *pkg, withDropins bool) string {
	t.Helper()
	root := t.TempDir()
	mustRun(t, "", nil, "cp", "-R", p.tree+"/.", root)
	for _, d := range []string{"/lib/systemd/system", "/usr/lib/systemd/system"} {
		if st, err := os.Lstat(d); err == nil && st.IsDir() {
			dst := filepath.Join(root, d)
			if err := os.MkdirAll(dst, 0o755); err != nil {
				t.Fatal(err)
			}
			// The host's units, then ours again on top.
			mustRun(t, "", nil, "cp", "-R", "--no-clobber", d+"/.", dst)
		}
	}
	if withDropins {
		dir := filepath.Join(root, "etc/systemd/system/kmsgate.service.d")
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		mustRun(t, "", nil, "sh", "-c", `cp "$1"/*.conf "$2"/`, "sh",
			filepath.Join(p.tree, "usr/share/doc/kmsgate/examples/dropins"), dir)
	}
	return root
}

func TestSystemdAnalyze(t *testing.T) {
	testenv.NeedsBackend(t, "systemd-analyze")
	p := build(t)
	for _, withDropins := range []bool{false, true} {
		root := systemdRoot(t, p, withDropins)
		out, errOut, err := run(t, "", nil, "systemd-analyze", "verify", "--root="+root, "kmsgate.service")
		if err != nil {
			t.Errorf("systemd-analyze verify (drop-ins: %v): %v\n%s%s", withDropins, err, out, errOut)
		}
		// Unknown directives and bad values are only warnings for systemd: fail on any mention.
		for _, l := range strings.Split(out+errOut, "\n") {
			if strings.Contains(l, "kmsgate") {
				t.Errorf("systemd-analyze verify (drop-ins: %v): %s", withDropins, l)
			}
		}
		help, _, _ := run(t, "", nil, "systemd-analyze", "--help")
		if !strings.Contains(help, "--offline") {
			t.Log("NOT CHECKED: this systemd-analyze has no security --offline (systemd < 250)")
			continue
		}
		out, errOut, err = run(t, "", nil, "systemd-analyze", "security", "--offline=yes", "--root="+root, "kmsgate.service")
		m := regexp.MustCompile(`Overall exposure level for kmsgate\.service: (\d+\.\d+)`).FindStringSubmatch(out + errOut)
		if err != nil || m == nil {
			t.Fatalf("systemd-analyze security: %v\n%s%s", err, out, errOut)
		}
		score, _ := strconv.ParseFloat(m[1], 64)
		limit := 1.5 // the strict default; every drop-in together may relax a little
		if withDropins {
			limit = 2.5
		}
		t.Logf("systemd-analyze security exposure (drop-ins: %v): %.1f", withDropins, score)
		if score > limit {
			t.Errorf("exposure %.1f (drop-ins: %v) above %.1f: a hardening directive was lost", score, withDropins, limit)
		}
	}
}

// stubs writes fake user-management and systemd tools that log their arguments to state/calls.
func stubs(t *testing.T, dir, state string) {
	t.Helper()
	scripts := map[string]string{
		"getent": `case "$1 $2" in
"group kmsgate") [ -e "$STATE/group" ];;
"passwd kmsgate") [ -e "$STATE/user" ];;
"group softhsm") [ -n "$STUB_SOFTHSM" ];;
*) exit 2;;
esac`,
		"groupadd": `touch "$STATE/group"`,
		"useradd":  `touch "$STATE/user"`,
		"usermod":  `touch "$STATE/softhsm-member"`,
		"id":       `if [ -e "$STATE/softhsm-member" ]; then echo "kmsgate softhsm"; else echo kmsgate; fi`,
		"dpkg-statoverride": `case "$1" in
--list) [ -e "$STATE/override" ];;
--update) touch "$STATE/override";;
--remove) rm -f "$STATE/override";;
esac`,
		"chown":     `:`,
		"systemctl": `:`,
	}
	for name, body := range scripts {
		s := "#!/bin/sh\necho \"" + name + " $*\" >> \"$STATE/calls\"\n" + body + "\n"
		if err := os.WriteFile(filepath.Join(dir, name), []byte(s), 0o755); err != nil {
			t.Fatal(err)
		}
	}
}

func TestMaintainerScripts(t *testing.T) {
	p := build(t)
	scripts := p.control
	tmp := t.TempDir()
	root, state, bin := filepath.Join(tmp, "root"), filepath.Join(tmp, "state"), filepath.Join(tmp, "bin")
	for _, d := range []string{filepath.Join(root, "etc/kmsgate"), state, bin,
		filepath.Join(root, "etc/systemd/system/multi-user.target.wants")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	stubs(t, bin, state)
	env := []string{"DPKG_ROOT=" + root, "STATE=" + state, "PATH=" + bin + ":" + os.Getenv("PATH"), "STUB_SOFTHSM=1"}
	maint := func(script string, args ...string) (string, error) {
		out, errOut, err := run(t, "", env, "sh", append([]string{filepath.Join(scripts, script)}, args...)...)
		return out + errOut, err
	}
	calls := func() string {
		b, err := os.ReadFile(filepath.Join(state, "calls"))
		if err != nil && !os.IsNotExist(err) {
			t.Fatal(err)
		}
		return string(b)
	}
	keyFile := filepath.Join(root, "etc/kmsgate/master-key")

	// First installation.
	if out, err := maint("postinst", "configure"); err != nil {
		t.Fatalf("postinst configure: %v\n%s", err, out)
	}
	c := calls()
	for _, want := range []string{
		"groupadd --system kmsgate",
		"useradd --system --gid kmsgate --home-dir /var/lib/kmsgate --no-create-home --shell /usr/sbin/nologin",
		"usermod -a -G softhsm kmsgate",
		"dpkg-statoverride --update --add root kmsgate 0640 /etc/kmsgate/kms.json",
		"chown kmsgate:kmsgate " + filepath.Join(root, "var/lib/kmsgate"),
		"chown root:root " + keyFile + ".tmp",
	} {
		if !strings.Contains(c, want) {
			t.Errorf("postinst did not run %q; calls:\n%s", want, c)
		}
	}
	if strings.Contains(c, "systemctl") {
		t.Errorf("postinst called systemctl outside a running systemd (DPKG_ROOT set):\n%s", c)
	}
	st, err := os.Stat(keyFile)
	if err != nil {
		t.Fatalf("postinst did not create the master key: %v", err)
	}
	if st.Mode().Perm() != 0o600 {
		t.Errorf("master key mode %v, want 0600", st.Mode().Perm())
	}
	key1, _ := os.ReadFile(keyFile)
	if raw, err := base64.StdEncoding.DecodeString(strings.TrimSpace(string(key1))); err != nil || len(raw) != 32 {
		t.Errorf("master key %q is not base64 of 32 bytes (%d bytes, %v)", key1, len(raw), err)
	}
	if st, err := os.Stat(filepath.Join(root, "var/lib/kmsgate")); err != nil || st.Mode().Perm() != 0o700 {
		t.Errorf("data dir: %v %v, want mode 0700", st, err)
	}
	if _, err := os.Stat(keyFile + ".tmp"); err == nil {
		t.Error("postinst left master-key.tmp behind")
	}

	// Upgrade / reconfigure: nothing is created twice, the master key is never replaced.
	if err := os.WriteFile(filepath.Join(state, "calls"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := maint("postinst", "configure", "0.0.0~git18b7711"); err != nil {
		t.Fatalf("postinst configure (upgrade): %v\n%s", err, out)
	}
	if c := calls(); strings.Contains(c, "groupadd") || strings.Contains(c, "useradd") ||
		strings.Contains(c, "usermod") || strings.Contains(c, "--add") || strings.Contains(c, "chown") {
		t.Errorf("postinst on upgrade repeated first-install steps:\n%s", c)
	}
	if key2, _ := os.ReadFile(keyFile); !bytes.Equal(key1, key2) {
		t.Error("postinst replaced an existing master key")
	}

	// Without a softhsm group, no group change.
	env2 := append([]string(nil), env...)
	env2[len(env2)-1] = "STUB_SOFTHSM="
	if err := os.RemoveAll(state); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(state, 0o755); err != nil {
		t.Fatal(err)
	}
	if out, errOut, err := run(t, "", env2, "sh", filepath.Join(scripts, "postinst"), "configure"); err != nil {
		t.Fatalf("postinst without softhsm: %v\n%s%s", err, out, errOut)
	}
	if strings.Contains(calls(), "usermod") {
		t.Error("postinst ran usermod although the softhsm group does not exist")
	}

	if _, err := maint("postinst", "bogus"); err == nil {
		t.Error("postinst accepted an unknown action")
	}
	if out, err := maint("prerm", "remove"); err != nil {
		t.Errorf("prerm remove: %v\n%s", err, out)
	}
	if out, err := maint("postrm", "remove"); err != nil {
		t.Errorf("postrm remove: %v\n%s", err, out)
	}

	// Purge keeps the key store and its master key, drops the stat override and the enablement link.
	wants := filepath.Join(root, "etc/systemd/system/multi-user.target.wants/kmsgate.service")
	if err := os.Symlink("/lib/systemd/system/kmsgate.service", wants); err != nil {
		t.Fatal(err)
	}
	out, err := maint("postrm", "purge")
	if err != nil {
		t.Fatalf("postrm purge: %v\n%s", err, out)
	}
	if !strings.Contains(out, "KEPT") {
		t.Errorf("postrm purge must say loudly what it kept; printed:\n%s", out)
	}
	for _, keep := range []string{keyFile, filepath.Join(root, "var/lib/kmsgate")} {
		if _, err := os.Stat(keep); err != nil {
			t.Errorf("purge removed %s", keep)
		}
	}
	if _, err := os.Lstat(wants); err == nil {
		t.Error("purge left the multi-user.target.wants link")
	}
	if c := calls(); !strings.Contains(c, "dpkg-statoverride --remove /etc/kmsgate/kms.json") || strings.Contains(c, "systemctl") {
		t.Errorf("postrm purge calls:\n%s", c)
	}
}

// TestShippedConfigs loads the packaged kms.json and every example with the packaged binary.
func TestShippedConfigs(t *testing.T) {
	p := build(t)
	kmsgate := filepath.Join(p.tree, "usr/bin/kmsgate")
	secrets := []string{"pin-7f3a9c", "cu-pw-7f3a9c", "AKIA7F3A9C", "aws-secret-7f3a9c"}
	env := []string{"HSM_PIN=" + secrets[0], "CLOUDHSM_USER=cu", "CLOUDHSM_PASSWORD=" + secrets[1], "AWS_REGION=eu-west-1",
		"AWS_ACCESS_KEY_ID=" + secrets[2], "AWS_SECRET_ACCESS_KEY=" + secrets[3], "CREDENTIALS_DIRECTORY=/run/credentials/kmsgate.service"}
	check := func(name, src string) {
		dir := t.TempDir()
		b, err := os.ReadFile(src)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, "kms.json"), b, 0o600); err != nil {
			t.Fatal(err)
		}
		out, errOut, err := run(t, "", env, kmsgate, "config", "check", "--config-dir", dir)
		if err != nil || !strings.Contains(out, "config OK") {
			t.Errorf("%s: kmsgate config check: %v\n%s%s", name, err, out, errOut)
		}
		for _, secret := range secrets {
			if strings.Contains(out+errOut, secret) {
				t.Errorf("%s: config check printed a secret (%q)", name, secret)
			}
		}
	}
	check("/etc/kmsgate/kms.json", filepath.Join(p.tree, "etc/kmsgate/kms.json"))
	examples, _ := filepath.Glob(filepath.Join(p.tree, "usr/share/doc/kmsgate/examples/kms.json.*"))
	if len(examples) < 5 {
		t.Fatalf("only %d kms.json examples", len(examples))
	}
	for _, e := range examples {
		check(filepath.Base(e), e)
	}
	// The default configuration is the db provider alone.
	out := mustRun(t, "", nil, kmsgate, "config", "check", "--config-dir", filepath.Join(p.tree, "etc/kmsgate"))
	if strings.Contains(out, "pkcs11") || !strings.Contains(out, `"defaultProvider": "db"`) {
		t.Errorf("default kms.json is not db-only:\n%s", out)
	}
}

// TestDefaultEnvFile checks that /etc/default/kmsgate only documents (every assignment commented
// out) and that every KMSGATE_* variable it names is one kmsgate's code reads.
func TestDefaultEnvFile(t *testing.T) {
	p := build(t)
	def, err := os.ReadFile(filepath.Join(p.tree, "etc/default/kmsgate"))
	if err != nil {
		t.Fatal(err)
	}
	root := repoRoot(t)
	var src strings.Builder
	for _, dir := range []string{".", "appliance", "appliance/cli", "appliance/seal", "appliance/config"} {
		files, _ := filepath.Glob(filepath.Join(root, dir, "*.go"))
		for _, f := range files {
			if strings.HasSuffix(f, "_test.go") {
				continue
			}
			b, err := os.ReadFile(f)
			if err != nil {
				t.Fatal(err)
			}
			src.Write(b)
		}
	}
	documented := 0
	for _, l := range strings.Split(string(def), "\n") {
		if l != "" && !strings.HasPrefix(l, "#") {
			t.Errorf("/etc/default/kmsgate sets %q; it must only document", l)
		}
		if m := regexp.MustCompile(`^#(KMSGATE_[A-Z_]+)=`).FindStringSubmatch(l); m != nil {
			documented++
			if !strings.Contains(src.String(), `"`+m[1]+`"`) {
				t.Errorf("/etc/default/kmsgate documents %s, which kmsgate's code does not read", m[1])
			}
		}
	}
	if documented < 8 {
		t.Errorf("/etc/default/kmsgate documents only %d KMSGATE_* variables", documented)
	}
	for _, v := range []string{"KMSGATE_LISTEN", "KMSGATE_MASTER_KEY", "KMSGATE_MASTER_KEY_FILE", "HSM_PIN"} {
		if !strings.Contains(string(def), "#"+v+"=") {
			t.Errorf("/etc/default/kmsgate does not document %s", v)
		}
	}
}

// TestSoftHSMExampleDoctor runs `kmsgate doctor` from the package against a fresh SoftHSM2
// token with the shipped kms.json.pkcs11, as README.Debian tells operators to.
func TestSoftHSMExampleDoctor(t *testing.T) {
	testenv.NeedsBackend(t, "softhsm2")
	p := build(t)
	kmsgate := filepath.Join(p.tree, "usr/bin/kmsgate")
	// README.Debian and the examples tell operators to run these.
	for _, cmd := range [][]string{{"doctor", "--help"}, {"hsm", "slots", "--help"}} {
		if out, errOut, err := run(t, "", nil, kmsgate, cmd...); err != nil || strings.Contains(out, "Available Commands") {
			t.Fatalf("the packaged binary has no `kmsgate %s` (is it added in appliance.NewRootCmd?): %v\n%s%s",
				strings.Join(cmd[:len(cmd)-1], " "), err, out, errOut)
		}
	}
	tmp := t.TempDir()
	conf := filepath.Join(tmp, "softhsm2.conf")
	tokens := filepath.Join(tmp, "tokens")
	if err := os.MkdirAll(tokens, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(conf, []byte("directories.tokendir = "+tokens+"\nobjectstore.backend = file\nlog.level = ERROR\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	env := []string{"SOFTHSM2_CONF=" + conf, "HSM_PIN=246810"}
	mustRun(t, "", env, "softhsm2-util", "--init-token", "--free", "--label", "kmsgate", "--pin", "246810", "--so-pin", "13579111")
	cfg := filepath.Join(tmp, "config")
	if err := os.MkdirAll(cfg, 0o700); err != nil {
		t.Fatal(err)
	}
	src, err := os.Open(filepath.Join(p.tree, "usr/share/doc/kmsgate/examples/kms.json.pkcs11"))
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	dst, err := os.Create(filepath.Join(cfg, "kms.json"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(dst, src); err != nil {
		t.Fatal(err)
	}
	dst.Close()
	out, errOut, err := run(t, "", env, kmsgate, "doctor", "--config-dir", cfg,
		"--data-dir", filepath.Join(tmp, "data"))
	if err != nil {
		t.Fatalf("kmsgate doctor with the shipped SoftHSM2 example: %v\n%s%s", err, out, errOut)
	}
	if strings.Contains(out, "246810") || strings.Contains(errOut, "246810") {
		t.Error("doctor printed the PIN")
	}
}

// TestDpkgLifecycle installs, upgrades and purges the package with dpkg itself into a scratch
// root (--root with chrootless maintainer scripts, which then see DPKG_ROOT), user management and
// dpkg-statoverride stubbed so the host is never touched.
func TestDpkgLifecycle(t *testing.T) {
	p := build(t)
	tmp := t.TempDir()
	root, state, bin := filepath.Join(tmp, "root"), filepath.Join(tmp, "state"), filepath.Join(tmp, "bin")
	for _, d := range []string{"var/lib/dpkg/info", "var/lib/dpkg/updates", "var/lib/dpkg/triggers"} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	for _, f := range []string{"var/lib/dpkg/status", "var/lib/dpkg/available"} {
		if err := os.WriteFile(filepath.Join(root, f), nil, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	for _, d := range []string{state, bin} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	stubs(t, bin, state)
	env := []string{"STATE=" + state, "PATH=" + bin + ":" + os.Getenv("PATH"), "STUB_SOFTHSM="}
	dpkg := func(args ...string) string {
		t.Helper()
		base := []string{"--root=" + root, "--force-script-chrootless", "--force-depends", "--force-not-root"}
		return mustRun(t, "", env, "dpkg", append(base, args...)...)
	}

	dpkg("-i", p.deb)
	if out := dpkg("-s", "kmsgate"); !strings.Contains(out, "Status: install ok installed") {
		t.Fatalf("after install:\n%s", out)
	}
	keyFile := filepath.Join(root, "etc/kmsgate/master-key")
	key, err := os.ReadFile(keyFile)
	if err != nil {
		t.Fatalf("no master key after install: %v", err)
	}
	// The administrator edits kms.json; an upgrade keeps the edit and the master key.
	kms := filepath.Join(root, "etc/kmsgate/kms.json")
	edited := []byte(`{"providers":[{"id":"db","type":"db","description":"edited"}]}` + "\n")
	if err := os.WriteFile(kms, edited, 0o640); err != nil {
		t.Fatal(err)
	}
	newer := filepath.Join(tmp, "newer")
	cmd := exec.Command(filepath.Join(repoRoot(t), "packaging", "build-deb.sh"), filepath.Join(p.tree, "usr/bin/kmsgate"), "v1.2.4")
	cmd.Env = append(os.Environ(), "DIST_DIR="+newer, "DEB_COMPRESS=gzip")
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("build-deb.sh v1.2.4: %v", err)
	}
	dpkg("--force-confold", "-i", strings.TrimSpace(string(out)))
	if v := dpkg("-s", "kmsgate"); !strings.Contains(v, "Version: 1.2.4") {
		t.Fatalf("after upgrade:\n%s", v)
	}
	if b, _ := os.ReadFile(kms); !bytes.Equal(b, edited) {
		t.Errorf("upgrade replaced the edited conffile kms.json:\n%s", b)
	}
	if b, _ := os.ReadFile(keyFile); !bytes.Equal(b, key) {
		t.Error("upgrade replaced the master key")
	}

	dpkg("--purge", "kmsgate")
	for _, gone := range []string{kms, filepath.Join(root, "etc/default/kmsgate"), filepath.Join(root, "usr/bin/kmsgate"),
		filepath.Join(root, "lib/systemd/system/kmsgate.service")} {
		if _, err := os.Lstat(gone); err == nil {
			t.Errorf("purge left %s", gone)
		}
	}
	for _, kept := range []string{keyFile, filepath.Join(root, "var/lib/kmsgate")} {
		if _, err := os.Stat(kept); err != nil {
			t.Errorf("purge removed %s: the key store and its master key are never deleted", kept)
		}
	}
	if b, _ := os.ReadFile(keyFile); !bytes.Equal(b, key) {
		t.Error("purge changed the master key")
	}
}
