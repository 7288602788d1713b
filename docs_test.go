package migctl

import (
	"fmt"
	"os"
	"strings"
	"testing"

	"github.com/migctl/migctl/spec"
)

// TestGeneratedDocs fails when docs/states.md, docs/rules.md or the
// README's generated state diagram no longer match what the embedded
// transitions.yaml generates.
func TestGeneratedDocs(t *testing.T) {
	s, err := spec.Load("transitions.yaml", DefaultSpec, nil)
	if err != nil {
		t.Fatalf("the embedded transitions.yaml does not load:\n%v", err)
	}
	for _, f := range []struct{ path, want string }{
		{"docs/states.md", spec.StatesMarkdown(s)},
		{"docs/rules.md", spec.RulesMarkdown(s)},
	} {
		got, err := os.ReadFile(f.path)
		if err != nil {
			t.Errorf("%v; run `go generate ./...` to write it", err)
			continue
		}
		if string(got) != f.want {
			t.Errorf("%s is out of date with transitions.yaml (%s); run `go generate ./...`", f.path, firstDifference(string(got), f.want))
		}
	}
	readme, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	want, err := spec.SpliceGenerated(string(readme), "states", spec.ReadmeDiagram(s))
	if err != nil {
		t.Fatalf("README.md: %v", err)
	}
	if string(readme) != want {
		t.Errorf("README.md's state diagram is out of date with transitions.yaml (%s); run `go generate ./...`", firstDifference(string(readme), want))
	}
}

// firstDifference describes the first line where have and want differ.
func firstDifference(have, want string) string {
	h, w := strings.Split(have, "\n"), strings.Split(want, "\n")
	for i := range max(len(h), len(w)) {
		if i >= len(h) || i >= len(w) || h[i] != w[i] {
			line := func(ls []string) string {
				if i < len(ls) {
					return fmt.Sprintf("%q", ls[i])
				}
				return "end of file"
			}
			return fmt.Sprintf("first difference at line %d: have %s, want %s", i+1, line(h), line(w))
		}
	}
	return "no line differs"
}
