// Package testenv builds real, isolated PKCS#11 environments for tests: SoftHSM2 tokens in a
// private directory and, for the recovery tests only, a fault-injecting shim around SoftHSM2.
//
// SoftHSM2 built against OpenSSL 3 can crash at process exit, in C atexit handlers and static
// destructors after C_Finalize (seen with Debian bookworm's softhsm2 2.6). A Go test binary cannot hit that: Go leaves
// through the exit_group system call without running libc atexit handlers or shared-library
// destructors (checked with a probe library whose destructor never ran). No TestMain or
// crash-tolerant wrapper is therefore needed, and none is used, so a crash *during* a test —
// including the C_Finalize each test's Close performs — still fails the run loudly.
package testenv

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// SoftHSMLibrary is where Debian's softhsm2 package installs the module.
const SoftHSMLibrary = "/usr/lib/softhsm/libsofthsm2.so"

const installHint = "SoftHSM2 is required for the PKCS#11 tests: install it with `apt-get install -y softhsm2 opensc` (Debian/Ubuntu)"

// Token is one initialised SoftHSM2 token.
type Token struct {
	Label string
	PIN   string
	SOPIN string
}

// SoftHSM is an isolated SoftHSM2 installation: its own config file and token directory.
type SoftHSM struct {
	Library  string
	Conf     string
	TokenDir string
	Tokens   []Token
}

// NewSoftHSM creates n tokens labelled "kmsgate-test-<i>" in a fresh token directory and points
// SOFTHSM2_CONF at it for the rest of the test (t.Setenv, so the test must not be parallel).
// A missing SoftHSM2 fails the test (skipped only under -short, see NeedsBackend): skipping would
// turn a broken CI image into a green run.
func NewSoftHSM(t testing.TB, n int) *SoftHSM {
	t.Helper()
	NeedsBackend(t, "softhsm2")
	util, err := exec.LookPath("softhsm2-util")
	if err != nil {
		t.Fatalf("softhsm2-util not on PATH. %s", installHint)
	}
	dir := t.TempDir()
	tokDir := filepath.Join(dir, "tokens")
	if err := os.MkdirAll(tokDir, 0o700); err != nil {
		t.Fatal(err)
	}
	conf := filepath.Join(dir, "softhsm2.conf")
	body := fmt.Sprintf("directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n", tokDir)
	if err := os.WriteFile(conf, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv("SOFTHSM2_CONF", conf)
	s := &SoftHSM{Library: SoftHSMLibrary, Conf: conf, TokenDir: tokDir}
	for i := 0; i < n; i++ {
		tok := Token{Label: fmt.Sprintf("kmsgate-test-%d", i), PIN: fmt.Sprintf("12345%d", i), SOPIN: "so-" + fmt.Sprint(i) + "-pin"}
		cmd := exec.Command(util, "--init-token", "--free", "--label", tok.Label, "--pin", tok.PIN, "--so-pin", tok.SOPIN)
		cmd.Env = append(os.Environ(), "SOFTHSM2_CONF="+conf)
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("softhsm2-util --init-token %s: %v\n%s", tok.Label, err, out)
		}
		s.Tokens = append(s.Tokens, tok)
	}
	return s
}

// FaultShim is a PKCS#11 module that forwards to a real module and fails on demand.
type FaultShim struct {
	Library  string // path of the shim .so, to use as the provider's library
	FlagFile string // while this file exists every call answers CKR_DEVICE_ERROR
}

// Fail makes the "HSM" fail: every call returns CKR_DEVICE_ERROR, and once it is back every
// session opened before the failure answers CKR_SESSION_HANDLE_INVALID — what an HSM reboot or a
// network HSM failover does. (The login state of SoftHSM2 itself survives, so a new session is
// already logged in and C_Login answers CKR_USER_ALREADY_LOGGED_IN, which kmsgate accepts.)
func (f *FaultShim) Fail(t testing.TB) {
	t.Helper()
	if err := os.WriteFile(f.FlagFile, []byte("down"), 0o600); err != nil {
		t.Fatal(err)
	}
}

// Recover brings the "HSM" back.
func (f *FaultShim) Recover(t testing.TB) {
	t.Helper()
	if err := os.Remove(f.FlagFile); err != nil && !errors.Is(err, os.ErrNotExist) {
		t.Fatal(err)
	}
}

// BuildFaultShim compiles the shim with gcc. The fake exists only because real SoftHSM2 cannot
// produce a device failure on demand: moving its token directory away (tried first) makes it
// answer CKR_OBJECT_HANDLE_INVALID and then report the keys as absent, sessions stay valid, and
// the objects do not come back when the directory returns — a lost-objects fault, not an HSM
// outage and recovery. Everything except the injected failure is SoftHSM2.
// The shim reads KMSGATE_FAULT_FLAG and KMSGATE_FAULT_REAL when the module is loaded, which this
// function sets for the test.
func BuildFaultShim(t testing.TB, realLib string) *FaultShim {
	t.Helper()
	NeedsBackend(t, "gcc")
	gcc, err := exec.LookPath("gcc")
	if err != nil {
		t.Fatalf("gcc is required to build the fault-injection shim: apt-get install -y gcc")
	}
	out, err := exec.Command("go", "list", "-m", "-f", "{{.Dir}}", "github.com/miekg/pkcs11").Output()
	if err != nil {
		t.Fatalf("locate github.com/miekg/pkcs11 headers: %v", err)
	}
	inc := strings.TrimSpace(string(out))
	dir := t.TempDir()
	src := filepath.Join(dir, "faultshim.c")
	if err := os.WriteFile(src, []byte(shimSource), 0o600); err != nil {
		t.Fatal(err)
	}
	lib := filepath.Join(dir, "libfaultshim.so")
	cmd := exec.Command(gcc, "-shared", "-fPIC", "-O1", "-I", inc, "-o", lib, src, "-ldl")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build fault shim: %v\n%s", err, b)
	}
	flag := filepath.Join(dir, "fault.flag")
	t.Setenv("KMSGATE_FAULT_FLAG", flag)
	t.Setenv("KMSGATE_FAULT_REAL", realLib)
	return &FaultShim{Library: lib, FlagFile: flag}
}

const shimSource = `
#include <dlfcn.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <pthread.h>
#include "pkcs11go.h"

static CK_FUNCTION_LIST_PTR real;
static CK_FUNCTION_LIST shim;
static char flag[4096];
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;

/* Sessions opened through the shim and the outage epoch they belong to. An outage bumps the
   epoch; afterwards every older session answers CKR_SESSION_HANDLE_INVALID, as after an HSM
   reboot. The real sessions are not closed here: closing them under another thread's C_Sign
   would crash SoftHSM2, which is not the fault being simulated. */
#define MAXS 4096
static CK_SESSION_HANDLE sess[MAXS];
static unsigned long sess_epoch[MAXS];
static int nsess;
static unsigned long epoch;
static int was_down;

static int down(void) {
	struct stat st;
	int d = stat(flag, &st) == 0;
	pthread_mutex_lock(&mu);
	if (d && !was_down) epoch++;
	was_down = d;
	pthread_mutex_unlock(&mu);
	return d;
}

static int stale(CK_SESSION_HANDLE h) {
	int r = 0;
	pthread_mutex_lock(&mu);
	for (int i = 0; i < nsess; i++) {
		if (sess[i] == h) { r = sess_epoch[i] != epoch; break; }
	}
	pthread_mutex_unlock(&mu);
	return r;
}

static void track(CK_SESSION_HANDLE h) {
	pthread_mutex_lock(&mu);
	int i;
	for (i = 0; i < nsess && sess[i] != h; i++) {}
	if (i == nsess) {
		if (nsess == MAXS) i = 0; else nsess++;
	}
	sess[i] = h;
	sess_epoch[i] = epoch;
	pthread_mutex_unlock(&mu);
}

static void untrack(CK_SESSION_HANDLE h, int all) {
	pthread_mutex_lock(&mu);
	for (int i = 0; i < nsess; i++) {
		if (all || sess[i] == h) { sess[i] = sess[nsess - 1]; sess_epoch[i] = sess_epoch[nsess - 1]; nsess--; i--; if (!all) break; }
	}
	pthread_mutex_unlock(&mu);
}

#define GUARD if (down()) return CKR_DEVICE_ERROR
#define GUARD_S(h) GUARD; if (stale(h)) return CKR_SESSION_HANDLE_INVALID

static CK_RV s_Initialize(CK_VOID_PTR a) { GUARD; return real->C_Initialize(a); }
static CK_RV s_Finalize(CK_VOID_PTR a) { untrack(0, 1); return real->C_Finalize(a); }
static CK_RV s_GetSlotList(CK_BBOOL p, CK_SLOT_ID_PTR l, CK_ULONG_PTR n) { GUARD; return real->C_GetSlotList(p, l, n); }
static CK_RV s_GetTokenInfo(CK_SLOT_ID s, CK_TOKEN_INFO_PTR i) { GUARD; return real->C_GetTokenInfo(s, i); }
static CK_RV s_OpenSession(CK_SLOT_ID s, CK_FLAGS f, CK_VOID_PTR a, CK_NOTIFY n, CK_SESSION_HANDLE_PTR h) {
	GUARD;
	CK_RV rv = real->C_OpenSession(s, f, a, n, h);
	if (rv == CKR_OK) track(*h);
	return rv;
}
static CK_RV s_CloseSession(CK_SESSION_HANDLE h) { untrack(h, 0); return real->C_CloseSession(h); }
static CK_RV s_GetSessionInfo(CK_SESSION_HANDLE h, CK_SESSION_INFO_PTR i) { GUARD_S(h); return real->C_GetSessionInfo(h, i); }
static CK_RV s_Login(CK_SESSION_HANDLE h, CK_USER_TYPE u, CK_UTF8CHAR_PTR p, CK_ULONG l) { GUARD_S(h); return real->C_Login(h, u, p, l); }
static CK_RV s_FindObjectsInit(CK_SESSION_HANDLE h, CK_ATTRIBUTE_PTR t, CK_ULONG n) { GUARD_S(h); return real->C_FindObjectsInit(h, t, n); }
static CK_RV s_FindObjects(CK_SESSION_HANDLE h, CK_OBJECT_HANDLE_PTR o, CK_ULONG m, CK_ULONG_PTR n) { GUARD_S(h); return real->C_FindObjects(h, o, m, n); }
static CK_RV s_SignInit(CK_SESSION_HANDLE h, CK_MECHANISM_PTR m, CK_OBJECT_HANDLE k) { GUARD_S(h); return real->C_SignInit(h, m, k); }
static CK_RV s_Sign(CK_SESSION_HANDLE h, CK_BYTE_PTR d, CK_ULONG dl, CK_BYTE_PTR s, CK_ULONG_PTR sl) { GUARD_S(h); return real->C_Sign(h, d, dl, s, sl); }
static CK_RV s_GenerateKeyPair(CK_SESSION_HANDLE h, CK_MECHANISM_PTR m, CK_ATTRIBUTE_PTR pt, CK_ULONG pn, CK_ATTRIBUTE_PTR vt, CK_ULONG vn, CK_OBJECT_HANDLE_PTR pk, CK_OBJECT_HANDLE_PTR vk) { GUARD_S(h); return real->C_GenerateKeyPair(h, m, pt, pn, vt, vn, pk, vk); }
static CK_RV s_GetAttributeValue(CK_SESSION_HANDLE h, CK_OBJECT_HANDLE o, CK_ATTRIBUTE_PTR t, CK_ULONG n) { GUARD_S(h); return real->C_GetAttributeValue(h, o, t, n); }
static CK_RV s_DestroyObject(CK_SESSION_HANDLE h, CK_OBJECT_HANDLE o) { GUARD_S(h); return real->C_DestroyObject(h, o); }

CK_RV C_GetFunctionList(CK_FUNCTION_LIST_PTR_PTR out) {
	if (real == NULL) {
		const char *f = getenv("KMSGATE_FAULT_FLAG");
		const char *r = getenv("KMSGATE_FAULT_REAL");
		if (f == NULL || r == NULL) return CKR_GENERAL_ERROR;
		strncpy(flag, f, sizeof(flag) - 1);
		void *h = dlopen(r, RTLD_NOW | RTLD_LOCAL);
		if (h == NULL) return CKR_GENERAL_ERROR;
		CK_RV (*gfl)(CK_FUNCTION_LIST_PTR_PTR) = (CK_RV (*)(CK_FUNCTION_LIST_PTR_PTR))dlsym(h, "C_GetFunctionList");
		if (gfl == NULL || gfl(&real) != CKR_OK) return CKR_GENERAL_ERROR;
		shim = *real;
		shim.C_Initialize = s_Initialize;
		shim.C_Finalize = s_Finalize;
		shim.C_GetSlotList = s_GetSlotList;
		shim.C_GetTokenInfo = s_GetTokenInfo;
		shim.C_OpenSession = s_OpenSession;
		shim.C_CloseSession = s_CloseSession;
		shim.C_GetSessionInfo = s_GetSessionInfo;
		shim.C_Login = s_Login;
		shim.C_FindObjectsInit = s_FindObjectsInit;
		shim.C_FindObjects = s_FindObjects;
		shim.C_SignInit = s_SignInit;
		shim.C_Sign = s_Sign;
		shim.C_GenerateKeyPair = s_GenerateKeyPair;
		shim.C_GetAttributeValue = s_GetAttributeValue;
		shim.C_DestroyObject = s_DestroyObject;
	}
	*out = &shim;
	return CKR_OK;
}
`
