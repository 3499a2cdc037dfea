package main

// The store-backend rows: the same kmsgate binary on Badger and on PostgreSQL in one run, with the
// ratios PostgreSQL/Badger. The bench starts its own PostgreSQL cluster (initdb + pg_ctl on a Unix
// socket in a temporary directory, as the tests do in internal/testenv, which needs a testing.TB).

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"
)

const benchPGUser = "kmsgate-pg" // the tests' system user: PostgreSQL refuses to run as root

type pgCluster struct {
	bin, dir string
	cred     *syscall.Credential
}

func (p *pgCluster) cmd(prog string, args ...string) error {
	c := exec.Command(filepath.Join(p.bin, prog), args...)
	c.Env = append(os.Environ(), "LC_ALL=C")
	c.Dir = p.dir
	if p.cred != nil {
		c.SysProcAttr = &syscall.SysProcAttr{Credential: p.cred}
	}
	if out, err := c.CombinedOutput(); err != nil {
		return fmt.Errorf("%s: %w: %s", prog, err, out)
	}
	return nil
}

func startPostgres() (*pgCluster, error) {
	dirs, _ := filepath.Glob("/usr/lib/postgresql/*/bin/initdb")
	if len(dirs) == 0 {
		return nil, errors.New("PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin (apt-get install postgresql)")
	}
	sort.Slice(dirs, func(i, j int) bool { return majorOfInitdb(dirs[i]) > majorOfInitdb(dirs[j]) })
	dir, err := os.MkdirTemp("", "kmsgate-bench-pg-")
	if err != nil {
		return nil, err
	}
	p := &pgCluster{bin: filepath.Dir(dirs[0]), dir: dir}
	if os.Geteuid() == 0 {
		if _, err := user.Lookup(benchPGUser); err != nil {
			if out, err := exec.Command("useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent",
				"--shell", "/usr/sbin/nologin", benchPGUser).CombinedOutput(); err != nil {
				return nil, fmt.Errorf("useradd %s: %v %s", benchPGUser, err, out)
			}
		}
		u, err := user.Lookup(benchPGUser)
		if err != nil {
			return nil, err
		}
		uid, _ := strconv.Atoi(u.Uid)
		gid, _ := strconv.Atoi(u.Gid)
		p.cred = &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}
		if err := os.Chown(dir, uid, gid); err != nil {
			return nil, err
		}
	}
	data := filepath.Join(dir, "data")
	if err := p.cmd("initdb", "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C", "--no-sync"); err != nil {
		return nil, err
	}
	// Durable commits (fsync on), unlike the tests: the rows compare real write paths.
	opts := fmt.Sprintf("-p 5432 -k %s -c listen_addresses='' -c max_connections=200", dir)
	if err := p.cmd("pg_ctl", "start", "-w", "-t", "60", "-D", data, "-l", filepath.Join(dir, "server.log"), "-o", opts); err != nil {
		return nil, err
	}
	return p, nil
}

func majorOfInitdb(path string) int {
	n, _ := strconv.Atoi(filepath.Base(filepath.Dir(filepath.Dir(path))))
	return n
}

func (p *pgCluster) stop() {
	_ = p.cmd("pg_ctl", "stop", "-w", "-m", "immediate", "-D", filepath.Join(p.dir, "data"))
	_ = os.RemoveAll(p.dir)
}

func (p *pgCluster) dsn(db string) string {
	return fmt.Sprintf("postgres://postgres@/%s?host=%s&port=5432&sslmode=disable", db, url.QueryEscape(p.dir))
}

func (p *pgCluster) createDB(name string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, p.dsn("postgres"))
	if err != nil {
		return "", err
	}
	defer conn.Close(ctx)
	if _, err := conn.Exec(ctx, "CREATE DATABASE "+name); err != nil {
		return "", err
	}
	return p.dsn(name), nil
}

// storeServer is one kmsgate process on a given store ("" = Badger under data).
type storeServer struct {
	*server
	startup time.Duration
}

func storeEnv(masterKey string) []string {
	return append(os.Environ(), "KMSGATE_MASTER_KEY="+masterKey, "KMSGATE_LOG_LEVEL=warn",
		"KMSGATE_CREATE_RATE=-1", "KMSGATE_MAX_CHAINS_PER_TENANT=-1")
}

func createTenant(o opts, env []string, data, st string) (string, error) {
	args := []string{"tenant", "create", "bench", "--data-dir", data}
	if st != "" {
		args = append(args, "--store", st)
	}
	out, err := runCmd(env, o.kmsgate, args...)
	if err != nil {
		return "", fmt.Errorf("tenant create: %v: %s", err, out)
	}
	var t struct{ APIKey string }
	if err := json.Unmarshal(out, &t); err != nil {
		return "", fmt.Errorf("tenant create output %q: %w", out, err)
	}
	return t.APIKey, nil
}

func startStoreServer(o opts, env []string, data, st, apiKey string) (*storeServer, error) {
	addr, err := freeAddr()
	if err != nil {
		return nil, err
	}
	s := &server{url: "http://" + addr, key: apiKey, data: data, done: make(chan struct{})}
	args := []string{"serve", "--listen", addr, "--data-dir", data, "--config-dir", filepath.Join(data, "cfg")}
	if st != "" {
		args = append(args, "--store", st)
	}
	s.cmd = exec.Command(o.kmsgate, args...)
	s.cmd.Env = env
	s.cmd.Stderr = os.Stderr
	t0 := time.Now()
	if err := s.cmd.Start(); err != nil {
		return nil, err
	}
	go func() { s.cmd.Wait(); close(s.done) }()
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
		if time.Since(t0) > 2*time.Minute {
			s.stop()
			return nil, errors.New("kmsgate did not come up")
		}
		time.Sleep(5 * time.Millisecond)
	}
	return &storeServer{server: s, startup: time.Since(t0)}, nil
}

// rss reads the server's current resident set (VmRSS) from /proc.
func (s *server) rss() int64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", s.cmd.Process.Pid))
	if err != nil {
		return 0
	}
	for _, l := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(l, "VmRSS:") {
			kb, _ := strconv.ParseInt(strings.Fields(l)[1], 10, 64)
			return kb << 10
		}
	}
	return 0
}

var benchClient = &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 64}, Timeout: 30 * time.Second}

// createLoad runs creates (POST /keys or POST /key-chain) from conc workers for d.
func createLoad(s *server, chains bool, conc int, d time.Duration) result {
	var seq atomic.Int64
	return measure("", conc, d, func(int) error {
		path, body := "/keys", fmt.Sprintf(`{"kid":"gen-%d","alg":"ES256"}`, seq.Add(1))
		want := 200
		if chains {
			path, body, want = "/key-chain", `{"usageType":"access","type":"standalone"}`, 201
		}
		req, _ := http.NewRequest("POST", s.url+path, strings.NewReader(body))
		req.Header.Set("Authorization", "Bearer "+s.key)
		req.Header.Set("Content-Type", "application/json")
		resp, err := benchClient.Do(req)
		if err != nil {
			return err
		}
		resp.Body.Close()
		if resp.StatusCode != want {
			return fmt.Errorf("status %d", resp.StatusCode)
		}
		return nil
	})
}

// seedChains creates chains with 16 workers until the tenant holds n.
func seedChains(s *server, n int) (time.Duration, error) {
	t0 := time.Now()
	for {
		st, body, err := s.do("GET", "/key-chain", nil)
		if err != nil || st != 200 {
			return 0, fmt.Errorf("list chains: %d %v", st, err)
		}
		var list []json.RawMessage
		if err := json.Unmarshal(body, &list); err != nil {
			return 0, fmt.Errorf("list chains: %w", err)
		}
		left := n - len(list)
		if left <= 0 {
			return time.Since(t0), nil
		}
		var made atomic.Int64
		done := make(chan struct{})
		for w := 0; w < 16; w++ {
			go func() {
				defer func() { done <- struct{}{} }()
				for made.Add(1) <= int64(left) {
					st, _, err := s.do("POST", "/key-chain", map[string]string{"usageType": "access", "type": "standalone"})
					if err != nil || st != 201 {
						return
					}
				}
			}()
		}
		for w := 0; w < 16; w++ {
			<-done
		}
	}
}

type storeFigures struct {
	sign, queriesPerSign, keygen, chains float64
	startup                              time.Duration
	rss                                  int64
}

// storeRows measures both backends and prints the rows and the PostgreSQL/Badger ratios.
func storeRows(o opts) error {
	work, err := os.MkdirTemp("", "kmsgate-bench-store-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(work)
	if os.Geteuid() == 0 {
		_ = os.Chmod(work, 0o755)
	}
	fmt.Println()
	fmt.Println("# store backends: Badger vs PostgreSQL (db provider, same binary, same run)")
	pg, err := startPostgres()
	if err != nil {
		return err
	}
	defer pg.stop()
	mk := make([]byte, 32)
	rand.Read(mk)
	env := storeEnv(base64.StdEncoding.EncodeToString(mk))
	const nChains = 10000
	var fig [2]storeFigures // 0 Badger, 1 PostgreSQL
	names := [2]string{"Badger", "PostgreSQL"}
	var seedTook, copyTook time.Duration
	badgerData := filepath.Join(work, "badger")
	for b := 0; b < 2; b++ {
		data, st := badgerData, ""
		if b == 1 {
			data = filepath.Join(work, "pg-rates")
			if st, err = pg.createDB("bench_rates"); err != nil {
				return err
			}
		}
		key, err := createTenant(o, env, data, st)
		if err != nil {
			return err
		}
		s, err := startStoreServer(o, env, data, st, key)
		if err != nil {
			return err
		}
		if err := s.generate("bench-db", "db"); err != nil {
			s.stop()
			return err
		}
		f := &fig[b]
		httpLoad(s.url, s.key, "/keys/bench-db/sign", "", 8, o.duration/4) // warm-up
		m0, _ := s.metrics()
		var signs int64
		for r := 0; r < 2; r++ {
			res := httpLoad(s.url, s.key, "/keys/bench-db/sign", "", 8, o.duration)
			signs += res.n
			f.sign = max(f.sign, res.perSecond)
		}
		m1, _ := s.metrics()
		f.queriesPerSign = (m1["kmsgate_store_queries_total"] - m0["kmsgate_store_queries_total"]) / float64(max(signs, 1))
		f.keygen = createLoad(s.server, false, 8, o.duration).perSecond
		f.chains = createLoad(s.server, true, 8, o.duration).perSecond
		if b == 0 {
			if seedTook, err = seedChains(s.server, nChains); err != nil {
				s.stop()
				return err
			}
		}
		s.stop()
	}
	// PostgreSQL gets the same 10,000 chains by an offline `store copy` of the Badger store.
	pgSeeded, err := pg.createDB("bench_seeded")
	if err != nil {
		return err
	}
	t0 := time.Now()
	if out, err := runCmd(env, o.kmsgate, "store", "copy", "--from", badgerData, "--to", pgSeeded); err != nil {
		return fmt.Errorf("store copy: %v: %s", err, out)
	}
	copyTook = time.Since(t0)
	for b := 0; b < 2; b++ {
		data, st := badgerData, ""
		if b == 1 {
			data, st = filepath.Join(work, "pg-seeded"), pgSeeded
			if err := os.MkdirAll(data, 0o700); err != nil {
				return err
			}
		}
		best := time.Duration(0)
		for r := 0; r < 2; r++ {
			s, err := startStoreServer(o, env, data, st, "")
			if err != nil {
				return err
			}
			if best == 0 || s.startup < best {
				best = s.startup
			}
			time.Sleep(2 * time.Second) // the listener-connected cache rebuild settles (PostgreSQL)
			fig[b].rss = max(fig[b].rss, s.rss())
			s.stop()
		}
		fig[b].startup = best
	}

	fmt.Printf("seeded %d key chains on Badger over HTTP (16 clients) in %s; `store copy` to PostgreSQL in %s\n\n",
		nChains, seedTook.Round(time.Millisecond), copyTook.Round(time.Millisecond))
	fmt.Println("| row                                        |     Badger | PostgreSQL | PG/Badger |")
	fmt.Println("|--------------------------------------------|------------|------------|-----------|")
	row := func(name, unit string, a, b float64) {
		ratio := "-"
		if a > 0 {
			ratio = fmt.Sprintf("%.2f", b/a)
		}
		fmt.Printf("| %-42s | %10s | %10s | %9s |\n", name, fmt.Sprintf("%.0f%s", a, unit), fmt.Sprintf("%.0f%s", b, unit), ratio)
	}
	row("db sign over HTTP, 8 clients (signs/s)", "", fig[0].sign, fig[1].sign)
	fmt.Printf("| %-42s | %10.4f | %10.4f | %9s |\n", "store queries per signature (must be 0)", fig[0].queriesPerSign, fig[1].queriesPerSign, "-")
	row("POST /keys, 8 clients (keys/s)", "", fig[0].keygen, fig[1].keygen)
	row("POST /key-chain, 8 clients (chains/s)", "", fig[0].chains, fig[1].chains)
	row(fmt.Sprintf("start-up with %d chains (ms, best of 2)", nChains), "", float64(fig[0].startup.Milliseconds()), float64(fig[1].startup.Milliseconds()))
	row(fmt.Sprintf("RSS after start-up, %d chains (MiB)", nChains), "", float64(fig[0].rss)/(1<<20), float64(fig[1].rss)/(1<<20))
	for b := 0; b < 2; b++ {
		if fig[b].queriesPerSign != 0 {
			return fmt.Errorf("%s: %.4f store queries per signature, want 0", names[b], fig[b].queriesPerSign)
		}
	}
	return nil
}
