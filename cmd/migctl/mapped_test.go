package main

import (
	"bytes"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// `migctl demo --transport file --cap mapped-ram=on` saves a guest that
// dirties memory throughout into a mapped-ram file and restores it in a
// fresh process, which verifies it; with multifd, four channels write (and
// read) the pages.
func TestDemoMappedRAM(t *testing.T) {
	for _, tc := range []struct {
		name string
		args []string
	}{
		{"single", nil},
		{"multifd-4", []string{"--cap", "multifd=on", "--param", "multifd-channels=4"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			args := append([]string{"demo", "--size", "32M", "--dirty-rate", "8M", "--transport", "file", "--cap", "mapped-ram=on", "--json"}, tc.args...)
			out, errOut, code := run(t, args...)
			var r demoResult
			if err := json.Unmarshal([]byte(out), &r); err != nil {
				t.Fatalf("demo --json printed %q (%v); stderr:\n%s", out, err, errOut)
			}
			if code != 0 || r.Status != "completed" || !r.Verified {
				t.Fatalf("exit %d, %+v; stderr:\n%s", code, r, errOut)
			}
			if r.PagesSent == 0 {
				t.Fatalf("no pages counted: %+v", r)
			}
		})
	}
}

// explainWithFD runs `migctl explain --transport fd:3` with f as the
// child's descriptor 3.
func explainWithFD(t *testing.T, f *os.File, args ...string) (string, int) {
	t.Helper()
	var o, e bytes.Buffer
	c := exec.Command(binary, append([]string{"explain", "--transport", "fd:3"}, args...)...)
	c.ExtraFiles = []*os.File{f}
	c.Stdout, c.Stderr = &o, &e
	err := c.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	return o.String() + e.String(), code
}

// `migctl explain --transport fd:N` judges the descriptor by what it is,
// with the probe migrate uses: mapped-ram over a regular file is allowed,
// over a socket refused by the rule that wants a seekable transport.
func TestExplainProbesFD(t *testing.T) {
	f, err := os.Create(filepath.Join(t.TempDir(), "saved.mig"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	out, code := explainWithFD(t, f, "--cap", "mapped-ram", "--cap", "multifd")
	if code != 0 || !strings.Contains(out, "allowed") {
		t.Fatalf("mapped-ram + multifd over fd: on a regular file: exit %d\n%s", code, out)
	}
	sp, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	a, b := os.NewFile(uintptr(sp[0]), "a"), os.NewFile(uintptr(sp[1]), "b")
	defer a.Close()
	defer b.Close()
	out, code = explainWithFD(t, a, "--cap", "mapped-ram")
	if code != 1 || !strings.Contains(out, "REFUSED  mapped-ram/needs-transport/seekable") {
		t.Fatalf("mapped-ram over fd: on a socket: exit %d\n%s", code, out)
	}
	// The socket's own property, found by the same probe: a return path.
	out, code = explainWithFD(t, a, "--cap", "return-path")
	if code != 0 {
		t.Fatalf("return-path over fd: on a socket: exit %d\n%s", code, out)
	}
	out, code = explainWithFD(t, f, "--cap", "return-path")
	if code != 1 || !strings.Contains(out, "return-path/needs-transport/return-path") {
		t.Fatalf("return-path over fd: on a regular file: exit %d\n%s", code, out)
	}
}
