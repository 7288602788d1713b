// Command specdocs writes the generated reference pages of a spec:
// states.md (the Mermaid state diagrams of both sides, with tables of
// states and edges) and rules.md (capabilities, parameters, transports and
// every compatibility rule), and, with -readme, the generated "states"
// section of the README (both graphs as one Mermaid diagram).
//
// Usage:
//
//	go run ./cmd/specdocs [-o dir] [-spec file] [-readme README.md]
//
// With no -spec it documents the embedded default spec (transitions.yaml);
// `go generate ./...` runs it with -o docs -readme README.md. docs_test.go
// in the root package fails when the committed pages differ from what this
// writes.
package main

import (
	"flag"
	"fmt"
	"os"
	"path/filepath"

	"github.com/migctl/migctl"
	"github.com/migctl/migctl/spec"
)

func main() {
	out := flag.String("o", "docs", "directory to write states.md and rules.md into")
	file := flag.String("spec", "", "spec file to document (default: the embedded transitions.yaml)")
	readme := flag.String("readme", "", "Markdown file whose generated \"states\" section to rewrite (e.g. README.md)")
	flag.Parse()
	if err := run(*out, *file, *readme); err != nil {
		fmt.Fprintln(os.Stderr, "specdocs:", err)
		os.Exit(1)
	}
}

func run(out, file, readme string) error {
	var (
		s   *spec.Spec
		err error
	)
	if file == "" {
		s, err = spec.Load("transitions.yaml", migctl.DefaultSpec, nil)
	} else {
		s, err = spec.LoadFile(file, nil)
	}
	if err != nil {
		return err
	}
	if err := os.MkdirAll(out, 0o755); err != nil {
		return err
	}
	for name, text := range map[string]string{
		"states.md": spec.StatesMarkdown(s),
		"rules.md":  spec.RulesMarkdown(s),
	} {
		if err := os.WriteFile(filepath.Join(out, name), []byte(text), 0o644); err != nil {
			return err
		}
	}
	if readme == "" {
		return nil
	}
	doc, err := os.ReadFile(readme)
	if err != nil {
		return err
	}
	text, err := spec.SpliceGenerated(string(doc), "states", spec.ReadmeDiagram(s))
	if err != nil {
		return fmt.Errorf("%s: %w", readme, err)
	}
	return os.WriteFile(readme, []byte(text), 0o644)
}
