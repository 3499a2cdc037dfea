package cli

import (
	"errors"
	"net/http"
	"os"

	"github.com/spf13/cobra"

	"github.com/kmsgate/kmsgate/appliance"
)

// newSystemKeyCmd manages the system key that signs kmsgate's access tokens. Rotation needs the
// running server: the key is made in its provider, which only the server has open.
func newSystemKeyCmd(g *globalFlags) *cobra.Command {
	c := &cobra.Command{Use: "system-key", Short: "Manage the system key that signs kmsgate's access tokens"}
	var socket string
	c.PersistentFlags().StringVar(&socket, "admin-socket", os.Getenv("KMSGATE_ADMIN_SOCKET"), "admin Unix socket of the running server (default <data-dir>/admin.sock)")
	c.AddCommand(&cobra.Command{
		Use:   "rotate",
		Short: "Make a new system key sign tokens from now on; the previous one stays published until the next rotation",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cl, ok := dialAdmin(appliance.Options{DataDir: g.dataDir, AdminSocket: socket}.SocketPath())
			if !ok {
				return errors.New("system-key rotate needs the running server: no admin socket answers (pass --data-dir or --admin-socket)")
			}
			var res struct {
				KID string `json:"kid"`
			}
			if err := cl.do(http.MethodPost, "/admin/system-key/rotate", nil, &res); err != nil {
				return err
			}
			return printJSON(cmd.OutOrStdout(), res)
		},
	})
	return c
}
