package hsm

/*
#cgo linux LDFLAGS: -ldl
#include <dlfcn.h>
#include <stdlib.h>

// probe dlopens path the way miekg/pkcs11 will and returns dlerror() text, or NULL on success.
static char *probe(const char *path) {
	void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
	if (h == NULL) {
		const char *e = dlerror();
		return e ? (char *)e : "dlopen failed without a message";
	}
	if (dlsym(h, "C_GetFunctionList") == NULL) {
		dlclose(h);
		return "the library does not export C_GetFunctionList (not a PKCS#11 module)";
	}
	dlclose(h);
	return NULL;
}
*/
import "C"

import (
	"debug/elf"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"sync/atomic"
	"unsafe"

	"github.com/miekg/pkcs11"
)

// LoadError explains why a PKCS#11 library could not be loaded, with the fix.
type LoadError struct {
	Path   string
	Reason string
	Fix    string
}

func (e *LoadError) Error() string {
	return fmt.Sprintf("cannot load PKCS#11 library %q: %s; fix: %s", e.Path, e.Reason, e.Fix)
}

var elfMachine = map[string]elf.Machine{
	"amd64": elf.EM_X86_64, "arm64": elf.EM_AARCH64, "386": elf.EM_386, "arm": elf.EM_ARM,
	"ppc64le": elf.EM_PPC64, "s390x": elf.EM_S390, "riscv64": elf.EM_RISCV,
}

// CheckLibrary does the checks miekg/pkcs11's New does not report: the file exists and is
// readable, it is an ELF shared object for this process's architecture, and dlopen accepts it
// (dlerror names missing dependencies).
func CheckLibrary(path string) error {
	if path == "" {
		return &LoadError{Path: path, Reason: "no library configured", Fix: `set "library" to the vendor's PKCS#11 module, e.g. /usr/lib/softhsm/libsofthsm2.so`}
	}
	st, err := os.Stat(path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return &LoadError{Path: path, Reason: "file does not exist", Fix: `correct "library" or install the vendor's PKCS#11 package (run "kmsgate hsm slots --library PATH" to test a path)`}
	case errors.Is(err, fs.ErrPermission):
		return &LoadError{Path: path, Reason: "permission denied", Fix: "let the kmsgate user read the file and its directory"}
	case err != nil:
		return &LoadError{Path: path, Reason: err.Error(), Fix: `check "library"`}
	case st.IsDir():
		return &LoadError{Path: path, Reason: "is a directory", Fix: `point "library" at the module's .so file`}
	}
	f, err := elf.Open(path)
	if err != nil {
		if errors.Is(err, fs.ErrPermission) {
			return &LoadError{Path: path, Reason: "permission denied", Fix: "let the kmsgate user read the file"}
		}
		return &LoadError{Path: path, Reason: "not an ELF shared library (" + err.Error() + ")", Fix: `point "library" at the vendor's PKCS#11 .so, not a config file or script`}
	}
	defer f.Close()
	wantClass := elf.ELFCLASS64
	if unsafe.Sizeof(uintptr(0)) == 4 {
		wantClass = elf.ELFCLASS32
	}
	if m, ok := elfMachine[runtime.GOARCH]; ok && (f.Machine != m || f.Class != wantClass) {
		return &LoadError{Path: path, Reason: fmt.Sprintf("wrong architecture: the library is %s %s but kmsgate runs on %s", f.Class, f.Machine, runtime.GOARCH),
			Fix: fmt.Sprintf("install the %s build of the vendor's PKCS#11 module", runtime.GOARCH)}
	}
	if f.Type != elf.ET_DYN {
		return &LoadError{Path: path, Reason: "ELF file is not a shared object (" + f.Type.String() + ")", Fix: `point "library" at the vendor's PKCS#11 .so`}
	}
	cpath := C.CString(path)
	defer C.free(unsafe.Pointer(cpath))
	if msg := C.probe(cpath); msg != nil {
		return &LoadError{Path: path, Reason: "dlopen: " + C.GoString(msg), Fix: "install the library's missing dependencies (ldd " + path + ") or use the vendor's build for this OS"}
	}
	return nil
}

// Module is one loaded and initialised PKCS#11 library, shared by every slot that uses it.
type Module struct {
	path string
	key  string // the registry key, fixed at load so Close removes exactly this entry
	ctx  *pkcs11.Ctx
	refs int // guarded by modules.mu

	// life is held for reading around every sequence of PKCS#11 calls and for writing while the
	// library is finalised and re-initialised, because calling into a library during C_Finalize
	// is undefined behaviour (SoftHSM2 crashes).
	life        sync.RWMutex
	initialized bool          // guarded by life
	gen         atomic.Uint64 // bumped by every re-initialisation: sessions and handles of older generations are gone
}

// modules mirrors the C side's process-wide state: a PKCS#11 library has one C_Initialize per
// process, so every slot (and provider) using the same path must share it, and only the last user
// may finalise it. This is the one piece of package-level mutable state, guarded by its mutex.
var modules = struct {
	mu sync.Mutex
	m  map[string]*Module
}{m: map[string]*Module{}}

func moduleKey(path string) string {
	if abs, err := filepath.Abs(path); err == nil {
		path = abs
	}
	if real, err := filepath.EvalSymlinks(path); err == nil {
		path = real
	}
	return path
}

// OpenModule loads and initialises the library at path, or returns the already loaded one with
// its reference count raised. Release it with Close.
func OpenModule(path string) (*Module, error) {
	if err := CheckLibrary(path); err != nil {
		return nil, err
	}
	key := moduleKey(path)
	modules.mu.Lock()
	defer modules.mu.Unlock()
	if m, ok := modules.m[key]; ok {
		m.refs++
		return m, nil
	}
	ctx := pkcs11.New(path)
	if ctx == nil {
		return nil, &LoadError{Path: path, Reason: "the library loaded but C_GetFunctionList failed", Fix: "check the vendor module's own configuration (e.g. its config file or environment variable)"}
	}
	m := &Module{path: path, key: key, ctx: ctx, refs: 1}
	if err := m.initialize(); err != nil {
		ctx.Destroy()
		return nil, err
	}
	modules.m[key] = m
	return m, nil
}

// initialize runs C_Initialize; the caller holds life for writing or owns m exclusively.
func (m *Module) initialize() error {
	err := m.ctx.Initialize()
	if rv, ok := rvOf(err); ok && rv == pkcs11.CKR_CRYPTOKI_ALREADY_INITIALIZED {
		err = nil // another component of this process initialised it; that state is ours too
	}
	if err != nil {
		return opErr("C_Initialize", err)
	}
	m.initialized = true
	return nil
}

// Path is the library path the module was opened with.
func (m *Module) Path() string { return m.path }

// Generation identifies the current C_Initialize of the library.
func (m *Module) Generation() uint64 { return m.gen.Load() }

// reinitialize runs C_Finalize and C_Initialize to flush the library's state after a device
// failure. seen is the generation the caller observed failing: if another slot already
// re-initialised since, nothing is done, so slots sharing the library do not finalise each
// other in a loop.
func (m *Module) reinitialize(seen uint64) error {
	m.life.Lock()
	defer m.life.Unlock()
	if m.gen.Load() != seen && m.initialized {
		return nil
	}
	if m.initialized {
		_ = m.ctx.Finalize() // the device is failing: an error here changes nothing
		m.initialized = false
	}
	m.gen.Add(1)
	return m.initialize()
}

// ensure re-runs C_Initialize if a previous reinitialize left the library finalised.
func (m *Module) ensure() error {
	m.life.RLock()
	ok := m.initialized
	m.life.RUnlock()
	if ok {
		return nil
	}
	m.life.Lock()
	defer m.life.Unlock()
	if m.initialized {
		return nil
	}
	return m.initialize()
}

// Close drops one reference; the last one finalises and unloads the library.
func (m *Module) Close() error {
	modules.mu.Lock()
	defer modules.mu.Unlock()
	m.refs--
	if m.refs > 0 {
		return nil
	}
	delete(modules.m, m.key)
	m.life.Lock()
	defer m.life.Unlock()
	var err error
	if m.initialized {
		err = opErr("C_Finalize", m.ctx.Finalize())
		m.initialized = false
	}
	m.ctx.Destroy()
	return err
}
