package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os/exec"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/migctl/migctl/spec"
)

func newDiagram() *cobra.Command {
	var side, format string
	cmd := &cobra.Command{
		Use:   "diagram [FILE] [--side incoming|outgoing|both] [--format mermaid|dot|svg]",
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
				return usagef("--side %q: want incoming, outgoing or both", side)
			}
			if format != "mermaid" && format != "dot" && format != "svg" {
				return usagef("--format %q: want mermaid, dot or svg", format)
			}
			s, err := loadSpec(cmd, args)
			if err != nil {
				printSpecErrors(cmd.ErrOrStderr(), err)
				return &exitError{code: exitFailed}
			}
			// One document per invocation: both sides are one Mermaid
			// diagram (a composite state per side) or one DOT graph (a
			// cluster per side), so one SVG.
			var text string
			switch {
			case format == "mermaid" && len(sides) == 1:
				text = spec.Mermaid(s, sides[0])
			case format == "mermaid":
				text = spec.MermaidSides(s, sides...)
			case len(sides) == 1:
				text = spec.DOT(s, sides[0])
			default:
				text = spec.DOTSides(s, sides...)
			}
			out := cmd.OutOrStdout()
			if format != "svg" {
				_, err := io.WriteString(out, text)
				return err
			}
			svg, err := renderSVG(cmd.Context(), text)
			if err != nil {
				return err
			}
			_, err = out.Write(svg)
			return err
		},
	}
	cmd.Flags().StringVar(&side, "side", "both", "which graph, `SIDE`: incoming, outgoing or both (one diagram with a part per side)")
	cmd.Flags().StringVar(&format, "format", "mermaid", "output `FORMAT`: mermaid, dot or svg (one document per run)")
	return cmd
}

// renderSVG runs Graphviz's dot, for at most a minute.
func renderSVG(ctx context.Context, dot string) ([]byte, error) {
	path, err := exec.LookPath("dot")
	if err != nil {
		return nil, errors.New("--format svg needs Graphviz's dot on PATH: install it with `apt-get install graphviz`, or use --format dot and render elsewhere")
	}
	var stdout, stderr bytes.Buffer
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	c := exec.CommandContext(ctx, path, "-Tsvg")
	c.Stdin, c.Stdout, c.Stderr = strings.NewReader(dot), &stdout, &stderr
	if err := c.Run(); err != nil {
		return nil, fmt.Errorf("dot -Tsvg: %w: %s", err, strings.TrimSpace(stderr.String()))
	}
	return stdout.Bytes(), nil
}
