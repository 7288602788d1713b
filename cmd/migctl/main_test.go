package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	migctl "github.com/migctl/migctl"
	"github.com/migctl/migctl/engine"
	"github.com/migctl/migctl/guest"
	"github.com/migctl/migctl/internal/mutant"
	"github.com/migctl/migctl/machine"
	"github.com/migctl/migctl/spec"
)

// binary is the migctl built once for the tests that run it as a process.
var binary string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "migctl-test-")
	if err != nil {
		panic(err)
	}
	binary = filepath.Join(dir, "migctl")
	// Built with the test's own mutant tags, so a mutation test of a
	// behaviour the binary carries tests the mutant binary.
	build := exec.Command("go", "build", "-tags", strings.Join(mutant.Active, ","), "-o", binary, ".")
	build.Stderr = os.Stderr
	if err := build.Run(); err != nil {
		panic("build migctl: " + err.Error())
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

func run(t *testing.T, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	var o, e bytes.Buffer
	c := exec.Command(binary, args...)
	c.Stdout, c.Stderr = &o, &e
	err := c.Run()
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatalf("run %v: %v", args, err)
	}
	return o.String(), e.String(), code
}

// End-to-end migrations between two processes over every transport, with
// the guest dirtying memory throughout; the destination's checksum must
// equal the source's.
func TestDemoTransports(t *testing.T) {
	for _, tr := range []string{"tcp", "unix", "fd", "file", "exec"} {
		t.Run(tr, func(t *testing.T) {
			out, errOut, code := run(t, "demo", "--size", "32M", "--dirty-rate", "32M", "--transport", tr, "--json")
			var r demoResult
			if err := json.Unmarshal([]byte(out), &r); err != nil {
				t.Fatalf("demo --json printed %q (%v); stderr:\n%s", out, err, errOut)
			}
			if code != 0 || r.Status != "completed" || !r.Verified {
				t.Fatalf("exit %d, result %+v; stderr:\n%s", code, r, errOut)
			}
			if r.SourceChecksum != r.DestinationChecksum || r.PagesSent == 0 || r.Passes < 1 {
				t.Fatalf("implausible result %+v", r)
			}
			if r.DowntimeMS <= 0 || r.TotalTimeMS <= 0 {
				t.Fatalf("times not measured: %+v", r)
			}
		})
	}
}

// A must-match capability on at the source only: both sides fail at
// connect, the reason names the capability and both values, and the demo
// exits non-zero with the source guest still running.
func TestDemoMismatchFails(t *testing.T) {
	out, errOut, code := run(t, "demo", "--size", "16M", "--transport", "unix", "--json",
		"--cap", "return-path=on", "--destination-cap", "return-path=off")
	var r demoResult
	if err := json.Unmarshal([]byte(out), &r); err != nil {
		t.Fatalf("demo --json printed %q (%v); stderr:\n%s", out, err, errOut)
	}
	if code == 0 || r.Status != "failed" || r.Verified {
		t.Fatalf("exit %d, result %+v", code, r)
	}
	for _, want := range []string{"return-path", "source has it on", "destination has it off"} {
		if !strings.Contains(r.Error, want) {
			t.Errorf("error %q does not name %q", r.Error, want)
		}
	}
	if r.PagesSent > 0 && r.TransferredBytes > 1<<20 {
		t.Logf("source sent %d bytes before the refusal arrived", r.TransferredBytes)
	}
}

func TestValidateAndExplain(t *testing.T) {
	out, _, code := run(t, "validate")
	if code != 0 || !strings.Contains(out, "valid") {
		t.Fatalf("validate: exit %d, %q", code, out)
	}
	bad := filepath.Join(t.TempDir(), "bad.yaml")
	os.WriteFile(bad, []byte("version: 1\nstaets: []\n"), 0o644)
	_, errOut, code := run(t, "validate", bad)
	if code != 1 || !strings.Contains(errOut, "bad.yaml:2:1") {
		t.Fatalf("validate bad spec: exit %d, stderr %q", code, errOut)
	}
	out, _, code = run(t, "explain", "--transport", "rdma:0.0.0.0:4444", "--cap", "mapped-ram", "--side", "incoming")
	if code != 1 || !strings.Contains(out, "REFUSED") || !strings.Contains(out, "mapped-ram") || !strings.Contains(out, "rdma:0.0.0.0:4444") {
		t.Fatalf("explain mapped-ram over rdma: exit %d\n%s", code, out)
	}
	// The machine's own judgement: mapped-ram over file passes QEMU's rules
	// and migctl's data plane implements it (issue 8), so a real migrate is
	// allowed, and so is explain.
	out, _, code = run(t, "explain", "--transport", "file:/tmp/x", "--cap", "mapped-ram")
	if code != 0 || !strings.Contains(out, "allowed") || !strings.Contains(out, "mapped-ram=on  honoured") {
		t.Fatalf("explain mapped-ram over file: exit %d\n%s", code, out)
	}
	out, _, code = run(t, "explain", "--transport", "tcp:127.0.0.1:4444", "--cap", "pause-before-switchover")
	if code != 0 || !strings.Contains(out, "allowed") || !strings.Contains(out, "pause-before-switchover=on  honoured") {
		t.Fatalf("explain pause-before-switchover over tcp: exit %d\n%s", code, out)
	}
	out, _, code = run(t, "diagram", "--side", "incoming", "--format", "mermaid")
	if code != 0 || !strings.Contains(out, "stateDiagram-v2") || !strings.Contains(out, "transport-compatible") {
		t.Fatalf("diagram: exit %d\n%s", code, out)
	}
}

// The destination process killed mid-stream: the source ends failed with a
// reason, its guest running and its memory intact.
func TestDestinationKilledMidStream(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "m.sock")
	dest := exec.Command(binary, "demo-destination", "--size", "32M", "--listen", "unix:"+sock)
	out, err := dest.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := dest.Start(); err != nil {
		t.Fatal(err)
	}
	defer dest.Wait()
	defer dest.Process.Kill()
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil || !strings.Contains(line, "listening") {
		t.Fatalf("destination said %q (%v)", line, err)
	}

	g, err := guest.New(guest.Config{Size: 32 << 20, DirtyRate: 32 << 20, Seed: 1, ZeroFraction: 0.1})
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	g.Start()
	s, err := migctl.Spec()
	if err != nil {
		t.Fatal(err)
	}
	c, err := newController(s, g, false)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	// Slow enough to be killed in the middle.
	if err := c.SetParameters(ctx, map[string]any{"max-bandwidth": "8M"}); err != nil {
		t.Fatal(err)
	}
	sub := c.Subscribe(256)
	defer sub.Close()
	m, err := engine.Start(ctx, c, g, "unix:"+sock, engine.Options{SectionBytes: 1 << 20, StatsInterval: time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	for ev := range sub.C() {
		if ev.Kind == machine.EventStats && ev.Stats.Transferred > 4<<20 {
			break
		}
	}
	dest.Process.Kill()
	r, _ := m.Wait(ctx)
	if r.State != "failed" || r.Err == nil {
		t.Fatalf("source ended %s (%v)", r.State, r.Err)
	}
	if !g.Running() {
		t.Fatal("source guest not running after the destination died")
	}
	st, _ := c.Status(spec.Outgoing, 0)
	if st.Error == "" {
		t.Fatal("source failed without an error description")
	}
	g.Stop()
	if err := g.Verify(); err != nil {
		t.Fatalf("source memory after the failure: %v", err)
	}
	t.Logf("source error: %s", st.Error)
}

// A capability migctl's data plane does not implement is refused with a
// reason before anything moves, not silently ignored.
func TestDemoUnimplementedCapability(t *testing.T) {
	out, _, code := run(t, "demo", "--size", "16M", "--cap", "xbzrle=on", "--json")
	var r demoResult
	if err := json.Unmarshal([]byte(out), &r); err != nil {
		t.Fatalf("demo --json printed %q: %v", out, err)
	}
	if code == 0 || r.Verified || !strings.Contains(r.Error, "xbzrle") || !strings.Contains(r.Error, "does not implement") {
		t.Fatalf("exit %d, result %+v", code, r)
	}
}
