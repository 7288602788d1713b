package spec

import (
	"os/exec"
	"regexp"
	"strings"
	"testing"
)

// Both sides in one document: golden files, one header, every state of
// each side in its own part with an identifier no other part uses.
func TestDiagramSides(t *testing.T) {
	s := loadSmall(t)
	m := MermaidSides(s, Incoming, Outgoing)
	d := DOTSides(s, Incoming, Outgoing)
	golden(t, "small-both.mmd", m)
	golden(t, "small-both.dot", d)
	if strings.Count(m, "stateDiagram-v2") != 1 || strings.Count(d, "digraph ") != 1 {
		t.Fatalf("not one document:\n%s\n%s", m, d)
	}
	for _, side := range SideNames {
		sd := s.Side(side)
		for _, st := range sd.States {
			if !strings.Contains(d, `"`+side+"/"+st.Name+`" [label="`+st.Name) {
				t.Errorf("DOT: no node %s/%s", side, st.Name)
			}
		}
		if !strings.Contains(d, `subgraph "cluster_`+side+`"`) || !strings.Contains(m, `state "`+side+` side" as `+sidePrefix(side)+"side {") {
			t.Errorf("no part for the %s side", side)
		}
	}
	// Every Mermaid identifier inside a part carries that part's prefix.
	part := ""
	for _, line := range strings.Split(m, "\n") {
		if p := regexp.MustCompile(`as ([a-z])_side \{$`).FindStringSubmatch(line); p != nil {
			part = p[1] + "_"
			continue
		}
		if strings.TrimSpace(line) == "}" {
			part = ""
			continue
		}
		if e := regexp.MustCompile(`^\s+(\S+) --> (\S+)`).FindStringSubmatch(line); e != nil && part != "" {
			for _, id := range e[1:] {
				if id != "[*]" && !strings.HasPrefix(id, part) {
					t.Errorf("%q: %s lacks the part's prefix %s", line, id, part)
				}
			}
		}
	}
	if MermaidSides(s, "sideways") != "" || DOTSides(s, Incoming, "sideways") != "" {
		t.Error("an unknown side drew something")
	}
	if _, err := exec.LookPath("dot"); err == nil {
		c := exec.Command("dot", "-Tsvg")
		c.Stdin = strings.NewReader(d)
		if out, err := c.CombinedOutput(); err != nil || strings.Count(string(out), "<svg") != 1 {
			t.Errorf("dot -Tsvg: %v, %d svg elements", err, strings.Count(string(out), "<svg"))
		}
	}
}

func TestSpliceGenerated(t *testing.T) {
	doc := "a\n<!-- BEGIN generated x: note -->\nold\n<!-- END generated x -->\nb\n"
	got, err := SpliceGenerated(doc, "x", "new\n")
	if want := "a\n<!-- BEGIN generated x: note -->\nnew\n<!-- END generated x -->\nb\n"; err != nil || got != want {
		t.Errorf("got %q, %v; want %q", got, err, want)
	}
	for _, bad := range []string{"no markers", "<!-- END generated x -->\n<!-- BEGIN generated x: n -->\n",
		doc + doc, "<!-- BEGIN generated x: n --><!-- END generated x -->"} {
		if _, err := SpliceGenerated(bad, "x", "new\n"); err == nil {
			t.Errorf("%q: accepted", bad)
		}
	}
}
