package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"encoding/xml"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
	yaml "go.yaml.in/yaml/v3"

	"github.com/migctl/migctl/internal/qemutools"
)

// The CLI suite: the built binary (TestMain builds it once), run as a user
// runs it. Exit statuses are the README's: 0 ok, 1 refused or failed,
// 2 usage, 130 interrupted.

// hangGuard bounds every command these tests run: a generous deadline
// that only catches a hang, never a timing goal.
const hangGuard = 2 * time.Minute

// runIn runs the binary with a deadline and extra environment (KEY=VALUE;
// a bare KEY removes it).
func runIn(t *testing.T, env []string, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), hangGuard)
	defer cancel()
	var o, e bytes.Buffer
	c := exec.CommandContext(ctx, binary, args...)
	c.Env = withEnv(env)
	c.Stdout, c.Stderr = &o, &e
	err := c.Run()
	if ctx.Err() != nil {
		t.Fatalf("migctl %v did not end within %s (hang); stderr:\n%s", args, hangGuard, e.String())
	}
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatalf("run %v: %v", args, err)
	}
	return o.String(), e.String(), code
}

func withEnv(env []string) []string {
	out := slices.DeleteFunc(os.Environ(), func(kv string) bool {
		k, _, _ := strings.Cut(kv, "=")
		for _, e := range env {
			if ek, _, _ := strings.Cut(e, "="); ek == k {
				return true
			}
		}
		return false
	})
	for _, e := range env {
		if strings.Contains(e, "=") {
			out = append(out, e)
		}
	}
	return out
}

// commandPaths lists every command a user can type, as "migrate" or
// "completion bash", with cobra's generated help and completion commands.
func commandPaths() []string {
	root := newRoot()
	root.InitDefaultHelpCmd()
	root.InitDefaultCompletionCmd()
	var out []string
	var walk func(c *cobra.Command)
	walk = func(c *cobra.Command) {
		for _, sub := range c.Commands() {
			if sub.Hidden {
				continue
			}
			out = append(out, strings.TrimPrefix(sub.CommandPath(), "migctl "))
			walk(sub)
		}
	}
	walk(root)
	return out
}

// mainUse names, for every command, the test that runs its main use: a
// new command fails TestCLIEveryCommand until it has one.
var mainUse = map[string]string{
	"validate": "TestValidateAndExplain", "explain": "TestValidateAndExplain",
	"diagram": "TestDiagramOneDocument", "version": "TestVersion", "man": "TestCompletionAndMan",
	"completion": "TestCompletionAndMan", "completion bash": "TestCompletionAndMan", "completion zsh": "TestCompletionAndMan",
	"completion fish": "TestCompletionAndMan", "completion powershell": "TestCompletionAndMan", "help": "TestCompletionAndMan",
	"demo":  "TestDemoTransports, TestDemoPauseBeforeSwitchover",
	"serve": "TestCLIServeClients", "incoming": "TestCLIServeClients", "migrate": "TestCLIServeClients",
	"status": "TestCLIServeClients", "info": "TestCLIServeClients", "set-cap": "TestCLIServeClients",
	"set-param": "TestCLIServeClients", "cancel": "TestCLIServeClients", "events": "TestCLIServeClients",
	"qmp": "TestCLIServeClients", "stop": "TestCLIServeClients", "cont": "TestCLIServeClients",
	"migrate-continue": "TestCLIServeClients",
}

// Every command: --help works (exit 0, usage on stdout), an unknown flag
// is a usage error (exit 2, naming the flag and where help is), and it has
// a test of its main use.
func TestCLIEveryCommand(t *testing.T) {
	paths := commandPaths()
	if len(paths) < 20 {
		t.Fatalf("only %d commands found: %v", len(paths), paths)
	}
	for _, p := range paths {
		args := strings.Fields(p)
		t.Run(strings.ReplaceAll(p, " ", "_"), func(t *testing.T) {
			if _, ok := mainUse[p]; !ok {
				t.Errorf("%s has no test of its main use: add one and name it in mainUse", p)
			}
			out, errOut, code := runIn(t, nil, append(args, "--help")...)
			if code != exitOK || !strings.Contains(out, "Usage:") {
				t.Errorf("%s --help: exit %d, stdout %q, stderr %q", p, code, out, errOut)
			}
			_, errOut, code = runIn(t, nil, append(args, "--no-such-flag")...)
			if code != exitUsage || !strings.Contains(errOut, "--no-such-flag") || !strings.Contains(errOut, "--help") {
				t.Errorf("%s --no-such-flag: exit %d (want %d), stderr %q", p, code, exitUsage, errOut)
			}
		})
	}
	_, errOut, code := runIn(t, nil, "migrat")
	if code != exitUsage || !strings.Contains(errOut, `unknown command "migrat"`) || !strings.Contains(errOut, `did you mean "migrate"`) {
		t.Errorf("unknown command: exit %d, stderr %q", code, errOut)
	}
	_, errOut, code = runIn(t, nil, "incoming", "-s", "/nonexistent", "a", "b")
	if code != exitUsage || !strings.Contains(errOut, "accepts 1 arg") {
		t.Errorf("too many arguments: exit %d, stderr %q", code, errOut)
	}
}

// Every flag shows a placeholder a person can read: a word in capitals or
// the value's shape, never a Go type name or a phrase (the old
// "-s, --socket migctl serve").
func TestFlagPlaceholders(t *testing.T) {
	goTypes := map[string]bool{"string": true, "stringArray": true, "strings": true, "int": true, "uint64": true,
		"float64": true, "duration": true, "bool": true, "int64": true, "uint": true}
	root := newRoot()
	root.InitDefaultCompletionCmd()
	var walk func(c *cobra.Command)
	walk = func(c *cobra.Command) {
		check := func(f *pflag.Flag) {
			name, _ := pflag.UnquoteUsage(f)
			if goTypes[name] || strings.Contains(name, " ") {
				t.Errorf("%s --%s shows placeholder %q: put a `PLACEHOLDER` in its usage", c.CommandPath(), f.Name, name)
			}
		}
		c.LocalFlags().VisitAll(check)
		for _, sub := range c.Commands() {
			walk(sub)
		}
	}
	walk(root)
}

func TestVersion(t *testing.T) {
	out, _, code := runIn(t, nil, "version")
	out2, _, code2 := runIn(t, nil, "--version")
	if code != 0 || code2 != 0 || out != out2 {
		t.Fatalf("version: exit %d %q; --version: exit %d %q", code, out, code2, out2)
	}
	// The binary was built by this Go; its module version is (devel) in
	// a checkout; the commit is there when the build recorded it.
	if !strings.HasPrefix(out, "migctl (devel), commit ") || !strings.Contains(out, runtime.Version()) {
		t.Errorf("version: %q, want the module version, commit and %s", out, runtime.Version())
	}
}

func TestCompletionAndMan(t *testing.T) {
	for shell, want := range map[string]string{"bash": "__start_migctl", "zsh": "#compdef migctl", "fish": "complete -c migctl", "powershell": "Register-ArgumentCompleter"} {
		out, _, code := runIn(t, nil, "completion", shell)
		if code != 0 || !strings.Contains(out, want) {
			t.Errorf("completion %s: exit %d, no %q", shell, code, want)
		}
	}
	dir := filepath.Join(t.TempDir(), "man")
	if _, errOut, code := runIn(t, nil, "man", dir); code != 0 {
		t.Fatalf("man: exit %d: %s", code, errOut)
	}
	page, err := os.ReadFile(filepath.Join(dir, "migctl-migrate.1"))
	if err != nil || !bytes.Contains(page, []byte(`.TH "MIGCTL"`)) || !bytes.Contains(page, []byte("switchover")) {
		t.Errorf("migctl-migrate.1: %v\n%.300s", err, page)
	}
	if _, err := os.Stat(filepath.Join(dir, "migctl-demo-destination.1")); err == nil {
		t.Errorf("a man page for the hidden demo-destination")
	}
	if out, _, code := runIn(t, nil, "help", "migrate"); code != 0 || !strings.Contains(out, "pre-switchover") {
		t.Errorf("help migrate: exit %d", code)
	}
}

// diagram writes one document per run: one SVG (an XML document with one
// svg root) and one Mermaid diagram, whatever --side says.
func TestDiagramOneDocument(t *testing.T) {
	for _, side := range []string{"both", "incoming", "outgoing"} {
		out, _, code := runIn(t, nil, "diagram", "--side", side, "--format", "mermaid")
		if code != 0 || strings.Count(out, "stateDiagram-v2") != 1 {
			t.Errorf("--side %s mermaid: exit %d, %d diagram headers", side, code, strings.Count(out, "stateDiagram-v2"))
		}
		out, _, code = runIn(t, nil, "diagram", "--side", side, "--format", "dot")
		if code != 0 || strings.Count(out, "digraph ") != 1 {
			t.Errorf("--side %s dot: exit %d, %d graphs", side, code, strings.Count(out, "digraph "))
		}
	}
	if _, err := exec.LookPath("dot"); err != nil {
		t.Skip("Graphviz's dot is not installed (apt-get install graphviz): the SVG half is not checked")
	}
	for _, side := range []string{"both", "incoming"} {
		out, errOut, code := runIn(t, nil, "diagram", "--side", side, "--format", "svg")
		if code != 0 {
			t.Fatalf("--side %s svg: exit %d: %s", side, code, errOut)
		}
		roots, err := xmlRoots(out)
		if err != nil || len(roots) != 1 || roots[0] != "svg" {
			t.Errorf("--side %s svg: root elements %v, err %v; want one svg document", side, roots, err)
		}
	}
	_, errOut, code := runIn(t, nil, "diagram", "--format", "png")
	if code != exitUsage || !strings.Contains(errOut, "png") {
		t.Errorf("--format png: exit %d, %q", code, errOut)
	}
}

// xmlRoots parses text as XML to its end and returns its top-level
// elements' names.
func xmlRoots(text string) ([]string, error) {
	d := xml.NewDecoder(strings.NewReader(text))
	depth := 0
	var roots []string
	for {
		tok, err := d.Token()
		if err == io.EOF {
			return roots, nil
		}
		if err != nil {
			return roots, err
		}
		switch e := tok.(type) {
		case xml.StartElement:
			if depth == 0 {
				roots = append(roots, e.Name.Local)
			}
			depth++
		case xml.EndElement:
			depth--
		}
	}
}

// Bad flags are refused before any guest memory is prepared (no
// "preparing" line): a typo on a 4 GiB demo costs no memory and no time.
// The deadline is the hang guard, not a speed goal; the order is the point.
func TestDemoFlagsCheckedFirst(t *testing.T) {
	for _, c := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"--size", "4G", "--cap", "bogus=on"}, exitUsage, "bogus"},
		{[]string{"--size", "4G", "--cap", "xbzrle=maybe"}, exitUsage, "maybe"},
		{[]string{"--size", "4G", "--destination-cap", "bogus=on"}, exitUsage, "bogus"},
		{[]string{"--size", "4G", "--param", "downtime-limit=soon"}, exitUsage, "downtime-limit"},
		{[]string{"--size", "4G", "--param", "no-such-param=1"}, exitUsage, "no-such-param"},
		{[]string{"--size", "4G", "--transport", "pigeon"}, exitUsage, "pigeon"},
		{[]string{"--guest", "size=4G,colour=blue"}, exitUsage, "colour"},
		{[]string{"--guest", "size=4G", "--size", "1G"}, exitUsage, "both given"},
		{[]string{"--size", "0"}, exitUsage, "size"},
		{[]string{"--size", "64T"}, exitFailed, "MemAvailable"},
	} {
		start := time.Now()
		_, errOut, code := runIn(t, nil, append([]string{"demo"}, c.args...)...)
		if code != c.code || !strings.Contains(errOut, c.want) {
			t.Errorf("demo %v: exit %d (want %d), stderr %q (want %q)", c.args, code, c.code, errOut, c.want)
		}
		if strings.Contains(errOut, "preparing") {
			t.Errorf("demo %v: guest memory was prepared before the flags were refused:\n%s", c.args, errOut)
		}
		t.Logf("demo %v: refused in %v", c.args, time.Since(start).Round(time.Millisecond))
	}
}

// pause-before-switchover used to hang the demo for ever: it waited for a
// migrate-continue nobody sent. The demo now shows the pause and continues.
func TestDemoPauseBeforeSwitchover(t *testing.T) {
	out, errOut, code := runIn(t, nil, "demo", "--size", "16M", "--cap", "pause-before-switchover=on", "--json")
	var r demoResult
	if err := json.Unmarshal([]byte(out), &r); err != nil {
		t.Fatalf("demo --json printed %q (%v); stderr:\n%s", out, err, errOut)
	}
	if code != 0 || !r.Verified || r.Status != "completed" {
		t.Fatalf("exit %d, %+v; stderr:\n%s", code, r, errOut)
	}
	if !strings.Contains(errOut, "paused in pre-switchover") {
		t.Errorf("the pause was not shown:\n%s", errOut)
	}
}

// SIGINT or SIGTERM during a demo: "interrupted", exit 130, no summary or
// verdict, and no temporary directory left behind.
func TestDemoInterrupted(t *testing.T) {
	for _, sig := range []syscall.Signal{syscall.SIGINT, syscall.SIGTERM} {
		t.Run(sig.String(), func(t *testing.T) {
			tmp := t.TempDir()
			ctx, cancel := context.WithTimeout(context.Background(), hangGuard)
			defer cancel()
			c := exec.CommandContext(ctx, binary, "demo", "--size", "32M", "--transport", "unix", "--param", "max-bandwidth=1M")
			c.Env = withEnv([]string{"TMPDIR=" + tmp})
			var stdout bytes.Buffer
			c.Stdout = &stdout
			errPipe, err := c.StderrPipe()
			if err != nil {
				t.Fatal(err)
			}
			if err := c.Start(); err != nil {
				t.Fatal(err)
			}
			var stderr strings.Builder
			sc := bufio.NewScanner(errPipe)
			for sc.Scan() {
				stderr.WriteString(sc.Text() + "\n")
				if strings.HasPrefix(sc.Text(), "active") {
					break // migrating: interrupt it now
				}
			}
			if err := c.Process.Signal(sig); err != nil {
				t.Fatal(err)
			}
			rest, _ := io.ReadAll(errPipe)
			stderr.Write(rest)
			err = c.Wait()
			if ctx.Err() != nil {
				t.Fatalf("the demo did not end after %v (hang):\n%s", sig, stderr.String())
			}
			var ee *exec.ExitError
			if !errors.As(err, &ee) || ee.ExitCode() != exitInterrupted {
				t.Fatalf("after %v: %v, want exit %d; stderr:\n%s", sig, err, exitInterrupted, stderr.String())
			}
			if !strings.Contains(stderr.String(), "migctl: interrupted") || strings.Contains(stdout.String(), "verified") {
				t.Errorf("after %v: stdout %q, stderr:\n%s", sig, stdout.String(), stderr.String())
			}
			left, _ := os.ReadDir(tmp)
			for _, e := range left {
				t.Errorf("left behind in TMPDIR: %s", e.Name())
			}
		})
	}
}

// The client commands against two `migctl serve`, as an operator uses
// them. The destination is described with explicit keys and the source
// with defaults: they agree because the defaults (seed=1) are applied.
func TestCLIServeClients(t *testing.T) {
	src := startServe(t, "src", "--guest=size=16M,dirty-rate=8M")
	dst := startServe(t, "dst", "--guest=size=16M,seed=1,dirty-rate=0", "--destination")
	want := func(name string, code, wantCode int, out, errOut string, subs ...string) {
		t.Helper()
		if code != wantCode {
			t.Errorf("%s: exit %d, want %d\nstdout: %s\nstderr: %s", name, code, wantCode, out, errOut)
			return
		}
		for _, s := range subs {
			if !strings.Contains(out+errOut, s) {
				t.Errorf("%s: output lacks %q\nstdout: %s\nstderr: %s", name, s, out, errOut)
			}
		}
	}

	out, errOut, code := runIn(t, nil, "info", "-s", dst.sock)
	want("info", code, 0, out, errOut, "guest  inmigrate (paused)", "CAPABILITY", "PARAMETER", "downtime-limit")
	if !regexp.MustCompile(`(?m)^incoming\s+none\s+none\s+mutable\s+incoming`).MatchString(out) {
		t.Errorf("info: no incoming machine row:\n%s", out)
	}
	if !regexp.MustCompile(`(?m)^xbzrle\s+off\s+yes\s`).MatchString(out) {
		t.Errorf("info: no xbzrle row:\n%s", out)
	}
	out, errOut, code = runIn(t, nil, "info", "-s", dst.sock, "-o", "json")
	var rep infoReport
	if code != 0 || json.Unmarshal([]byte(out), &rep) != nil || rep.Guest.Status != "inmigrate" || rep.Machine.Incoming.State != "none" || len(rep.Capabilities) == 0 {
		t.Errorf("info -o json: exit %d, %+v, stderr %s", code, rep.Guest, errOut)
	}
	out, _, code = runIn(t, nil, "info", "-s", dst.sock, "-o", "yaml")
	var y map[string]any
	if code != 0 || yaml.Unmarshal([]byte(out), &y) != nil || y["parameters"] == nil {
		t.Errorf("info -o yaml: exit %d:\n%.300s", code, out)
	}
	_, errOut, code = runIn(t, nil, "info", "-s", dst.sock, "-o", "xml")
	want("info -o xml", code, exitUsage, "", errOut, "xml")

	_, errOut, code = runIn(t, nil, "set-cap", "-s", src.sock, "xbzrle=maybe")
	want("set-cap xbzrle=maybe", code, exitUsage, "", errOut, "maybe")
	_, errOut, code = runIn(t, nil, "set-cap", "-s", src.sock, "bogus=on")
	want("set-cap bogus=on", code, exitFailed, "", errOut, "bogus")
	out, errOut, code = runIn(t, nil, "set-cap", "-s", src.sock, "pause-before-switchover=yes")
	want("set-cap pause-before-switchover=yes", code, 0, out, errOut)
	out, errOut, code = runIn(t, nil, "set-param", "-s", src.sock, "max-bandwidth=0", "cpu-throttle-tailslow=no")
	want("set-param", code, 0, out, errOut)
	_, errOut, code = runIn(t, []string{"MIGCTL_SOCKET"}, "status")
	want("status without a socket", code, exitUsage, "", errOut, "-s")

	out, errOut, code = runIn(t, nil, "incoming", "-s", dst.sock, "tcp:127.0.0.1:0")
	want("incoming", code, 0, out, errOut, "listening on tcp:127.0.0.1:")
	uri := strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(out), "listening on "))
	out, errOut, code = runIn(t, nil, "status", "-s", dst.sock)
	want("status of the listening destination", code, 0, out, errOut, "status  ", "setup", "incoming listening")

	// migrate stops at pre-switchover and says what to type; typing it
	// completes the migration.
	ctx, cancel := context.WithTimeout(context.Background(), hangGuard)
	defer cancel()
	mig := exec.CommandContext(ctx, binary, "migrate", "-s", src.sock, uri)
	var migOut bytes.Buffer
	mig.Stdout = &migOut
	migErr, err := mig.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := mig.Start(); err != nil {
		t.Fatal(err)
	}
	var migStderr strings.Builder
	sc := bufio.NewScanner(migErr)
	for sc.Scan() {
		migStderr.WriteString(sc.Text() + "\n")
		if strings.Contains(sc.Text(), "migctl migrate-continue -s "+src.sock+" pre-switchover") {
			break
		}
	}
	out, errOut, code = runIn(t, nil, "migrate-continue", "-s", src.sock)
	want("migrate-continue", code, 0, out, errOut, "continued from pre-switchover")
	rest, _ := io.ReadAll(migErr)
	migStderr.Write(rest)
	if err := mig.Wait(); err != nil {
		t.Fatalf("migrate: %v\nstdout: %s\nstderr: %s", err, migOut.String(), migStderr.String())
	}
	want("migrate", 0, 0, migOut.String(), migStderr.String(), "migration completed", "passes", "migctl cont -s "+src.sock)

	out, errOut, code = runIn(t, nil, "status", "-s", src.sock)
	want("status of the completed source", code, 0, out, errOut, "completed", "outgoing completed", "postmigrate")
	out, errOut, code = runIn(t, nil, "cont", "-s", src.sock)
	want("cont", code, 0, out, errOut, "guest running (running)")
	out, errOut, code = runIn(t, nil, "stop", "-s", src.sock)
	want("stop", code, 0, out, errOut, "guest paused (paused)")
	out, errOut, code = runIn(t, nil, "qmp", "-s", src.sock, `{"execute":"query-status"}`)
	want("qmp", code, 0, out, errOut, `"return"`, `"paused"`)
	out, errOut, code = runIn(t, nil, "qmp", "-s", src.sock, `{"execute":"no-such-command"}`)
	want("qmp no-such-command", code, exitFailed, out, errOut, "CommandNotFound")
	out, errOut, code = runIn(t, nil, "cancel", "-s", src.sock)
	want("cancel with nothing running", code, 0, out, errOut)
	// A migration to a port nobody listens on fails: exit 1 with why.
	out, errOut, code = runIn(t, nil, "migrate", "-s", src.sock, "tcp:127.0.0.1:1")
	want("migrate to a closed port", code, exitFailed, out, errOut, "migration failed")

	// events runs until a signal, its normal end: exit 0.
	ev := exec.CommandContext(ctx, binary, "events", "-s", src.sock)
	evErr, err := ev.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := ev.Start(); err != nil {
		t.Fatal(err)
	}
	line, _ := bufio.NewReader(evErr).ReadString('\n')
	if !strings.Contains(line, "connected") {
		t.Errorf("events said %q", line)
	}
	ev.Process.Signal(syscall.SIGINT)
	if err := ev.Wait(); err != nil {
		t.Errorf("events after SIGINT: %v, want exit 0", err)
	}
}

// QEMU's own qmp-shell in HMP mode (-H) against migctl serve: the
// commands an operator types, answered in QEMU's text.
func TestQMPShellHMP(t *testing.T) {
	py, err := qemutools.PythonDir()
	if err != nil {
		t.Skipf("QEMU's python tools are not available: %v", err)
	}
	dst := startServe(t, "dst", "--guest=size=16M", "--destination")
	_, _, code := runIn(t, nil, "incoming", "-s", dst.sock, "tcp:127.0.0.1:0")
	if code != 0 {
		t.Fatalf("incoming: exit %d", code)
	}
	ctx, cancel := context.WithTimeout(context.Background(), hangGuard)
	defer cancel()
	c := exec.CommandContext(ctx, "python3", "-m", "qemu.qmp.qmp_shell", "-H", dst.sock)
	c.Env = withEnv([]string{"PYTHONPATH=" + py, "HOME=" + t.TempDir()})
	c.Stdin = strings.NewReader("info migrate\ninfo status\ninfo migrate_capabilities\n")
	out, err := c.CombinedOutput()
	if err != nil {
		t.Fatalf("qmp-shell -H: %v\n%s", err, out)
	}
	for _, w := range []string{"Welcome to the HMP shell!", "Migration status: setup", "socket address: [", "\ttcp:127.0.0.1:", "VM status: paused (inmigrate)", "xbzrle: off"} {
		if !strings.Contains(string(out), w) {
			t.Errorf("qmp-shell -H output lacks %q:\n%s", w, out)
		}
	}
}

// The README documents the exit statuses this file asserts.
func TestExitStatusesDocumented(t *testing.T) {
	readme, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		code int
		word string
	}{{exitOK, "success"}, {exitFailed, "refused"}, {exitUsage, "usage"}, {exitInterrupted, "interrupted"}} {
		re := regexp.MustCompile(`(?m)^\| ` + strconv.Itoa(c.code) + ` \|[^\n]*` + c.word)
		if !re.Match(readme) {
			t.Errorf("README has no exit-status row for %d (%s)", c.code, c.word)
		}
	}
}

// docs/protocol.md's example refusal is the text a serve really sends
// (only the port differs).
func TestProtocolDocExample(t *testing.T) {
	doc, err := os.ReadFile("../../docs/protocol.md")
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?m)^\{"error":\{"class":"GenericError","desc":"capability mapped-ram[^\n]*$`).Find(doc)
	if m == nil {
		t.Fatal("docs/protocol.md has no example refusal of mapped-ram")
	}
	dst := startServe(t, "dst", "--guest=size=16M", "--destination")
	if _, errOut, code := runIn(t, nil, "incoming", "-s", dst.sock, "tcp:127.0.0.1:0"); code != 0 {
		t.Fatalf("incoming: %s", errOut)
	}
	out, _, code := runIn(t, nil, "qmp", "-s", dst.sock, `{"execute":"migrate-set-capabilities","arguments":{"capabilities":[{"capability":"mapped-ram","state":true}]}}`)
	real := regexp.MustCompile(`127\.0\.0\.1:[0-9]+`).ReplaceAllString(strings.TrimSpace(out), "127.0.0.1:41233")
	if code != exitFailed || real != string(m) {
		t.Errorf("exit %d\nserve sends: %s\ndocs show:   %s", code, real, m)
	}
}
