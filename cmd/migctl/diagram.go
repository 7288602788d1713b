package main

import (
	"bytes"
	"errors"
	"fmt"
	"os/exec"
	"strings"

	"github.com/spf13/cobra"

	"github.com/migctl/migctl/spec"
)

func newDiagram() *cobra.Command {
	var side, format string
	cmd := &cobra.Command{
		Use:   "diagram [FILE]",
		Short: "Draw the state graphs of a spec (Mermaid, Graphviz DOT or SVG)",
		Long: "diagram draws each side's state graph from the spec: guard names on the edges, refusal (else) edges\n" +
			"drawn as such, states whose configuration is frozen shaded. --format svg needs Graphviz's dot\n" +
			"(Debian package graphviz).",
		Args: cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			var sides []string
			switch side {
			case "both":
				sides = spec.SideNames
			case spec.Incoming, spec.Outgoing:
				sides = []string{side}
			default:
				return fmt.Errorf("--side %q: want incoming, outgoing or both", side)
			}
			s, err := loadSpec(cmd, args)
			if err != nil {
				printSpecErrors(cmd.ErrOrStderr(), err)
				return &exitError{code: 1}
			}
			out := cmd.OutOrStdout()
			for i, sd := range sides {
				switch format {
				case "mermaid":
					if i > 0 {
						fmt.Fprintln(out)
					}
					fmt.Fprint(out, spec.Mermaid(s, sd))
				case "dot":
					fmt.Fprint(out, spec.DOT(s, sd))
				case "svg":
					svg, err := renderSVG(spec.DOT(s, sd))
					if err != nil {
						return err
					}
					out.Write(svg)
				default:
					return fmt.Errorf("--format %q: want mermaid, dot or svg", format)
				}
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&side, "side", "both", "which graph: incoming, outgoing or both")
	cmd.Flags().StringVar(&format, "format", "mermaid", "output format: mermaid, dot or svg")
	return cmd
}

// renderSVG runs Graphviz's dot.
func renderSVG(dot string) ([]byte, error) {
	path, err := exec.LookPath("dot")
	if err != nil {
		return nil, errors.New("--format svg needs Graphviz's dot on PATH: install it with `apt-get install graphviz`, or use --format dot and render elsewhere")
	}
	var stdout, stderr bytes.Buffer
	c := exec.Command(path, "-Tsvg")
	c.Stdin, c.Stdout, c.Stderr = strings.NewReader(dot), &stdout, &stderr
	if err := c.Run(); err != nil {
		return nil, fmt.Errorf("dot -Tsvg: %w: %s", err, strings.TrimSpace(stderr.String()))
	}
	return stdout.Bytes(), nil
}
