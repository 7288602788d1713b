package main

import (
	"fmt"
	"os"
	"runtime/debug"

	"github.com/spf13/cobra"
	"github.com/spf13/cobra/doc"
)

// version overrides the module version when set at build time with
// -ldflags "-X main.version=…".
var version = ""

// buildInfo is what `migctl version` reports, from the binary's build
// information (runtime/debug.ReadBuildInfo).
type buildInfo struct {
	Version   string // the module version: a tag, a pseudo-version, or (devel)
	Commit    string // vcs.revision, "" when built without VCS stamping
	Modified  bool   // vcs.modified: built from a tree with uncommitted changes
	GoVersion string
}

func readBuildInfo() buildInfo {
	b := buildInfo{Version: "(devel)"}
	if bi, ok := debug.ReadBuildInfo(); ok {
		b.GoVersion = bi.GoVersion
		if bi.Main.Version != "" {
			b.Version = bi.Main.Version
		}
		for _, s := range bi.Settings {
			switch s.Key {
			case "vcs.revision":
				b.Commit = s.Value
			case "vcs.modified":
				b.Modified = s.Value == "true"
			}
		}
	}
	if version != "" {
		b.Version = version
	}
	return b
}

// versionLine is one line: "migctl VERSION, commit C[ (modified)], GOVERSION".
func versionLine() string {
	b := readBuildInfo()
	commit := "commit unknown (built without VCS stamping)"
	if b.Commit != "" {
		c := b.Commit
		if len(c) > 12 {
			c = c[:12]
		}
		commit = "commit " + c
		if b.Modified {
			commit += " (modified)"
		}
	}
	return fmt.Sprintf("migctl %s, %s, %s", b.Version, commit, b.GoVersion)
}

func newVersion() *cobra.Command {
	return &cobra.Command{
		Use:   "version",
		Short: "Print migctl's version, commit and Go version",
		Long: "version prints the module version, the VCS commit the binary was built from (when the build\n" +
			"recorded it) and the Go version, from the binary's build information. --version prints the same.",
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			fmt.Fprintln(cmd.OutOrStdout(), versionLine())
			return nil
		},
	}
}

func newMan() *cobra.Command {
	return &cobra.Command{
		Use:   "man DIR",
		Short: "Write a man page for every command into DIR",
		Long: "man writes migctl.1 and one page per subcommand (migctl-migrate.1, …) into DIR, creating it.\n" +
			"Read one with `man DIR/migctl.1`, or install them under a man1 directory.",
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := os.MkdirAll(args[0], 0o755); err != nil {
				return err
			}
			hdr := &doc.GenManHeader{Title: "MIGCTL", Section: "1", Source: "migctl " + readBuildInfo().Version, Manual: "migctl manual"}
			if err := doc.GenManTree(cmd.Root(), hdr, args[0]); err != nil {
				return fmt.Errorf("write man pages into %s: %w", args[0], err)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "man pages written to %s\n", args[0])
			return nil
		},
	}
}
