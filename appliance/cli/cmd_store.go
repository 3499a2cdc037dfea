package cli

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"

	"github.com/spf13/cobra"

	"github.com/kmsgate/kmsgate/appliance"
	"github.com/kmsgate/kmsgate/appliance/authn"
	"github.com/kmsgate/kmsgate/appliance/seal"
	"github.com/kmsgate/kmsgate/appliance/store"
)

func newStoreCmd(g *globalFlags) *cobra.Command {
	c := &cobra.Command{Use: "store", Short: "Move the record store between backends"}
	var from, to, fromPW, toPW, masterKeyFile string
	cp := &cobra.Command{Use: "copy --from DATA_DIR|postgres://… --to DATA_DIR|postgres://…",
		Short: "Copy every record to an empty store (offline: stop every server using either store first)",
		Long: "Copies every record of one store to an empty other one, byte for byte, then verifies the record counts " +
			"and that every sealed db provider key still opens under the master key. A Badger store is named by its " +
			"data dir (the --data-dir of its server), a PostgreSQL store by its URL.",
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if from == "" || to == "" {
				return errors.New("both --from and --to are required")
			}
			mk, _, err := seal.LoadKey(seal.LoadOptions{EnvValue: os.Getenv("KMSGATE_MASTER_KEY"), File: masterKeyFile,
				CredsDir: os.Getenv("CREDENTIALS_DIRECTORY")})
			if err != nil {
				return fmt.Errorf("the master key is needed to verify the sealed keys: %w", err)
			}
			sealer, err := seal.New(mk)
			clear(mk)
			if err != nil {
				return err
			}
			log := g.logger(io.Discard)
			ctx := cmd.Context()
			srcOpts := copyEnd(from, fromPW, log)
			srcOpts.ReadOnly = true
			dstOpts := copyEnd(to, toPW, log)
			if srcOpts.Location() == dstOpts.Location() {
				return errors.New("--from and --to name the same store")
			}
			src, err := appliance.OpenStore(ctx, srcOpts)
			if err != nil {
				return fmt.Errorf("open the source: %w", err)
			}
			defer src.Close()
			// A source that does not open under this master key is refused before anything is written.
			if _, err := verifySealed(ctx, src, sealer); err != nil {
				return fmt.Errorf("source %s: %w", srcOpts.Location(), err)
			}
			dst, err := appliance.OpenStore(ctx, dstOpts)
			if err != nil {
				return fmt.Errorf("open the destination: %w", err)
			}
			defer dst.Close()
			stats, err := store.Copy(ctx, dst, src)
			if err != nil {
				return err
			}
			v, err := verifySealed(ctx, dst, sealer)
			if err != nil {
				return fmt.Errorf("destination %s: %w", dstOpts.Location(), err)
			}
			return printJSON(cmd.OutOrStdout(), map[string]any{
				"from": srcOpts.Location(), "to": dstOpts.Location(), "records": stats.Records, "byKind": stats.ByKind,
				"sealedKeysOpened": v.opened, "sealedKeysUnreferenced": v.unreferenced,
			})
		}}
	f := cp.Flags()
	f.StringVar(&from, "from", "", "source: a data dir (Badger) or a postgres:// URL")
	f.StringVar(&to, "to", "", "destination, which must be empty: a data dir (Badger) or a postgres:// URL")
	f.StringVar(&fromPW, "from-password-file", "", "password file of a PostgreSQL source")
	f.StringVar(&toPW, "to-password-file", "", "password file of a PostgreSQL destination")
	f.StringVar(&masterKeyFile, "master-key-file", os.Getenv("KMSGATE_MASTER_KEY_FILE"),
		"file holding the base64 master key (env KMSGATE_MASTER_KEY_FILE; or KMSGATE_MASTER_KEY)")
	c.AddCommand(cp)
	return c
}

// copyEnd turns a --from/--to value into store options: a URL names PostgreSQL, anything else a
// Badger data dir. Without a password file the systemd credential store-password applies.
func copyEnd(v, pwFile string, log *slog.Logger) appliance.StoreOptions {
	o := appliance.StoreOptions{CredsDir: os.Getenv("CREDENTIALS_DIRECTORY"), Logger: log}
	if store.IsPostgresURL(v) {
		o.URL, o.PasswordFile = v, pwFile
	} else {
		o.DataDir = v
	}
	return o
}

type sealedReport struct{ opened, unreferenced int }

// dbKeyOwner is where a reference to a sealed key says whose it is: the AAD it is sealed to.
type dbKeyOwner struct{ tenant, kid string }

// verifySealed opens every sealed db key with the master key, bound to the tenant and kid of the
// reference that points to it (a key record or a key chain), and the master-key check record. A
// sealed key no record points to (left by a crash between sealing and recording) cannot be
// checked, as its owner is unknown, and is counted instead.
func verifySealed(ctx context.Context, st *store.Store, sealer *seal.Sealer) (sealedReport, error) {
	var rep sealedReport
	var check []byte
	switch err := st.Get(ctx, store.MetaKey("master-key-check"), &check); {
	case err == nil:
		if _, err := sealer.Open(check, seal.AAD("check", "", "")); err != nil {
			return rep, errors.New("the master key does not match the one this store was created with")
		}
	case !errors.Is(err, store.ErrNotFound):
		return rep, err
	}
	owners := map[string][]dbKeyOwner{}
	dbPrefix := store.DBKeyKey("")
	err := st.List(ctx, "", func(key string, val []byte) error {
		// The system key's record is the one metadata record that references a key.
		if strings.HasPrefix(key, dbPrefix) || (strings.HasPrefix(key, store.MetaKey("")) && key != authn.RecordKey) {
			return nil
		}
		var v any
		if err := json.Unmarshal(val, &v); err != nil {
			return fmt.Errorf("record %q: %w", key, err)
		}
		collectOwners(v, "", owners)
		return nil
	})
	if err != nil {
		return rep, err
	}
	err = st.List(ctx, dbPrefix, func(key string, val []byte) error {
		var sealed []byte
		if err := json.Unmarshal(val, &sealed); err != nil {
			return fmt.Errorf("sealed key %q: %w", key, err)
		}
		id := strings.TrimPrefix(key, dbPrefix)
		refs := owners[id]
		if len(refs) == 0 {
			rep.unreferenced++
			return nil
		}
		for _, o := range refs {
			if pt, err := sealer.Open(sealed, seal.AAD("db-key", o.tenant, o.kid)); err == nil {
				clear(pt)
				rep.opened++
				return nil
			}
		}
		return fmt.Errorf("sealed key %s (tenant %q, kid %q) does not open under this master key", id, refs[0].tenant, refs[0].kid)
	})
	return rep, err
}

// collectOwners finds every key reference in a decoded record: an object with an externalId and
// a kid. Its tenant is its own "tenant" field or, inside a key chain, the chain's.
func collectOwners(v any, tenant string, out map[string][]dbKeyOwner) {
	switch x := v.(type) {
	case map[string]any:
		if t, ok := x["tenant"].(string); ok && t != "" {
			tenant = t
		}
		ext, _ := x["externalId"].(string)
		kid, _ := x["kid"].(string)
		if ext != "" && kid != "" {
			out[ext] = append(out[ext], dbKeyOwner{tenant: tenant, kid: kid})
		}
		for _, c := range x {
			collectOwners(c, tenant, out)
		}
	case []any:
		for _, c := range x {
			collectOwners(c, tenant, out)
		}
	}
}
