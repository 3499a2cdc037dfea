// Command kmsgate-bench measures signing throughput and latency, in one run, for:
//
//   - the limit: raw C_SignInit+C_Sign on SoftHSM2 (one pre-opened, logged-in session per worker,
//     cached handle) at concurrency 1, 2, 8;
//
//   - kmsgate over HTTP (keep-alive, POST /keys/{kid}/sign) with the pkcs11 provider at 1, 2, 8, 32;
//
//   - the db provider over HTTP against an in-process crypto/ecdsa loop with 2 goroutines;
//
//   - Vault Transit signing directly and through kmsgate's vault provider;
//
//   - the store backends: db signing, key and key-chain creation, start-up and RSS with 10,000
//     chains on Badger and on PostgreSQL (bench/store.go);
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

	"github.com/gofiber/fiber/v2"
	"github.com/miekg/pkcs11"
	"github.com/valyala/fasthttp"
)

// benchMessage is what every step signs: a JWS signing input of typical size.
const benchMessage = "eyJhbGciOiJFUzI1NiIsInR5cCI6ImRjK3NkLWp3dCJ9.eyJpc3MiOiJodHRwczovL2lzc3Vlci5leGFtcGxlIiwidmN0IjoidXJuOmV1LmV1cm9wYS5lYy5ldWRpOnBpZDoxIn0"

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
	rounds   int
	stores   bool
}

func main() {
	var o opts
	home, _ := os.UserHomeDir()
	flag.StringVar(&o.kmsgate, "kmsgate", "bin/kmsgate", "kmsgate binary")
	flag.StringVar(&o.lib, "library", "/usr/lib/softhsm/libsofthsm2.so", "SoftHSM2 PKCS#11 library")
	flag.StringVar(&o.vault, "vault", envOr("KMSGATE_VAULT_BIN", filepath.Join(home, ".cache/kmsgate-tools/vault")), "vault binary")
	flag.DurationVar(&o.duration, "duration", 2*time.Second, "measurement time per step and round")
	flag.IntVar(&o.extra, "extra-keys", 100, "extra EC key pairs on the token (2 objects each)")
	flag.BoolVar(&o.skipVlt, "no-vault", false, "skip the Vault comparison")
	flag.IntVar(&o.rounds, "rounds", 3, "interleaved rounds; the best round of each step is reported")
	flag.BoolVar(&o.stores, "stores", true, "also measure the store backends (Badger vs PostgreSQL)")
	onlyStores := flag.Bool("only-stores", false, "measure only the store backends")
	minimal := flag.String("serve-minimal", "", "internal: serve the minimal reference server (db or pkcs11) on -addr")
	addr := flag.String("addr", "", "internal: address for -serve-minimal")
	flag.Parse()
	if *minimal != "" {
		if err := serveMinimal(*minimal, *addr, o.lib); err != nil {
			fmt.Fprintln(os.Stderr, "bench minimal server:", err)
			os.Exit(1)
		}
		return
	}
	if !*onlyStores {
		if err := run(o); err != nil {
			fmt.Fprintln(os.Stderr, "bench:", err)
			os.Exit(1)
		}
	}
	if o.stores || *onlyStores {
		if err := storeRows(o); err != nil {
			fmt.Fprintln(os.Stderr, "bench:", err)
			os.Exit(1)
		}
	}
}

func envOr(k, d string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return d
}

// bcase is one configuration measured at several concurrencies.
type bcase struct {
	name  string
	concs []int
	run   func(conc int, d time.Duration) (result, error)
}

func run(o opts) error {
	work, err := os.MkdirTemp("", "kmsgate-bench-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(work)
	ctx := context.Background()

	fmt.Println("# kmsgate signing benchmark")
	fmt.Printf("machine: %d CPUs, %s; %d interleaved rounds of %s per step, best round reported\n\n",
		numCPU(), goVersion(), o.rounds, o.duration)

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
	defer p.Finalize()
	slot, err := firstSlot(p)
	if err != nil {
		return err
	}
	fmt.Printf("SoftHSM2 token: %d extra EC key pairs (%d objects), so a per-sign C_FindObjects would show\n",
		o.extra, 2*o.extra)
	if err := extraKeys(p, slot, "1234", o.extra); err != nil {
		return err
	}
	raw, err := newRawPKCS11(p, slot, "1234", 8)
	if err != nil {
		return err
	}

	// --- Vault dev server (started first so kmsgate's vault provider can point at it) -------
	var vs *vaultServer
	var vaultEntry string
	if !o.skipVlt {
		if vs, err = startVault(ctx, o.vault); err != nil {
			return err
		}
		defer vs.stop()
		vaultEntry = fmt.Sprintf(`,{"id":"vault","type":"vault","vaultUrl":%q,"vaultToken":"${BENCH_VAULT_TOKEN}"}`, vs.addr)
		os.Setenv("BENCH_VAULT_TOKEN", vs.token)
	}

	// --- kmsgate and the minimal reference servers --------------------------------------------
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
	minHSM, err := startMinimal(conf, "pkcs11")
	if err != nil {
		return err
	}
	defer minHSM.stop()
	minDB, err := startMinimal(conf, "db")
	if err != nil {
		return err
	}
	defer minDB.stop()
	var vaultMsg string
	if vs != nil {
		if vaultMsg, err = prepareVault(vs, srv); err != nil {
			return err
		}
	}

	all := []int{1, 2, 8, 32}
	cases := []bcase{
		{"raw C_Sign on SoftHSM2 (limit)", []int{1, 2, 8}, raw.run},
		{"in-process crypto/ecdsa (db limit)", []int{2}, func(c int, d time.Duration) (result, error) { return ecdsaLoop(c, d), nil }},
		{"minimal Fiber+pooled session (ref)", all, httpCase(minHSM.url, "", "/x")},
		{"kmsgate pkcs11 over HTTP", all, httpCase(srv.url, srv.key, "/keys/bench-hsm/sign")},
		{"minimal Fiber+crypto/ecdsa (ref)", all, httpCase(minDB.url, "", "/x")},
		{"kmsgate db over HTTP", all, httpCase(srv.url, srv.key, "/keys/bench-db/sign")},
	}
	if vs != nil {
		cases = append(cases,
			bcase{"vault transit direct", all, func(c int, d time.Duration) (result, error) { return vaultDirect(vs, vaultMsg, c, d), nil }},
			bcase{"kmsgate vault over HTTP", all, httpCase(srv.url, srv.key, "/keys/bench-vault/sign")})
	}

	type key struct {
		name string
		conc int
	}
	best := map[key]result{}
	var hsmSigns int64
	before, _ := srv.metrics()
	for r := 0; r < o.rounds; r++ {
		fmt.Printf("round %d/%d…\n", r+1, o.rounds)
		for _, c := range cases {
			for _, conc := range c.concs {
				res, err := c.run(conc, o.duration)
				if err != nil {
					return fmt.Errorf("%s at %d: %w", c.name, conc, err)
				}
				res.name, res.conc = c.name, conc
				if c.name == "kmsgate pkcs11 over HTTP" {
					hsmSigns += res.n
				}
				k := key{c.name, conc}
				if b, ok := best[k]; !ok || res.perSecond > b.perSecond {
					best[k] = res
				}
			}
		}
	}
	after, _ := srv.metrics()
	peakRSS := srv.peakRSS()

	var rows []result
	bestOf := func(name string) float64 {
		m := 0.0
		for k, r := range best {
			if k.name == name {
				m = max(m, r.perSecond)
			}
		}
		return m
	}
	for _, c := range cases {
		for _, conc := range c.concs {
			rows = append(rows, best[key{c.name, conc}])
		}
	}
	fmt.Println()
	fmt.Println("| step                               | conc |  signs/s  |   p50    |   p99    | errors |")
	fmt.Println("|------------------------------------|------|-----------|----------|----------|--------|")
	for _, r := range rows {
		fmt.Println(r)
	}
	rawBest, ecdsaBest := bestOf("raw C_Sign on SoftHSM2 (limit)"), bestOf("in-process crypto/ecdsa (db limit)")
	hsm, db := bestOf("kmsgate pkcs11 over HTTP"), bestOf("kmsgate db over HTTP")
	fmt.Println()
	fmt.Println("| ratio (best of each)                               | value | target |")
	fmt.Println("|----------------------------------------------------|-------|--------|")
	fmt.Printf("| kmsgate pkcs11 over HTTP / raw C_Sign loop         | %5.1f%% | ≥ 75%% |\n", 100*hsm/rawBest)
	fmt.Printf("| minimal Fiber+session / raw C_Sign loop (ref)      | %5.1f%% |   -    |\n", 100*bestOf("minimal Fiber+pooled session (ref)")/rawBest)
	fmt.Printf("| kmsgate pkcs11 / minimal Fiber+session             | %5.1f%% |   -    |\n", 100*hsm/bestOf("minimal Fiber+pooled session (ref)"))
	fmt.Printf("| kmsgate db over HTTP / in-process ecdsa (2)        | %5.1f%% | ≥ 50%% |\n", 100*db/ecdsaBest)
	fmt.Printf("| minimal Fiber+ecdsa / in-process ecdsa (ref)       | %5.1f%% |   -    |\n", 100*bestOf("minimal Fiber+crypto/ecdsa (ref)")/ecdsaBest)
	fmt.Printf("| kmsgate db / minimal Fiber+ecdsa                   | %5.1f%% |   -    |\n", 100*db/bestOf("minimal Fiber+crypto/ecdsa (ref)"))
	fmt.Printf("| p99 at concurrency 1, kmsgate pkcs11 / db          | %s / %s | ≤ 1.5ms |\n",
		fmtDur(best[key{"kmsgate pkcs11 over HTTP", 1}].p99), fmtDur(best[key{"kmsgate db over HTTP", 1}].p99))
	if vs != nil {
		printVaultRatios(rows)
	}
	fmt.Println()
	fmt.Printf("PKCS#11 calls during the %d kmsgate pkcs11 signatures (from kmsgate's /metrics):\n", hsmSigns)
	for _, m := range []string{"kmsgate_pkcs11_sessions_opened_total", "kmsgate_pkcs11_logins_total", "kmsgate_pkcs11_object_searches_total"} {
		d := after[m] - before[m]
		fmt.Printf("  %-40s +%.0f  (%.4f per signature)\n", m, d, d/float64(max(hsmSigns, 1)))
	}
	fmt.Printf("\nkmsgate server peak RSS (VmHWM): %.1f MiB\n", float64(peakRSS)/(1<<20))
	return nil
}

func httpCase(url, key, path string) func(int, time.Duration) (result, error) {
	return func(c int, d time.Duration) (result, error) { return httpLoad(url, key, path, "", c, d), nil }
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

// rawLoop is the limit kmsgate is measured against: pre-opened logged-in sessions (one per
// worker), the key handle found once, nothing but C_SignInit + C_Sign in the loop.
type rawLoop struct {
	p        *pkcs11.Ctx
	key      pkcs11.ObjectHandle
	sessions []pkcs11.SessionHandle
}

func newRawPKCS11(p *pkcs11.Ctx, slot uint, pin string, maxConc int) (*rawLoop, error) {
	r := &rawLoop{p: p}
	for i := 0; i < maxConc; i++ {
		s, err := p.OpenSession(slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
		if err != nil {
			return nil, err
		}
		r.sessions = append(r.sessions, s)
	}
	if err := p.Login(r.sessions[0], pkcs11.CKU_USER, pin); err != nil && !errors.Is(err, pkcs11.Error(pkcs11.CKR_USER_ALREADY_LOGGED_IN)) {
		return nil, err
	}
	var err error
	r.key, err = genKey(p, r.sessions[0], "raw-limit")
	return r, err
}

func (r *rawLoop) run(conc int, d time.Duration) (result, error) {
	digest := sha256.Sum256([]byte("benchmark message"))
	mech := []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_ECDSA, nil)}
	return measure("", conc, d, func(w int) error {
		if err := r.p.SignInit(r.sessions[w], mech, r.key); err != nil {
			return err
		}
		_, err := r.p.Sign(r.sessions[w], digest[:])
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
	body := []byte(`{"data":"` + base64.StdEncoding.EncodeToString([]byte(benchMessage)) + `","alg":"ES256"}`)
	reqs := make([]*fasthttp.Request, conc)
	resps := make([]*fasthttp.Response, conc)
	for i := range reqs {
		reqs[i] = fasthttp.AcquireRequest()
		reqs[i].SetRequestURI(base + path)
		reqs[i].Header.SetMethod("POST")
		reqs[i].Header.SetContentType("application/json")
		if key != "" {
			reqs[i].Header.Set("Authorization", "Bearer "+key)
		}
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

// prepareVault creates the transit key Vault is measured with directly and the key kmsgate's vault
// provider signs with; it returns the base64 message both sign.
func prepareVault(v *vaultServer, srv *server) (string, error) {
	if st, err := v.call("POST", "/v1/sys/mounts/benchtransit", map[string]string{"type": "transit"}); err != nil || st >= 300 {
		return "", fmt.Errorf("mount transit: %d %v", st, err)
	}
	if st, err := v.call("POST", "/v1/benchtransit/keys/direct", map[string]any{"type": "ecdsa-p256"}); err != nil || st >= 300 {
		return "", fmt.Errorf("create transit key: %d %v", st, err)
	}
	if err := srv.generate("bench-vault", "vault"); err != nil {
		return "", err
	}
	return base64.StdEncoding.EncodeToString([]byte(benchMessage)), nil
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

// ---------- minimal reference servers ------------------------------------------------------

// minimal is a reference server in its own process: the least a Fiber server can do around the
// same signer, so the report shows which part of the gap to the in-process limit is the machine
// (HTTP on shared cores) and which part is kmsgate.
type minimal struct {
	cmd *exec.Cmd
	url string
}

func startMinimal(softhsmConf, kind string) (*minimal, error) {
	addr, err := freeAddr()
	if err != nil {
		return nil, err
	}
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	m := &minimal{url: "http://" + addr}
	m.cmd = exec.Command(self, "-serve-minimal", kind, "-addr", addr)
	m.cmd.Env = append(os.Environ(), "SOFTHSM2_CONF="+softhsmConf)
	m.cmd.Stderr = os.Stderr
	if err := m.cmd.Start(); err != nil {
		return nil, err
	}
	for i := 0; i < 200; i++ {
		if c, err := net.Dial("tcp", addr); err == nil {
			c.Close()
			return m, nil
		}
		time.Sleep(50 * time.Millisecond)
	}
	m.stop()
	return nil, fmt.Errorf("minimal %s server did not start", kind)
}

func (m *minimal) stop() {
	if m.cmd.Process != nil {
		m.cmd.Process.Kill()
		m.cmd.Wait()
	}
}

func serveMinimal(kind, addr, lib string) error {
	var sign func(d []byte) error
	switch kind {
	case "db":
		k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return err
		}
		sign = func(d []byte) error { _, err := ecdsa.SignASN1(rand.Reader, k, d); return err }
	case "pkcs11":
		p := pkcs11.New(lib)
		if p == nil {
			return fmt.Errorf("cannot load %s", lib)
		}
		if err := p.Initialize(); err != nil {
			return err
		}
		slot, err := firstSlot(p)
		if err != nil {
			return err
		}
		r, err := newRawPKCS11(p, slot, "1234", 4)
		if err != nil {
			return err
		}
		pool := make(chan pkcs11.SessionHandle, len(r.sessions))
		for _, s := range r.sessions {
			pool <- s
		}
		mech := []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_ECDSA, nil)}
		sign = func(d []byte) error {
			s := <-pool
			defer func() { pool <- s }()
			if err := p.SignInit(s, mech, r.key); err != nil {
				return err
			}
			_, err := p.Sign(s, d)
			return err
		}
	default:
		return fmt.Errorf("unknown minimal server %q", kind)
	}
	app := fiber.New(fiber.Config{DisableStartupMessage: true})
	app.Post("/x", func(c *fiber.Ctx) error {
		var req struct{ Data string }
		if err := json.Unmarshal(c.Body(), &req); err != nil {
			return err
		}
		msg, err := base64.StdEncoding.DecodeString(req.Data)
		if err != nil {
			return err
		}
		d := sha256.Sum256(msg)
		if err := sign(d[:]); err != nil {
			return err
		}
		return c.Send([]byte(`{"signature":"AAAA"}`))
	})
	return app.Listen(addr)
}
