package reliability

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"
	"testing"

	"github.com/migctl/migctl/spec"
)

// docPath is the page whose generated section lists every cell.
const docPath = "../docs/reliability.md"

// section is the generated section's name in docPath.
const section = "fault-matrix"

// envResults, for TestWriteReliabilityDoc: a results file written by the
// matrix (MIGCTL_MATRIX_OUT), or "keep" to keep the outcomes the page
// shows (after cells were added or removed).
const envResults = "MIGCTL_RELIABILITY_RESULTS"

// notesHeading starts the list of notes after the tables: it comes from
// the results alone and is not checked for staleness.
const notesHeading = "### Cells that failed or were not reached"

// stateLetter abbreviates a final state in the tables.
var stateLetter = map[string]string{
	sCompleted: "c", sFailed: "f", sCancelled: "x", sUnknown: "u", sListening: "l", "killed": "k", "-": "-",
}

// outcomeCode is a run cell's code: ✓ or ✗ with the source's and the
// destination's final states, nr (not reached), · (not run yet).
func outcomeCode(r *result) string {
	if r == nil {
		return "·"
	}
	letter := func(s string) string {
		if l, ok := stateLetter[s]; ok {
			return l
		}
		return "?" + s
	}
	switch r.Status {
	case "pass":
		return "✓ " + letter(r.Src) + "/" + letter(r.Dst)
	case "fail":
		if r.Src == "" {
			return "✗"
		}
		return "✗ " + letter(r.Src) + "/" + letter(r.Dst)
	case "not-reached":
		return "nr"
	}
	return "·"
}

func isOutcomeCode(code string) bool {
	return code == "·" || code == "nr" || code == "✗" || strings.HasPrefix(code, "✓ ") || strings.HasPrefix(code, "✗ ")
}

// skipCodes assigns each distinct skip reason a code (s1, s2, …) in the
// order of the cells.
func skipCodes(cells []cell) (map[string]string, []string) {
	codes := map[string]string{}
	var order []string
	for _, c := range cells {
		if c.Skip != "" {
			if _, ok := codes[c.Skip]; !ok {
				order = append(order, c.Skip)
				codes[c.Skip] = fmt.Sprintf("s%d", len(order))
			}
		}
	}
	return codes, order
}

// matrixTables renders the legend and one table per transport: a row per
// side:state of the spec, a column per fault. codes gives each run cell's
// outcome code by ID (missing: not run).
func matrixTables(cells []cell, codes map[string]string) string {
	var b strings.Builder
	sc, order := skipCodes(cells)
	run, pass, fail, nr := 0, 0, 0, 0
	for _, c := range cells {
		if c.Skip != "" {
			continue
		}
		run++
		switch code := codes[c.ID()]; {
		case strings.HasPrefix(code, "✓"):
			pass++
		case strings.HasPrefix(code, "✗"):
			fail++
		case code == "nr":
			nr++
		}
	}
	fmt.Fprintf(&b, "%d cells: %d run (%d passed, %d failed, %d not reached, %d not run yet), %d skipped or pending.\n\n",
		len(cells), run, pass, fail, nr, run-pass-fail-nr, len(cells)-run)
	b.WriteString("A run cell shows ✓ (passed) or ✗ (failed) and how the source/destination ended: c completed, f failed,\n" +
		"x cancelled, u unknown-outcome, l listening, k killed by the fault, - no destination process (a save to file).\n" +
		"nr: the state was not reached (the note below says where the side ended); ·: not run yet.\n\n")
	b.WriteString("Skipped or pending cells show a code:\n\n")
	for i, reason := range order {
		fmt.Fprintf(&b, "- s%d: %s\n", i+1, reason)
	}
	b.WriteString("\n")
	for _, t := range transports {
		fmt.Fprintf(&b, "### %s\n\n| state | %s |\n|---|%s\n", t.name, strings.Join(faults, " | "), strings.Repeat("---|", len(faults)))
		rows := map[string][]string{}
		var rowOrder []string
		for _, c := range cells {
			if c.Transport != t.name {
				continue
			}
			if _, ok := rows[c.point()]; !ok {
				rowOrder = append(rowOrder, c.point())
			}
			code := sc[c.Skip]
			if c.Skip == "" {
				code = codes[c.ID()]
				if code == "" {
					code = "·"
				}
			}
			rows[c.point()] = append(rows[c.point()], code)
		}
		for _, r := range rowOrder {
			fmt.Fprintf(&b, "| %s | %s |\n", r, strings.Join(rows[r], " | "))
		}
		b.WriteString("\n")
	}
	return b.String()
}

// matrixNotes lists the cells that failed or were not reached, with why:
// from results, or else the page's line kept for the cell (a merge).
func matrixNotes(cells []cell, results map[string]*result, kept map[string]string) string {
	var b strings.Builder
	b.WriteString(notesHeading + "\n\n")
	n := 0
	for _, c := range cells {
		r := results[c.ID()]
		if line, ok := kept[c.ID()]; ok && r == nil && c.Skip == "" {
			n++
			b.WriteString(line + "\n")
			continue
		}
		if c.Skip != "" || r == nil || r.Status == "pass" {
			continue
		}
		n++
		fmt.Fprintf(&b, "- `%s`: %s", c.ID(), r.Status)
		if r.Src != "" {
			fmt.Fprintf(&b, " (source %s, destination %s)", r.Src, r.Dst)
		}
		if r.Note != "" {
			fmt.Fprintf(&b, ": %s", strings.ReplaceAll(r.Note, "\n", " "))
		}
		b.WriteString("\n")
	}
	if n == 0 {
		b.WriteString("None.\n")
	}
	return b.String()
}

// generatedBody extracts the generated section of doc.
func generatedBody(doc string) (string, error) {
	begin := "<!-- BEGIN generated " + section + ":"
	end := "<!-- END generated " + section + " -->"
	i, j := strings.Index(doc, begin), strings.Index(doc, end)
	if i < 0 || j < i {
		return "", fmt.Errorf("%s has no generated section %q", docPath, section)
	}
	nl := strings.IndexByte(doc[i:], '\n')
	return doc[i+nl+1 : j], nil
}

// parseCodes reads the codes of the page's tables, by cell ID.
func parseCodes(body string) (map[string]string, error) {
	codes := map[string]string{}
	transport := ""
	sc := bufio.NewScanner(strings.NewReader(body))
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(line, notesHeading) {
			break
		}
		if t, ok := strings.CutPrefix(line, "### "); ok {
			transport = t
			continue
		}
		if !strings.HasPrefix(line, "| ") || strings.HasPrefix(line, "| state ") {
			continue
		}
		fields := strings.Split(strings.Trim(line, "|"), "|")
		if len(fields) != len(faults)+1 {
			return nil, fmt.Errorf("row %q has %d columns, want %d", line, len(fields), len(faults)+1)
		}
		point := strings.TrimSpace(fields[0])
		for i, f := range faults {
			codes[transport+"/"+point+"/"+f] = strings.TrimSpace(fields[i+1])
		}
	}
	return codes, sc.Err()
}

// TestReliabilityDocFresh: the page's table lists exactly the current
// cells, each skipped one with its current reason and each run one with an
// outcome (not a skip code), like the generated state diagrams' check. It
// reads the page only: the matrix is not run.
// After cells change: MIGCTL_RELIABILITY_RESULTS=keep go test -run
// TestWriteReliabilityDoc ./reliability/ (then .ci/fault-matrix for the
// outcomes).
func TestReliabilityDocFresh(t *testing.T) {
	body := pageBody(t)
	cells, err := allCells()
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range docProblems(body, cells) {
		t.Error(p)
	}
}

// pageBody returns the generated section of docPath.
func pageBody(t *testing.T) string {
	t.Helper()
	doc, err := os.ReadFile(docPath)
	if err != nil {
		t.Fatal(err)
	}
	body, err := generatedBody(string(doc))
	if err != nil {
		t.Fatal(err)
	}
	return body
}

// docProblems compares the page's generated section with cells: what is
// missing from it, what it lists that is no cell, a skipped cell shown
// where a run one is, and any other difference of skip reasons or counts.
func docProblems(body string, cells []cell) []string {
	codes, err := parseCodes(body)
	if err != nil {
		return []string{err.Error()}
	}
	var out []string
	seen := map[string]bool{}
	for _, c := range cells {
		code, ok := codes[c.ID()]
		switch {
		case !ok:
			out = append(out, fmt.Sprintf("%s is missing from %s", c.ID(), docPath))
		case c.Skip == "" && !isOutcomeCode(code):
			out = append(out, fmt.Sprintf("%s runs now but %s shows %q", c.ID(), docPath, code))
		}
		seen[c.ID()] = true
	}
	var gone []string
	for id := range codes {
		if !seen[id] {
			gone = append(gone, id)
		}
	}
	slices.Sort(gone)
	for _, id := range gone {
		out = append(out, fmt.Sprintf("%s lists %s, which is no cell any more", docPath, id))
	}
	want := matrixTables(cells, codes)
	have, _, _ := strings.Cut(body, notesHeading)
	if have != want {
		out = append(out, fmt.Sprintf("%s's matrix is stale (skip reasons or counts): regenerate it with %s=keep go test -run TestWriteReliabilityDoc ./reliability/", docPath, envResults))
	}
	return out
}

// TestReliabilityDocStaleDetected: the freshness check notices each way
// the cells can drift from the page (a state added to or removed from the
// spec, a skip reason changed, a skipped cell made runnable), each with
// the problem written here.
func TestReliabilityDocStaleDetected(t *testing.T) {
	body := pageBody(t)
	cells, err := allCells()
	if err != nil {
		t.Fatal(err)
	}
	if p := docProblems(body, cells); len(p) > 0 {
		t.Fatalf("the page is stale already (TestReliabilityDocFresh says why): %v", p)
	}
	withState := slices.Clone(cells)
	for _, f := range faults {
		withState = append(withState, cell{Transport: "tcp", Side: spec.Outgoing, State: "x-fake", Fault: f})
	}
	withoutState := slices.DeleteFunc(slices.Clone(cells), func(c cell) bool { return c.point() == "outgoing:device" })
	reason := slices.Clone(cells)
	runnable := slices.Clone(cells)
	for i := range cells {
		if cells[i].ID() == "tcp/outgoing:completed/cut" { // skipped: nothing crosses the channel any more
			reason[i].Skip = "n/a: a reason the page does not give"
			runnable[i].Skip = ""
		}
	}
	for _, tc := range []struct {
		name  string
		cells []cell
		want  string
	}{
		{"state added", withState, "tcp/outgoing:x-fake/cut is missing from"},
		{"state removed", withoutState, "lists tcp/outgoing:device/cut, which is no cell any more"},
		{"skip reason changed", reason, "is stale (skip reasons or counts)"},
		{"skipped cell runs", runnable, "tcp/outgoing:completed/cut runs now but"},
	} {
		problems := docProblems(body, tc.cells)
		if !slices.ContainsFunc(problems, func(p string) bool { return strings.Contains(p, tc.want) }) {
			t.Errorf("%s: the freshness check says %q, want a problem containing %q", tc.name, problems, tc.want)
		}
	}
}

// TestWriteReliabilityDoc writes the generated section of docs/reliability.md
// from a results file (.ci/fault-matrix) or, with "keep", from the
// outcomes it shows. With MIGCTL_RELIABILITY_MERGE=1 (a filtered run of
// .ci/fault-matrix) the results replace only their own cells' outcomes
// and notes; the others keep what the page showed. It does nothing unless
// MIGCTL_RELIABILITY_RESULTS is set.
func TestWriteReliabilityDoc(t *testing.T) {
	src := os.Getenv(envResults)
	if src == "" {
		t.Skip(envResults + " is not set: nothing to write")
	}
	cells, err := allCells()
	if err != nil {
		t.Fatal(err)
	}
	doc, err := os.ReadFile(docPath)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		t.Fatal(err)
	}
	old, _ := generatedBody(string(doc))
	codes := map[string]string{}
	kept := map[string]string{} // a note line of the page, by cell ID
	if src == "keep" || os.Getenv(envMerge) != "" {
		codes, _ = parseCodes(old)
		// A cell that was skipped and runs now has no outcome yet.
		for id, code := range codes {
			if !isOutcomeCode(code) {
				delete(codes, id)
			}
		}
		kept = parseNotes(old)
	}
	results := map[string]*result{}
	if src != "keep" {
		f, err := os.ReadFile(src)
		if err != nil {
			t.Fatal(err)
		}
		for _, line := range strings.Split(strings.TrimSpace(string(f)), "\n") {
			if line == "" {
				continue
			}
			var r result
			if err := json.Unmarshal([]byte(line), &r); err != nil {
				t.Fatalf("%s: %v", src, err)
			}
			results[r.ID] = &r
			codes[r.ID] = outcomeCode(&r)
			delete(kept, r.ID)
		}
	}
	body := matrixTables(cells, codes) + matrixNotes(cells, results, kept)
	text := string(doc)
	if _, err := generatedBody(text); err != nil {
		if text == "" {
			text = "# Reliability\n"
		}
		text = strings.TrimRight(text, "\n") + "\n\n" + matrixIntro +
			"<!-- BEGIN generated " + section + ": written by .ci/fault-matrix (reliability/); DO NOT EDIT -->\n" +
			"<!-- END generated " + section + " -->\n"
	}
	out, err := spec.SpliceGenerated(text, section, body)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(docPath, []byte(out), 0o644); err != nil {
		t.Fatal(err)
	}
}

// envMerge, for TestWriteReliabilityDoc: merge the results into the page
// rather than replace it (set by .ci/fault-matrix for a filtered run).
const envMerge = "MIGCTL_RELIABILITY_MERGE"

// parseNotes reads the page's note lines ("- `ID`: ..."), by cell ID.
func parseNotes(body string) map[string]string {
	out := map[string]string{}
	_, notes, ok := strings.Cut(body, notesHeading)
	if !ok {
		return out
	}
	for _, line := range strings.Split(notes, "\n") {
		rest, ok := strings.CutPrefix(line, "- `")
		if !ok {
			continue
		}
		if id, _, ok := strings.Cut(rest, "`"); ok {
			out[id] = line
		}
	}
	return out
}

// matrixIntro is the head of the matrix section, added with it when the
// page lacks it; the page's prose around the section is hand-maintained
// from there on.
const matrixIntro = `## The fault matrix

` + "`reliability/`" + ` breaks a real migration between two ` + "`migctl serve`" + ` processes at every state of the
spec (enumerated from transitions.yaml), over every transport with a byte stream, with every fault, and
checks in each cell: never both guests running, over the whole run (each guest's run intervals on
CLOCK_MONOTONIC, logged to a file that survives kill -9); a surviving source's guest intact (every page
verified) and running again after a failure before the commit, never resumed on its own after it; a
destination that ran its guest only on the source's go; each side, within the bound, in a terminal or
operator-wait state the test's hand-written table allows; and a migration from the surviving source to a
new destination afterwards. The package documentation (` + "`go doc ./reliability`" + `) explains the cells;
the table below is every cell and its outcome in the last full run (` + "`.ci/fault-matrix`" + `), and
` + "`go test -race ./reliability/`" + ` runs a pairwise subset (every state × fault, fault × transport and state ×
transport pair at least once).

`

// TestMatrixSectionRender: results become the codes written here, read
// back from the rendered tables; failures and unreached cells get a note;
// a merge keeps another cell's note and outcome.
func TestMatrixSectionRender(t *testing.T) {
	cells, err := allCells()
	if err != nil {
		t.Fatal(err)
	}
	results := map[string]*result{
		"tcp/outgoing:committed/cut":    {ID: "tcp/outgoing:committed/cut", Status: "pass", Src: "unknown-outcome", Dst: "unknown-outcome"},
		"unix/outgoing:active/stall":    {ID: "unix/outgoing:active/stall", Status: "fail", Src: "active", Dst: "failed", Note: "the source did not settle"},
		"fd/incoming:loaded/kill-src":   {ID: "fd/incoming:loaded/kill-src", Status: "not-reached", Note: "incoming ended in failed"},
		"exec/outgoing:device/cut":      {ID: "exec/outgoing:device/cut", Status: "pass", Src: "failed", Dst: "listening"},
		"file/outgoing:active/kill-src": {ID: "file/outgoing:active/kill-src", Status: "pass", Src: "killed", Dst: "-"},
	}
	codes := map[string]string{}
	for id, r := range results {
		codes[id] = outcomeCode(r)
	}
	kept := map[string]string{"tcp/incoming:active/cut": "- `tcp/incoming:active/cut`: fail: from an earlier run"}
	body := matrixTables(cells, codes) + matrixNotes(cells, results, kept)
	read, err := parseCodes(body)
	if err != nil {
		t.Fatal(err)
	}
	for id, want := range map[string]string{
		"tcp/outgoing:committed/cut":    "✓ u/u",
		"unix/outgoing:active/stall":    "✗ ?active/f",
		"fd/incoming:loaded/kill-src":   "nr",
		"exec/outgoing:device/cut":      "✓ f/l",
		"file/outgoing:active/kill-src": "✓ k/-",
		"tcp/outgoing:active/cut":       "·",
	} {
		if read[id] != want {
			t.Errorf("%s shows %q, want %q", id, read[id], want)
		}
	}
	for _, want := range []string{
		"- `unix/outgoing:active/stall`: fail (source active, destination failed): the source did not settle",
		"- `fd/incoming:loaded/kill-src`: not-reached: incoming ended in failed",
		"- `tcp/incoming:active/cut`: fail: from an earlier run",
	} {
		if !strings.Contains(body, want+"\n") {
			t.Errorf("the notes lack %q", want)
		}
	}
	if strings.Contains(body, "- `tcp/outgoing:committed/cut`") {
		t.Error("a passing cell has a note")
	}
	if got := parseNotes(body); len(got) != 3 {
		t.Errorf("parseNotes read %d notes back, want 3: %v", len(got), got)
	}
	if !strings.Contains(body, " run (3 passed, 1 failed, 1 not reached, ") {
		t.Errorf("the counts line is wrong:\n%s", body[:strings.IndexByte(body, '\n')])
	}
}
