package appliance_test

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/kmsgate/kmsgate/appliance"
	"github.com/kmsgate/kmsgate/internal/apptest"
)

// openAppliance opens an appliance on fresh directories without serving it.
func openAppliance(t *testing.T, tweak func(*appliance.Options)) *appliance.Appliance {
	t.Helper()
	data := t.TempDir()
	o := appliance.Options{ConfigDir: t.TempDir(), DataDir: data, MasterKeyEnv: apptest.MasterKey,
		AdminSocket: filepath.Join(data, "admin.sock"), Version: "test", ShutdownGrace: 5 * time.Second,
		Logger: slog.New(slog.NewJSONHandler(io.Discard, nil))}
	if tweak != nil {
		tweak(&o)
	}
	a, err := appliance.Open(context.Background(), o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { a.Close() })
	return a
}

// TestServeReleasesPortWhenAdminSocketFails: a start that fails on the admin socket must not keep
// the TCP port it was handed (it used to return without closing it).
func TestServeReleasesPortWhenAdminSocketFails(t *testing.T) {
	a := openAppliance(t, func(o *appliance.Options) {
		o.AdminSocket = filepath.Join(t.TempDir(), "missing-dir", "admin.sock")
	})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	done := make(chan error, 1)
	go func() { done <- a.Serve(context.Background(), ln) }()
	select {
	case err := <-done:
		if err == nil || !strings.Contains(err.Error(), "admin socket") {
			t.Fatalf("Serve = %v, want an admin socket error", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Serve did not fail on an impossible admin socket path")
	}
	again, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatalf("port %s still bound after the failed start: %v", addr, err)
	}
	again.Close()
}

// TestAdminSocketIsPrivateFromCreation watches the data dir with inotify while the appliance
// starts: the socket must be created owner-only, never chmod-ed afterwards (a chmod after bind
// leaves a window in which any local user can connect and act as admin).
func TestAdminSocketIsPrivateFromCreation(t *testing.T) {
	data := t.TempDir()
	fd, err := unix.InotifyInit1(unix.IN_CLOEXEC | unix.IN_NONBLOCK)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	if _, err := unix.InotifyAddWatch(fd, data, unix.IN_CREATE|unix.IN_ATTRIB); err != nil {
		t.Fatal(err)
	}
	in := apptest.Start(t, apptest.Options{DataDir: data})
	if st, _ := in.Do("GET", "/healthz", "", nil); st != 200 {
		t.Fatalf("healthz = %d", st)
	}
	sock := filepath.Join(data, "admin.sock")
	fi, err := os.Stat(sock)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode()&os.ModeSocket == 0 || fi.Mode().Perm()&0o077 != 0 {
		t.Fatalf("admin socket mode %v: group or others have access", fi.Mode())
	}
	created, attrib := false, false
	buf := make([]byte, 64<<10)
	n, err := unix.Read(fd, buf)
	if err != nil {
		t.Fatalf("read inotify events: %v", err)
	}
	for off := 0; off+unix.SizeofInotifyEvent <= n; {
		ev := (*unix.InotifyEvent)(unsafe.Pointer(&buf[off]))
		name := string(bytes.TrimRight(buf[off+unix.SizeofInotifyEvent:off+unix.SizeofInotifyEvent+int(ev.Len)], "\x00"))
		off += unix.SizeofInotifyEvent + int(ev.Len)
		if name != "admin.sock" {
			continue
		}
		created = created || ev.Mask&unix.IN_CREATE != 0
		attrib = attrib || ev.Mask&unix.IN_ATTRIB != 0
	}
	if !created {
		t.Fatal("no IN_CREATE event for admin.sock")
	}
	if attrib {
		t.Fatal("admin.sock had its attributes changed after creation (chmod after bind)")
	}
}
