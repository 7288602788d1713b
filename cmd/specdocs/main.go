// Command specdocs writes the generated reference pages of a spec:
// states.md (the Mermaid state diagrams of both sides, with tables of
// states and edges) and rules.md (capabilities, parameters, transports and
// every compatibility rule).
//
// Usage:
//
//	go run ./cmd/specdocs [-o dir] [-spec file]
//
// With no -spec it documents the embedded default spec (transitions.yaml);
// `go generate ./...` runs it with -o docs. docs_test.go in the root package
// fails when the committed pages differ from what this writes.
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
	flag.Parse()
	if err := run(*out, *file); err != nil {
		fmt.Fprintln(os.Stderr, "specdocs:", err)
		os.Exit(1)
	}
}

func run(out, file string) error {
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
	return nil
}
