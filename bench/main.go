// Command kmsgate-bench measures signing throughput and latency, in one run, for:
//   - the limit: raw C_SignInit+C_Sign on SoftHSM2 (one pre-opened, logged-in session per worker,
//     cached handle) at concurrency 1, 2, 8;
//   - kmsgate over HTTP (keep-alive, POST /keys/{kid}/sign) with the pkcs11 provider at 1, 2, 8, 32;
//   - the db provider over HTTP against an in-process crypto/ecdsa loop with 2 goroutines;
//   - Vault Transit signing directly and through kmsgate's vault provider;
//
// and prints the ratios, the PKCS#11 calls per signature taken from kmsgate's own metrics, and the
// server's peak RSS. It starts everything itself (SoftHSM2 token with 200 extra key objects, the
// kmsgate binary, a Vault dev server) and cleans up afterwards.
package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/miekg/pkcs11"
	"github.com/valyala/fasthttp"
)

type result struct {
	name      string
	conc      int
	n         int64
	errs      int64
	dur       time.Duration
	p50, p99  time.Duration
	perSecond float64
}

func (r result) String() string {
	return fmt.Sprintf("| %-34s | %4d | %9.0f | %8s | %8s | %6d |", r.name, r.conc, r.perSecond,
		fmtDur(r.p50), fmtDur(r.p99), r.errs)
}

func fmtDur(d time.Duration) string {
	if d == 0 {
		return "-"
	}
	return fmt.Sprintf("%.3fms", float64(d.Microseconds())/1000)
}

type opts struct {
	kmsgate  string
	lib      string
	vault    string
	duration time.Duration
	extra    int
	skipVlt  bool
}

func main() {
	var o opts
	home, _ := os.UserHomeDir()
	flag.StringVar(&o.kmsgate, "kmsgate", "bin/kmsgate", "kmsgate binary")
	flag.StringVar(&o.lib, "library", "/usr/lib/softhsm/libsofthsm2.so", "SoftHSM2 PKCS#11 library")
	flag.StringVar(&o.vault, "vault", envOr("KMSGATE_VAULT_BIN", filepath.Join(home, ".cache/kmsgate-tools/vault")), "vault binary")
	flag.DurationVar(&o.duration, "duration", 3*time.Second, "measurement time per step")
	flag.IntVar(&o.extra, "extra-keys", 100, "extra EC key pairs on the token (2 objects each)")
	flag.BoolVar(&o.skipVlt, "no-vault", false, "skip the Vault comparison")
	flag.Parse()
	if err := run(o); err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}

func envOr(k, d string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return d
}

func run(o opts) error {
	work, err := os.MkdirTemp("", "kmsgate-bench-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(work)
	ctx := context.Background()

	fmt.Println("# kmsgate signing benchmark")
	fmt.Printf("machine: %d CPUs, %s; step duration %s\n\n", numCPU(), goVersion(), o.duration)

	// --- SoftHSM2 token -------------------------------------------------------------------
	conf, err := softhsmToken(work, "bench", "1234")
	if err != nil {
		return err
	}
	os.Setenv("SOFTHSM2_CONF", conf)
	p := pkcs11.New(o.lib)
	if p == nil {
		return fmt.Errorf("cannot load %s", o.lib)
	}
	if err := p.Initialize(); err != nil {
		return fmt.Errorf("C_Initialize: %w", err)
	}
	slot, err := firstSlot(p)
	if err != nil {
		return err
	}
	fmt.Printf("SoftHSM2 token: creating %d extra EC key pairs (%d objects) so a per-sign C_FindObjects would show…\n",
		o.extra, 2*o.extra)
	if err := extraKeys(p, slot, "1234", o.extra); err != nil {
		return err
	}

	// --- the limit: raw C_Sign ------------------------------------------------------------
	var rows []result
	bestRaw := 0.0
	for _, c := range []int{1, 2, 8} {
		r, err := rawPKCS11(p, slot, "1234", c, o.duration)
		if err != nil {
			return err
		}
		rows = append(rows, r)
		bestRaw = max(bestRaw, r.perSecond)
	}
	// --- in-process crypto/ecdsa baseline for db -------------------------------------------
	base := ecdsaLoop(2, o.duration)
	rows = append(rows, base)

	// Finalize before kmsgate loads the same token in its own process (SoftHSM keeps state per
	// process; two processes on one token are fine, but we want the HSM cores for kmsgate).
	p.Finalize()

	// --- Vault dev server (started first so kmsgate's vault provider can point at it) -------
	var vs *vaultServer
	var vaultNote, vaultEntry string
	if !o.skipVlt {
		if vs, err = startVault(ctx, o.vault); err != nil {
			return err
		}
		defer vs.stop()
		vaultEntry = fmt.Sprintf(`,{"id":"vault","type":"vault","vaultUrl":%q,"vaultToken":"${BENCH_VAULT_TOKEN}"}`, vs.addr)
		os.Setenv("BENCH_VAULT_TOKEN", vs.token)
	} else {
		vaultNote = "-no-vault given"
	}

	// --- kmsgate ----------------------------------------------------------------------------
	srv, err := startKmsgate(ctx, o, work, conf, vaultEntry)
	if err != nil {
		return err
	}
	defer srv.stop()

	for _, kid := range []struct{ kid, prov string }{{"bench-hsm", "hsm"}, {"bench-db", "db"}} {
		if err := srv.generate(kid.kid, kid.prov); err != nil {
			return err
		}
	}
	before, _ := srv.metrics()
	bestHSM, bestDB := 0.0, 0.0
	var p99HSM1, p99DB1 time.Duration
	var hsmSigns int64
	for _, c := range []int{1, 2, 8, 32} {
		r := httpLoad(srv.url, srv.key, "/keys/bench-hsm/sign", "kmsgate pkcs11 over HTTP", c, o.duration)
		rows = append(rows, r)
		hsmSigns += r.n
		bestHSM = max(bestHSM, r.perSecond)
		if c == 1 {
			p99HSM1 = r.p99
		}
	}
	after, _ := srv.metrics()
	for _, c := range []int{1, 2, 8, 32} {
		r := httpLoad(srv.url, srv.key, "/keys/bench-db/sign", "kmsgate db over HTTP", c, o.duration)
		rows = append(rows, r)
		bestDB = max(bestDB, r.perSecond)
		if c == 1 {
			p99DB1 = r.p99
		}
	}

	// --- Vault -----------------------------------------------------------------------------
	var vaultRows []result
	if vs != nil {
		if vaultRows, err = vaultBench(vs, srv, o.duration); err != nil {
			return err
		}
		rows = append(rows, vaultRows...)
	}
	peakRSS := srv.peakRSS()

	fmt.Println()
	fmt.Println("| step                               | conc |  signs/s  |   p50    |   p99    | errors |")
	fmt.Println("|------------------------------------|------|-----------|----------|----------|--------|")
	for _, r := range rows {
		fmt.Println(r)
	}
	fmt.Println()
	fmt.Println("| ratio (best of each)                         | value | target |")
	fmt.Println("|----------------------------------------------|-------|--------|")
	fmt.Printf("| kmsgate pkcs11 over HTTP / raw C_Sign loop   | %5.1f%% | ≥ 75%% |\n", 100*bestHSM/bestRaw)
	fmt.Printf("| kmsgate db over HTTP / in-process ecdsa (2)  | %5.1f%% | ≥ 50%% |\n", 100*bestDB/base.perSecond)
	fmt.Printf("| p99 at concurrency 1, pkcs11 / db            | %s / %s | ≤ 1.5ms |\n", fmtDur(p99HSM1), fmtDur(p99DB1))
	if len(vaultRows) > 0 {
		printVaultRatios(rows)
	} else if vaultNote != "" {
		fmt.Printf("| Vault comparison                             | skipped: %s |\n", vaultNote)
	}
	fmt.Println()
	fmt.Printf("PKCS#11 calls during the %d pkcs11 signatures (from kmsgate's /metrics):\n", hsmSigns)
	for _, m := range []string{"kmsgate_pkcs11_sessions_opened_total", "kmsgate_pkcs11_logins_total", "kmsgate_pkcs11_object_searches_total"} {
		d := after[m] - before[m]
		fmt.Printf("  %-40s +%.0f  (%.4f per signature)\n", m, d, d/float64(max(hsmSigns, 1)))
	}
	fmt.Printf("\nkmsgate server peak RSS (VmHWM): %.1f MiB\n", float64(peakRSS)/(1<<20))
	return nil
}

func printVaultRatios(rows []result) {
	byConc := func(prefix string) map[int]float64 {
		m := map[int]float64{}
		for _, r := range rows {
			if strings.HasPrefix(r.name, prefix) {
				m[r.conc] = r.perSecond
			}
		}
		return m
	}
	vault, kv, db := byConc("vault transit direct"), byConc("kmsgate vault over HTTP"), byConc("kmsgate db over HTTP")
	for _, c := range []int{1, 32} {
		if vault[c] == 0 {
			continue
		}
		fmt.Printf("| kmsgate db / Vault direct, conc %-2d           | %5.1fx | ≥ 4x |\n", c, db[c]/vault[c])
		fmt.Printf("| kmsgate vault / Vault direct, conc %-2d        | %5.1f%% |  -   |\n", c, 100*kv[c]/vault[c])
	}
}

func numCPU() int {
	b, _ := os.ReadFile("/proc/cpuinfo")
	return strings.Count(string(b), "processor\t:")
}

func goVersion() string {
	out, err := exec.Command("go", "version").Output()
	if err != nil {
		return "go ?"
	}
	return strings.TrimSpace(string(out))
}

// ---------- SoftHSM2 -----------------------------------------------------------------------

func softhsmToken(work, label, pin string) (string, error) {
	dir := filepath.Join(work, "tokens")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", err
	}
	conf := filepath.Join(work, "softhsm2.conf")
	if err := os.WriteFile(conf, []byte("directories.tokendir = "+dir+"\nobjectstore.backend = file\nlog.level = ERROR\n"), 0o600); err != nil {
		return "", err
	}
	cmd := exec.Command("softhsm2-util", "--init-token", "--free", "--label", label, "--pin", pin, "--so-pin", "5678")
	cmd.Env = append(os.Environ(), "SOFTHSM2_CONF="+conf)
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("softhsm2-util: %v: %s", err, out)
	}
	return conf, nil
}

func firstSlot(p *pkcs11.Ctx) (uint, error) {
	slots, err := p.GetSlotList(true)
	if err != nil || len(slots) == 0 {
		return 0, fmt.Errorf("no token: %v", err)
	}
	return slots[0], nil
}

var p256OID = []byte{0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07}

func genKey(p *pkcs11.Ctx, s pkcs11.SessionHandle, label string) (pkcs11.ObjectHandle, error) {
	pub := []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true), pkcs11.NewAttribute(pkcs11.CKA_VERIFY, true),
		pkcs11.NewAttribute(pkcs11.CKA_EC_PARAMS, p256OID), pkcs11.NewAttribute(pkcs11.CKA_LABEL, label),
	}
	priv := []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true), pkcs11.NewAttribute(pkcs11.CKA_SIGN, true),
		pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true), pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, true),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, label),
	}
	_, h, err := p.GenerateKeyPair(s, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_EC_KEY_PAIR_GEN, nil)}, pub, priv)
	return h, err
}

func extraKeys(p *pkcs11.Ctx, slot uint, pin string, n int) error {
	s, err := p.OpenSession(slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
	if err != nil {
		return err
	}
	defer p.CloseSession(s)
	if err := p.Login(s, pkcs11.CKU_USER, pin); err != nil {
		return err
	}
	for i := 0; i < n; i++ {
		if _, err := genKey(p, s, fmt.Sprintf("filler-%d", i)); err != nil {
			return fmt.Errorf("filler key %d: %w", i, err)
		}
	}
	return nil
}

// rawPKCS11 is the limit kmsgate is measured against: one pre-opened logged-in session per
// worker, the handle found once, nothing but C_SignInit + C_Sign in the loop.
func rawPKCS11(p *pkcs11.Ctx, slot uint, pin string, conc int, d time.Duration) (result, error) {
	s0, err := p.OpenSession(slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
	if err != nil {
		return result{}, err
	}
	defer p.CloseSession(s0)
	if err := p.Login(s0, pkcs11.CKU_USER, pin); err != nil && !errors.Is(err, pkcs11.Error(pkcs11.CKR_USER_ALREADY_LOGGED_IN)) {
		return result{}, err
	}
	key, err := genKey(p, s0, fmt.Sprintf("raw-%d", conc))
	if err != nil {
		return result{}, err
	}
	sessions := make([]pkcs11.SessionHandle, conc)
	for i := range sessions {
		if sessions[i], err = p.OpenSession(slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION); err != nil {
			return result{}, err
		}
		defer p.CloseSession(sessions[i])
	}
	digest := sha256.Sum256([]byte("benchmark message"))
	mech := []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_ECDSA, nil)}
	return measure("raw C_Sign on SoftHSM2 (limit)", conc, d, func(w int) error {
		if err := p.SignInit(sessions[w], mech, key); err != nil {
			return err
		}
		_, err := p.Sign(sessions[w], digest[:])
		return err
	}), nil
}

func ecdsaLoop(conc int, d time.Duration) result {
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	digest := sha256.Sum256([]byte("benchmark message"))
	return measure("in-process crypto/ecdsa (db limit)", conc, d, func(int) error {
		_, err := ecdsa.SignASN1(rand.Reader, k, digest[:])
		return err
	})
}

// measure runs fn on conc workers for d, recording every latency.
func measure(name string, conc int, d time.Duration, fn func(worker int) error) result {
	var n, errs atomic.Int64
	lat := make([][]time.Duration, conc)
	stop := make(chan struct{})
	var wg sync.WaitGroup
	start := time.Now()
	for w := 0; w < conc; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			l := make([]time.Duration, 0, 1<<16)
			for {
				select {
				case <-stop:
					lat[w] = l
					return
				default:
				}
				t0 := time.Now()
				if err := fn(w); err != nil {
					errs.Add(1)
				} else {
					n.Add(1)
				}
				l = append(l, time.Since(t0))
			}
		}()
	}
	time.Sleep(d)
	close(stop)
	wg.Wait()
	el := time.Since(start)
	var all []time.Duration
	for _, l := range lat {
		all = append(all, l...)
	}
	sort.Slice(all, func(i, j int) bool { return all[i] < all[j] })
	r := result{name: name, conc: conc, n: n.Load(), errs: errs.Load(), dur: el, perSecond: float64(n.Load()) / el.Seconds()}
	if len(all) > 0 {
		r.p50 = all[len(all)/2]
		r.p99 = all[len(all)*99/100]
	}
	return r
}

// ---------- kmsgate -------------------------------------------------------------------------

type server struct {
	cmd  *exec.Cmd
	url  string
	key  string
	data string
	done chan struct{}
}

func freeAddr() (string, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer l.Close()
	return l.Addr().String(), nil
}

func startKmsgate(ctx context.Context, o opts, work, softhsmConf string, vaultEntry string) (*server, error) {
	cfg := filepath.Join(work, "config")
	data := filepath.Join(work, "data")
	if err := os.MkdirAll(cfg, 0o700); err != nil {
		return nil, err
	}
	kms := fmt.Sprintf(`{"defaultProvider":"db","providers":[{"id":"db","type":"db"},
	  {"id":"hsm","type":"pkcs11","library":%q,"slot":"bench","pin":"${BENCH_PIN}"}%s]}`, o.lib, vaultEntry)
	if err := os.WriteFile(filepath.Join(cfg, "kms.json"), []byte(kms), 0o600); err != nil {
		return nil, err
	}
	mk := make([]byte, 32)
	rand.Read(mk)
	env := append(os.Environ(), "SOFTHSM2_CONF="+softhsmConf, "BENCH_PIN=1234",
		"KMSGATE_MASTER_KEY="+base64.StdEncoding.EncodeToString(mk), "KMSGATE_LOG_LEVEL=warn")
	out, err := runCmd(env, o.kmsgate, "tenant", "create", "bench", "--data-dir", data)
	if err != nil {
		return nil, fmt.Errorf("tenant create: %v: %s", err, out)
	}
	var t struct{ APIKey string }
	if err := json.Unmarshal(out, &t); err != nil {
		return nil, fmt.Errorf("tenant create output %q: %w", out, err)
	}
	addr, err := freeAddr()
	if err != nil {
		return nil, err
	}
	s := &server{url: "http://" + addr, key: t.APIKey, data: data, done: make(chan struct{})}
	s.cmd = exec.CommandContext(ctx, o.kmsgate, "serve", "--listen", addr, "--data-dir", data, "--config-dir", cfg)
	s.cmd.Env = env
	s.cmd.Stderr = os.Stderr
	if err := s.cmd.Start(); err != nil {
		return nil, err
	}
	go func() { s.cmd.Wait(); close(s.done) }()
	deadline := time.Now().Add(30 * time.Second)
	for {
		resp, err := http.Get(s.url + "/healthz")
		if err == nil {
			resp.Body.Close()
			break
		}
		select {
		case <-s.done:
			return nil, errors.New("kmsgate exited during start-up")
		default:
		}
		if time.Now().After(deadline) {
			s.stop()
			return nil, errors.New("kmsgate did not come up")
		}
		time.Sleep(50 * time.Millisecond)
	}
	return s, nil
}

func runCmd(env []string, name string, args ...string) ([]byte, error) {
	c := exec.Command(name, args...)
	c.Env = env
	var stderr bytes.Buffer
	c.Stderr = &stderr
	out, err := c.Output()
	if err != nil {
		return append(out, stderr.Bytes()...), err
	}
	return out, nil
}

func (s *server) stop() {
	if s.cmd.Process != nil {
		s.cmd.Process.Signal(os.Interrupt)
		select {
		case <-s.done:
		case <-time.After(10 * time.Second):
			s.cmd.Process.Kill()
			<-s.done
		}
	}
}

func (s *server) do(method, path string, body any) (int, []byte, error) {
	b, _ := json.Marshal(body)
	req, _ := http.NewRequest(method, s.url+path, bytes.NewReader(b))
	req.Header.Set("Authorization", "Bearer "+s.key)
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	var out bytes.Buffer
	out.ReadFrom(resp.Body)
	return resp.StatusCode, out.Bytes(), nil
}

func (s *server) generate(kid, provider string) error {
	st, body, err := s.do("POST", "/keys", map[string]string{"kid": kid, "alg": "ES256", "kmsProvider": provider})
	if err != nil || st != 200 {
		return fmt.Errorf("generate %s on %s: %d %s %v", kid, provider, st, body, err)
	}
	return nil
}

// metrics sums every sample of each metric family (across labels).
func (s *server) metrics() (map[string]float64, error) {
	resp, err := http.Get(s.url + "/metrics")
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	m := map[string]float64{}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || line[0] == '#' {
			continue
		}
		name, rest, _ := strings.Cut(line, " ")
		if i := strings.IndexByte(name, '{'); i >= 0 {
			name = name[:i]
		}
		f := strings.Fields(rest)
		if len(f) == 0 {
			continue
		}
		v, err := strconv.ParseFloat(f[len(f)-1], 64)
		if err == nil {
			m[name] += v
		}
	}
	return m, sc.Err()
}

// peakRSS reads the server's VmHWM (peak resident set) from /proc.
func (s *server) peakRSS() int64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", s.cmd.Process.Pid))
	if err != nil {
		return 0
	}
	for _, l := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(l, "VmHWM:") {
			f := strings.Fields(l)
			kb, _ := strconv.ParseInt(f[1], 10, 64)
			return kb << 10
		}
	}
	return 0
}

// httpLoad drives POST path with keep-alive connections from conc workers.
func httpLoad(base, key, path, name string, conc int, d time.Duration) result {
	u := strings.TrimPrefix(base, "http://")
	hc := &fasthttp.HostClient{Addr: u, MaxConns: conc, ReadTimeout: 10 * time.Second, WriteTimeout: 10 * time.Second}
	body := []byte(`{"data":"` + base64.StdEncoding.EncodeToString([]byte("eyJhbGciOiJFUzI1NiJ9.eyJpc3MiOiJodHRwczovL2lzc3Vlci5leGFtcGxlIn0")) + `","alg":"ES256"}`)
	reqs := make([]*fasthttp.Request, conc)
	resps := make([]*fasthttp.Response, conc)
	for i := range reqs {
		reqs[i] = fasthttp.AcquireRequest()
		reqs[i].SetRequestURI(base + path)
		reqs[i].Header.SetMethod("POST")
		reqs[i].Header.SetContentType("application/json")
		reqs[i].Header.Set("Authorization", "Bearer "+key)
		reqs[i].SetBody(body)
		resps[i] = fasthttp.AcquireResponse()
	}
	return measure(name, conc, d, func(w int) error {
		if err := hc.Do(reqs[w], resps[w]); err != nil {
			return err
		}
		if resps[w].StatusCode() != 200 {
			return fmt.Errorf("status %d", resps[w].StatusCode())
		}
		return nil
	})
}

// ---------- Vault ---------------------------------------------------------------------------

type vaultServer struct {
	cmd   *exec.Cmd
	addr  string
	token string
}

func startVault(ctx context.Context, bin string) (*vaultServer, error) {
	if _, err := os.Stat(bin); err != nil {
		return nil, fmt.Errorf("vault binary %s missing (tools/vault/build.sh builds it): %w", bin, err)
	}
	addr, err := freeAddr()
	if err != nil {
		return nil, err
	}
	tok := make([]byte, 12)
	rand.Read(tok)
	v := &vaultServer{addr: "http://" + addr, token: "bench-" + base64.RawURLEncoding.EncodeToString(tok)}
	v.cmd = exec.CommandContext(ctx, bin, "server", "-dev", "-dev-root-token-id="+v.token, "-dev-listen-address="+addr)
	v.cmd.Env = append(os.Environ(), "VAULT_LOG_LEVEL=error", "HOME="+os.TempDir())
	if err := v.cmd.Start(); err != nil {
		return nil, err
	}
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		if resp, err := http.Get(v.addr + "/v1/sys/health"); err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				return v, nil
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
	v.stop()
	return nil, errors.New("vault dev server did not become healthy")
}

func (v *vaultServer) stop() {
	if v.cmd.Process != nil {
		v.cmd.Process.Signal(os.Interrupt)
		done := make(chan struct{})
		go func() { v.cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			v.cmd.Process.Kill()
		}
	}
}

func (v *vaultServer) call(method, path string, body any) (int, error) {
	b, _ := json.Marshal(body)
	req, _ := http.NewRequest(method, v.addr+path, bytes.NewReader(b))
	req.Header.Set("X-Vault-Token", v.token)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, err
	}
	resp.Body.Close()
	return resp.StatusCode, nil
}

// vaultBench signs through Vault's own HTTP API (same message, same concurrency) and through
// kmsgate's vault provider. It restarts nothing: the kmsgate server was started with a vault
// provider pointing at the same dev server.
func vaultBench(v *vaultServer, srv *server, d time.Duration) ([]result, error) {
	if st, err := v.call("POST", "/v1/sys/mounts/benchtransit", map[string]string{"type": "transit"}); err != nil || st >= 300 {
		return nil, fmt.Errorf("mount transit: %d %v", st, err)
	}
	if st, err := v.call("POST", "/v1/benchtransit/keys/direct", map[string]any{"type": "ecdsa-p256"}); err != nil || st >= 300 {
		return nil, fmt.Errorf("create transit key: %d %v", st, err)
	}
	if err := srv.generate("bench-vault", "vault"); err != nil {
		return nil, err
	}
	msg := base64.StdEncoding.EncodeToString([]byte("eyJhbGciOiJFUzI1NiJ9.eyJpc3MiOiJodHRwczovL2lzc3Vlci5leGFtcGxlIn0"))
	var rows []result
	for _, c := range []int{1, 2, 8, 32} {
		rows = append(rows, vaultDirect(v, msg, c, d))
		rows = append(rows, httpLoad(srv.url, srv.key, "/keys/bench-vault/sign", "kmsgate vault over HTTP", c, d))
	}
	return rows, nil
}

func vaultDirect(v *vaultServer, msg string, conc int, d time.Duration) result {
	u := strings.TrimPrefix(v.addr, "http://")
	hc := &fasthttp.HostClient{Addr: u, MaxConns: conc, ReadTimeout: 10 * time.Second}
	body := []byte(`{"input":"` + msg + `","marshaling_algorithm":"jws"}`)
	reqs := make([]*fasthttp.Request, conc)
	resps := make([]*fasthttp.Response, conc)
	for i := range reqs {
		reqs[i] = fasthttp.AcquireRequest()
		reqs[i].SetRequestURI(v.addr + "/v1/benchtransit/sign/direct/sha2-256")
		reqs[i].Header.SetMethod("POST")
		reqs[i].Header.Set("X-Vault-Token", v.token)
		reqs[i].SetBody(body)
		resps[i] = fasthttp.AcquireResponse()
	}
	return measure("vault transit direct", conc, d, func(w int) error {
		if err := hc.Do(reqs[w], resps[w]); err != nil {
			return err
		}
		if resps[w].StatusCode() != 200 {
			return fmt.Errorf("status %d", resps[w].StatusCode())
		}
		return nil
	})
}
