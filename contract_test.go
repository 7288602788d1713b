package migctl

import (
	"go/ast"
	"go/parser"
	"go/token"
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/migctl/migctl/spec"
)

// declarations are the only files that may spell a spec state or trigger
// name as a string literal: the contract (machine/names.go) and the
// configuration triggers the spec package reserves.
var declarations = map[string]bool{
	"machine/names.go": true,
	"spec/lookup.go":   true,
	// migctl's intended behaviour per state, written by hand for the tests
	// to hold the spec against.
	"internal/intent/intent.go": true,
}

// notSpecNames lists literals that equal a spec name but are not one:
// each is another vocabulary that happens to share the word, with how many
// times the file spells it. A new occurrence anywhere else fails the test.
var notSpecNames = []struct {
	file, literal string
	count         int
	why           string
}{
	{"qmp/commands.go", "migrate", 3, "the QMP command's name (table, argument errors, the trust policy)"},
	{"guest/runlog.go", "start", 1, "a run log line's word (the file format of Config.RunLogFile), not the outgoing trigger"},
	{"guest/runlog.go", "stop", 1, "a run log line's word (the file format of Config.RunLogFile), not the guest trigger"},
	{"qmp/hmp.go", "stop", 1, "the HMP command name"},
	{"cmd/migctl/guestproc.go", "postcopy", 1, "serve's --guest key postcopy=on|off"},
	{"cmd/migctl/serve_flags.go", "reattach", 1, "serve's flag --reattach unix:SOCKET (the CLI's word; the spec's trigger is machine.TriggerReattach)"},
	{"qmp/hmp.go", "migrate", 1, "the HMP info subcommand's name"},
	{"qmp/hmp.go", "failed", 1, "QEMU's MigrationStatus in HMP's info migrate text"},
	{"qmp/hmp.go", "paused", 1, "QEMU's RunState in HMP's info status text"},
	{"cmd/migctl/runstate.go", "stop", 2, "the CLI subcommand and the QMP command it sends"},
	{"cmd/migctl/runstate.go", "cont", 2, "the CLI subcommand and the QMP command it sends"},
	{"cmd/migctl/runstate.go", "pre-switchover", 1, "QEMU's MigrationStatus, migrate-continue's default argument"},
	{"cmd/migctl/runstate.go", "paused", 1, "a word the CLI prints"},
	{"cmd/migctl/runstate.go", "running", 1, "a word the CLI prints"},
	{"cmd/migctl/qmp.go", "paused", 1, "serve's --paused flag (QEMU's -S)"},
	{"cmd/migctl/info.go", "paused", 1, "a word the CLI prints"},
	{"cmd/migctl/info.go", "running", 1, "a word the CLI prints"},
	{"cmd/migctl/info.go", "incoming", 1, "the JSON key of query-migctl-machine's incoming side"},
	{"cmd/migctl/qmp.go", "pre-switchover", 1, "a QMP client reading QEMU's MigrationStatus from query-migrate"},
	{"qmp/commands.go", "stop", 1, "the QMP command name"},
	{"qmp/commands.go", "cont", 1, "the QMP command name"},
	{"qmp/commands.go", "resume", 1, "the QMP migrate command's resume argument"},
	{"qmp/commands.go", "none", 1, "QEMU's MigrationStatus enum (migrate-continue checks its argument against it)"},
	{"qmp/commands.go", "setup", 1, "QEMU's MigrationStatus enum"},
	{"qmp/commands.go", "cancelling", 1, "QEMU's MigrationStatus enum"},
	{"qmp/commands.go", "cancelled", 1, "QEMU's MigrationStatus enum"},
	{"qmp/commands.go", "active", 1, "QEMU's MigrationStatus enum"},
	{"qmp/commands.go", "postcopy-device", 1, "QEMU's MigrationStatus enum"},
	{"qmp/commands.go", "postcopy-active", 1, "QEMU's MigrationStatus enum"},
	{"qmp/commands.go", "postcopy-paused", 1, "QEMU's MigrationStatus enum"},
	{"qmp/commands.go", "postcopy-recover-setup", 1, "QEMU's MigrationStatus enum"},
	{"qmp/commands.go", "postcopy-recover", 1, "QEMU's MigrationStatus enum"},
	{"qmp/commands.go", "completed", 1, "QEMU's MigrationStatus enum"},
	{"qmp/commands.go", "failed", 1, "QEMU's MigrationStatus enum"},
	{"qmp/commands.go", "pre-switchover", 1, "QEMU's MigrationStatus enum"},
	{"qmp/commands.go", "device", 1, "QEMU's MigrationStatus enum"},
	{"qmp/commands.go", "failing", 1, "QEMU's MigrationStatus enum"},
	{"bench/cmd/sidebyside/main.go", "commit", 1, "the git commit a benchmark ran on (a key of its host facts)"},
	{"bench/cmd/sidebyside/report.go", "commit", 1, "the git commit a benchmark ran on (a key of its host facts)"},
	{"transport/commit.go", "commit", 2, "the operation a CommitError names (CommitError.Op)"},
	{"transport/exec.go", "commit", 2, "the operation a CommitError names (CommitError.Op)"},
	{"creds/objects.go", "loaded", 1, "QEMU's deprecated tls-creds property, refused by name"},
	{"qmp/server.go", "listen", 1, "a socket operation's name in an error"},
	{"cmd/migctl/qmp.go", "migrate", 1, "the QMP command a client sends"},
	{"cmd/migctl/qmp.go", "cancel", 1, "the CLI subcommand's name"},
	{"cmd/migctl/qmp.go", "completed", 1, "a QMP client reading QEMU's MigrationStatus from query-migrate"},
	{"cmd/migctl/qmp.go", "failed", 1, "a QMP client reading QEMU's MigrationStatus from query-migrate"},
	{"cmd/migctl/qmp.go", "cancelled", 1, "a QMP client reading QEMU's MigrationStatus from query-migrate"},
	{"cmd/migctl/demo.go", "listen", 1, "the demo destination's --listen flag"},
	{"cmd/migctl/demo.go", "listening", 3, "the demo's own line protocol between its two processes"},
	{"embed.go", "connected", 1, "the mutant_mutable_running mutation edits this state in the spec's text"},
	{"embed.go", "active", 1, "the mutant_mutable_running mutation edits this state in the spec's text"},
	{"engine/engine.go", "switchover", 1, "a log line's message"},
	{"machine/errors.go", "none", 1, "an error message's word for an empty list"},
	{"spec/lint.go", "none", 1, "an error message's word for an empty list"},
	{"spec/types.go", "none", 1, "the report: value none (what query-migrate shows)"},
	{"spec/types.go", "postcopy", 1, "the report: value postcopy"},
	{"stream/decoder.go", "device", 1, "the stream's device sections, in an error"},
	{"stream/encoder.go", "device", 1, "the stream's device sections, in an error"},
	{"stream/format.go", "device", 1, "the stream's record kind name"},
	{"transport/listen.go", "listen", 1, "a socket operation's name in an error"},
	{"multifd/format.go", "none", 2, "multifd-compression's value none"},
	{"multifd/reader.go", "none", 1, "multifd-compression's value none"},
	{"multifd/zero.go", "none", 2, "zero-page-detection's value none"},
	{"uffd/abi.go", "none", 1, "the word for an empty feature set"},
	{"bench/cmd/sidebyside/names.go", "migrate", 1, "the QMP command the benchmark sends to QEMU and migctl serve"},
	{"bench/cmd/sidebyside/names.go", "cont", 1, "the QMP command the benchmark sends to a QEMU source"},
	{"bench/cmd/sidebyside/names.go", "completed", 1, "QEMU's MigrationStatus read from query-migrate"},
	{"bench/cmd/sidebyside/names.go", "failed", 1, "QEMU's MigrationStatus read from query-migrate"},
	{"bench/cmd/sidebyside/names.go", "cancelled", 1, "QEMU's MigrationStatus read from query-migrate"},
	{"bench/cmd/sidebyside/names.go", "none", 1, "the value of QEMU's -display option"},
}

// No Go file outside the contract's declarations spells a spec state or
// trigger as a bare string literal: Go reaches the spec's names only
// through machine's typed constants, which the controller checks against
// the spec when it is built.
func TestNoBareSpecNames(t *testing.T) {
	s, err := Spec()
	if err != nil {
		t.Fatal(err)
	}
	names := map[string]string{} // name → what it is
	for _, g := range spec.GraphNames {
		sd := s.Side(g)
		for _, st := range sd.States {
			names[st.Name] = g + " state"
		}
		for _, tr := range sd.Triggers() {
			names[tr] = g + " trigger"
		}
	}
	for _, tr := range spec.ConfigTriggers {
		names[tr] = "configuration trigger"
	}
	allowed := map[[2]string]int{}
	for _, a := range notSpecNames {
		allowed[[2]string{a.file, a.literal}] = a.count
	}
	found := map[[2]string]int{}
	var where = map[[2]string][]string{}
	fset := token.NewFileSet()
	err = filepath.WalkDir(".", func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			if base := d.Name(); path != "." && (base == "testdata" || strings.HasPrefix(base, ".")) {
				return filepath.SkipDir
			}
			return nil
		}
		if !strings.HasSuffix(path, ".go") || strings.HasSuffix(path, "_test.go") || declarations[path] {
			return nil
		}
		f, err := parser.ParseFile(fset, path, nil, parser.SkipObjectResolution)
		if err != nil {
			return err
		}
		// Struct tags and import paths are string literals too, and never
		// spec names: skip them.
		skip := map[*ast.BasicLit]bool{}
		for _, imp := range f.Imports {
			skip[imp.Path] = true
		}
		ast.Inspect(f, func(n ast.Node) bool {
			if fl, ok := n.(*ast.Field); ok && fl.Tag != nil {
				skip[fl.Tag] = true
			}
			return true
		})
		ast.Inspect(f, func(n ast.Node) bool {
			lit, ok := n.(*ast.BasicLit)
			if !ok || lit.Kind != token.STRING || skip[lit] {
				return true
			}
			v, err := strconv.Unquote(lit.Value)
			if err != nil {
				return true
			}
			if _, ok := names[v]; ok {
				k := [2]string{filepath.ToSlash(path), v}
				found[k]++
				where[k] = append(where[k], fset.Position(lit.Pos()).String())
			}
			return true
		})
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range slices.SortedFunc(maps.Keys(found), func(a, b [2]string) int { return strings.Compare(a[0]+a[1], b[0]+b[1]) }) {
		if n, ok := allowed[k]; !ok || n != found[k] {
			t.Errorf("%s spells %q (%s) as a bare string %d time(s) (allowed: %d) at %s: use machine's constants, or add the literal to notSpecNames with why it is not a spec name",
				k[0], k[1], names[k[1]], found[k], n, strings.Join(where[k], ", "))
		}
	}
	for k, n := range allowed {
		if found[k] != n {
			t.Errorf("notSpecNames expects %s to spell %q %d time(s), found %d: update the table", k[0], k[1], n, found[k])
		}
	}
}

// The module root must hold this test: it walks the tree from here.
func TestMain(m *testing.M) {
	if _, err := os.Stat("go.mod"); err != nil {
		panic("run from the module root")
	}
	os.Exit(m.Run())
}
