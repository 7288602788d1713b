package main

import (
	"bytes"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// binary is the migctl built once for the tests that run it as a process.
var binary string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "migctl-test-")
	if err != nil {
		panic(err)
	}
	binary = filepath.Join(dir, "migctl")
	build := exec.Command("go", "build", "-o", binary, ".")
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
	out, _, code = run(t, "explain", "--transport", "file:/tmp/x", "--cap", "mapped-ram")
	if code != 0 || !strings.Contains(out, "allowed") {
		t.Fatalf("explain mapped-ram over file: exit %d\n%s", code, out)
	}
	out, _, code = run(t, "diagram", "--side", "incoming", "--format", "mermaid")
	if code != 0 || !strings.Contains(out, "stateDiagram-v2") || !strings.Contains(out, "transport-compatible") {
		t.Fatalf("diagram: exit %d\n%s", code, out)
	}
}
