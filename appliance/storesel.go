package appliance

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/kmsgate/kmsgate/appliance/store"
)

// StorePasswordCredential is the systemd credential (LoadCredential=store-password:…) holding the
// PostgreSQL password when no password file is given.
const StorePasswordCredential = "store-password"

// StoreOptions select and open the record store.
type StoreOptions struct {
	// URL is a postgres:// or postgresql:// URL; empty means Badger under DataDir.
	URL string
	// PasswordFile holds the PostgreSQL password; without it the systemd credential in CredsDir
	// is used when present, else any password in the URL.
	PasswordFile string
	CredsDir     string
	DataDir      string
	ReadOnly     bool // Badger only: open without writing (store copy's source)
	Logger       *slog.Logger
}

// Location describes the store for logs and messages: the Badger directory or the PostgreSQL URL
// with its password removed.
func (o StoreOptions) Location() string {
	if o.URL != "" {
		return store.RedactURL(o.URL)
	}
	return DBDir(o.DataDir)
}

// Backend names the engine o selects.
func (o StoreOptions) Backend() string {
	if o.URL != "" {
		return "postgres"
	}
	return "badger"
}

// OpenStore opens the store o selects. A PostgreSQL store that cannot be reached is an error, so
// a replica never starts without its state.
func OpenStore(ctx context.Context, o StoreOptions) (*store.Store, error) {
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	start := time.Now()
	var (
		st  *store.Store
		err error
	)
	switch {
	case o.URL == "":
		st, err = store.Open(DBDir(o.DataDir), store.Options{Logger: o.Logger, ReadOnly: o.ReadOnly})
	case !store.IsPostgresURL(o.URL):
		// Not echoed: a malformed value may well be a password pasted in the wrong place.
		return nil, errors.New("--store / KMSGATE_STORE must be a postgres:// or postgresql:// URL " +
			"(leave it unset for the embedded store under --data-dir)")
	default:
		var pw string
		if pw, err = storePassword(o.PasswordFile, o.CredsDir); err != nil {
			return nil, err
		}
		st, err = store.OpenPostgres(ctx, o.URL, store.PostgresOptions{Password: pw, Logger: o.Logger})
	}
	if err != nil {
		return nil, err
	}
	o.Logger.Info("store opened", "backend", o.Backend(), "location", o.Location(),
		"duration", time.Since(start).Round(time.Microsecond).String())
	return st, nil
}

// storePassword reads the PostgreSQL password: the file if given (an unreadable or empty one is
// an error), else the systemd credential if present, else none (the URL may carry one, or the
// server may not ask).
func storePassword(file, credsDir string) (string, error) {
	if file == "" && credsDir != "" {
		p := filepath.Join(credsDir, StorePasswordCredential)
		if _, err := os.Stat(p); err == nil {
			file = p
		} else if !errors.Is(err, fs.ErrNotExist) {
			return "", fmt.Errorf("store password credential: %w", err)
		}
	}
	if file == "" {
		return "", nil
	}
	b, err := os.ReadFile(file)
	if err != nil {
		return "", fmt.Errorf("read the store password file: %w", err)
	}
	pw := strings.TrimRight(string(b), "\r\n")
	if pw == "" {
		return "", fmt.Errorf("the store password file %s is empty", file)
	}
	return pw, nil
}
