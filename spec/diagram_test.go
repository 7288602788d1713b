package spec

import (
	"bytes"
	"flag"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

var update = flag.Bool("update", false, "rewrite the golden files in testdata")

func loadSmall(t testing.TB) *Spec {
	t.Helper()
	s, err := Load("small.yaml", []byte(readSmall(t)), []string{"ready", "allowed"})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// golden compares got with testdata/name, or rewrites it with -update.
func golden(t *testing.T, name, got string) {
	t.Helper()
	path := filepath.Join("testdata", name)
	if *update {
		if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (run go test ./spec -run %s -update to create it)", err, t.Name())
	}
	if got != string(want) {
		t.Errorf("%s differs from the golden file (go test ./spec -run %s -update rewrites it):\n--- got\n%s--- want\n%s", path, t.Name(), got, want)
	}
}

func TestDiagramGolden(t *testing.T) {
	s := loadSmall(t)
	for _, side := range SideNames {
		golden(t, "small-"+side+".mmd", Mermaid(s, side))
		golden(t, "small-"+side+".dot", DOT(s, side))
	}
}

func TestDiagramDeterministic(t *testing.T) {
	s1, err := Load("transitions.yaml", readDefault(t), nil)
	if err != nil {
		t.Fatal(err)
	}
	s2, err := Load("transitions.yaml", readDefault(t), nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, side := range SideNames {
		if Mermaid(s1, side) != Mermaid(s2, side) || DOT(s1, side) != DOT(s2, side) {
			t.Errorf("%s: diagrams differ between two loads of the same spec", side)
		}
	}
	if StatesMarkdown(s1) != StatesMarkdown(s2) || RulesMarkdown(s1) != RulesMarkdown(s2) {
		t.Error("Markdown differs between two loads of the same spec")
	}
}

func TestDiagramContent(t *testing.T) {
	s := loadSmall(t)
	m := Mermaid(s, Incoming)
	for _, want := range []string{
		"[*] --> idle\n",                          // initial arrow to the initial state
		`state "wait-ing" as wait_ing`,            // '-' aliased
		"wait_ing --> run_ning : start [ready]\n", // guard on the label
		"wait_ing --> failed : start ¬[ready]\n",  // refusal edge
		"done --> [*]\n",                          // terminal
		"class run_ning,done,failed frozen\n",     // frozen states
		"classDef frozen fill:#d9d9d9",            // styled
	} {
		if !strings.Contains(m, want) {
			t.Errorf("Mermaid lacks %q:\n%s", want, m)
		}
	}
	if strings.Contains(m, "cancel") {
		t.Errorf("Mermaid draws an ignore edge:\n%s", m)
	}
	if strings.Contains(m, "wait-ing -->") || strings.Contains(m, "--> wait-ing") {
		t.Errorf("Mermaid uses a state id with '-':\n%s", m)
	}
	d := DOT(s, Incoming)
	for _, want := range []string{
		"\"__start\" -> \"idle\";\n",
		`"wait-ing" -> "failed" [label="start ¬[ready]", style=dashed, color=red, fontcolor=red];`,
		`"run-ning" [label="run-ning", style="rounded,filled", fillcolor="#d9d9d9"];`,
		`"done" [label="done\nignores cancel", style="rounded,filled", fillcolor="#d9d9d9", peripheries=2];`,
	} {
		if !strings.Contains(d, want) {
			t.Errorf("DOT lacks %q:\n%s", want, d)
		}
	}
	if Mermaid(s, "sideways") != "" || DOT(s, "sideways") != "" {
		t.Error("an unknown side gave a diagram")
	}
	if got := DOT(s, Outgoing); !strings.Contains(got, `label="send [ready, allowed]"`) {
		t.Errorf("DOT outgoing lacks the two-guard label:\n%s", got)
	}
}

func TestMermaidIDs(t *testing.T) {
	sd := &Side{States: []State{{Name: "end"}, {Name: "a-b"}, {Name: "a_b"}, {Name: "plain"}, {Name: "9lives"}}}
	ids := mermaidIDs(sd)
	want := map[string]string{"end": "s_end", "a-b": "a_b", "a_b": "a_b_2", "plain": "plain", "9lives": "s_9lives"}
	for k, v := range want {
		if ids[k] != v {
			t.Errorf("id of %q = %q, want %q", k, ids[k], v)
		}
	}
}

// TestDOTRenders renders the DOT of both sides of the default and the small
// spec with Graphviz, when it is installed.
func TestDOTRenders(t *testing.T) {
	dot, err := exec.LookPath("dot")
	if err != nil {
		t.Skip("graphviz not installed: apt-get install graphviz")
	}
	def, err := Load("transitions.yaml", readDefault(t), nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range []*Spec{loadSmall(t), def} {
		for _, side := range SideNames {
			cmd := exec.Command(dot, "-Tsvg")
			cmd.Stdin = strings.NewReader(DOT(s, side))
			var out, errb bytes.Buffer
			cmd.Stdout, cmd.Stderr = &out, &errb
			if err := cmd.Run(); err != nil {
				t.Fatalf("dot -Tsvg on %s %s: %v\n%s", s.File, side, err, errb.String())
			}
			if errb.Len() > 0 {
				t.Errorf("dot warned on %s %s: %s", s.File, side, errb.String())
			}
			if !bytes.Contains(out.Bytes(), []byte("<svg")) {
				t.Errorf("dot output for %s %s is not SVG", s.File, side)
			}
		}
	}
}
