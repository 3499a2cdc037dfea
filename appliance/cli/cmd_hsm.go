package cli

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/kmsgate/kmsgate/appliance/config"
	"github.com/kmsgate/kmsgate/hsm"
	"github.com/kmsgate/kmsgate/providers"
	pkcs11p "github.com/kmsgate/kmsgate/providers/pkcs11"
)

// newHSMCmd is "kmsgate hsm": operator tools for PKCS#11 modules that need no configuration.
func newHSMCmd() *cobra.Command {
	c := &cobra.Command{Use: "hsm", Short: "Inspect PKCS#11 modules and tokens"}
	var library string
	var asJSON bool
	slots := &cobra.Command{
		Use:   "slots",
		Short: "List the slots and tokens of a PKCS#11 module (no login)",
		Args:  cobra.NoArgs,
		// a failure here is about the module, not the command line
		SilenceUsage: true,
		RunE: func(cmd *cobra.Command, _ []string) error {
			reports, err := hsm.ListSlots(library)
			if err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			if asJSON {
				enc := json.NewEncoder(out)
				enc.SetIndent("", "  ")
				return enc.Encode(reports)
			}
			if len(reports) == 0 {
				fmt.Fprintln(out, "no slots: initialise a token with the vendor tool (e.g. softhsm2-util --init-token --free --label L)")
				return nil
			}
			tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "SLOT ID\tINDEX\tLABEL\tSERIAL\tMODEL\tSESSIONS (MAX/RW)\tEC KEYGEN\tECDSA\tFLAGS")
			for _, r := range reports {
				if !r.TokenPresent {
					fmt.Fprintf(tw, "%d\t-\t(no token)\t\t%s\t\t\t\t\n", r.SlotID, r.Description)
					continue
				}
				fmt.Fprintf(tw, "%d\t%d\t%s\t%s\t%s\t%s/%s\t%s\t%s\t%s\n", r.SlotID, r.Index, r.Label, r.Serial, r.Model,
					r.MaxSessions, r.MaxRWSession, hsmYesNo(r.ECKeyPairGen), hsmYesNo(r.ECDSA), strings.Join(r.Flags, ","))
				if r.Error != "" {
					fmt.Fprintf(tw, "\t\terror: %s\t\t\t\t\t\t\n", r.Error)
				}
			}
			if err := tw.Flush(); err != nil {
				return err
			}
			fmt.Fprintln(out, `"slot" in kms.json takes the INDEX or the LABEL.`)
			return nil
		},
	}
	slots.Flags().StringVar(&library, "library", "", "path of the PKCS#11 module (.so)")
	slots.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	_ = slots.MarkFlagRequired("library")
	c.AddCommand(slots)
	return c
}

func hsmYesNo(b bool) string {
	if b {
		return "yes"
	}
	return "NO"
}

// newDoctorCmd is "kmsgate doctor": it walks every configured pkcs11 provider through library
// load, slot resolution, login and a canary signature, printing the fix for what fails. It never
// prints a PIN.
func newDoctorCmd(loadKMS func() (*config.KMS, error)) *cobra.Command {
	var asJSON bool
	var timeout time.Duration
	cmd := &cobra.Command{
		Use:   "doctor",
		Short: "Check that every configured PKCS#11 provider can load, log in and sign",
		Args:  cobra.NoArgs,
		// the report already explains every failure
		SilenceUsage: true,
		RunE: func(cmd *cobra.Command, _ []string) error {
			kms, err := loadKMS()
			if err != nil {
				return err
			}
			type result struct {
				Provider string      `json:"provider"`
				Type     string      `json:"type"`
				Skipped  string      `json:"skipped,omitempty"`
				Checks   []hsm.Check `json:"checks,omitempty"`
			}
			var results []result
			failed := 0
			for _, pc := range kms.Providers {
				r := result{Provider: pc.ID, Type: pc.Type}
				if pc.Type != providers.TypePKCS11 {
					r.Skipped = "skipped (not pkcs11)"
					results = append(results, r)
					continue
				}
				c, err := pkcs11p.ParseConfig(pc)
				if err != nil {
					r.Checks = []hsm.Check{{Name: "configuration valid", Detail: err.Error(), Fix: "correct the provider entry in kms.json"}}
				} else {
					parent := cmd.Context()
					if parent == nil {
						parent = context.Background()
					}
					ctx, cancel := context.WithTimeout(parent, timeout)
					r.Checks = hsm.Diagnose(ctx, c.HSMConfig(nil))
					cancel()
				}
				for _, ch := range r.Checks {
					if !ch.OK {
						failed++
						break
					}
				}
				results = append(results, r)
			}
			out := cmd.OutOrStdout()
			if asJSON {
				enc := json.NewEncoder(out)
				enc.SetIndent("", "  ")
				if err := enc.Encode(results); err != nil {
					return err
				}
			} else {
				for _, r := range results {
					if r.Skipped != "" {
						fmt.Fprintf(out, "%s (%s): %s\n", r.Provider, r.Type, r.Skipped)
						continue
					}
					fmt.Fprintf(out, "%s (%s):\n", r.Provider, r.Type)
					for _, ch := range r.Checks {
						mark := "ok  "
						if !ch.OK {
							mark = "FAIL"
							if ch.Detail == "not run" {
								mark = "--  "
							}
						}
						line := fmt.Sprintf("  [%s] %s", mark, ch.Name)
						if ch.Detail != "" {
							line += ": " + ch.Detail
						}
						fmt.Fprintln(out, line)
						if ch.Fix != "" {
							fmt.Fprintf(out, "         fix: %s\n", ch.Fix)
						}
					}
				}
			}
			if failed > 0 {
				return fmt.Errorf("doctor: %d pkcs11 provider(s) failed", failed)
			}
			return nil
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	cmd.Flags().DurationVar(&timeout, "timeout", 30*time.Second, "time allowed per provider")
	return cmd
}
