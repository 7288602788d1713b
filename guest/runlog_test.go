package guest

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestRunLogFile: every Start and Stop is a line, between the monotonic
// times taken around the call.
func TestRunLogFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "run.log")
	g, err := New(Config{Size: 1 << 20, DirtyRate: 1 << 20, Seed: 1, VRAM: -1, RunLogFile: path})
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	var around [4][2]int64
	for i := range 4 {
		around[i][0] = Monotonic()
		if i%2 == 0 {
			mustOK(t, g.Start())
			mustOK(t, g.Start()) // a second Start logs nothing
		} else {
			mustOK(t, g.Stop())
			mustOK(t, g.Stop())
		}
		around[i][1] = Monotonic()
	}
	spans, err := ReadRunLog(path)
	if err != nil {
		t.Fatal(err)
	}
	if len(spans) != 2 {
		t.Fatalf("spans %+v, want 2", spans)
	}
	for i, s := range spans {
		start, stop := around[2*i], around[2*i+1]
		if s.Start < start[0] || s.Start > start[1] || s.Stop < stop[0] || s.Stop > stop[1] {
			t.Errorf("span %d %+v: want start in %v and stop in %v", i, s, start, stop)
		}
	}
	// A guest built again on the same file appends.
	g2, err := New(Config{Size: 1 << 20, Seed: 1, VRAM: -1, RunLogFile: path})
	if err != nil {
		t.Fatal(err)
	}
	mustOK(t, g2.Start())
	mustOK(t, g2.Close()) // Close stops and logs it
	if spans, err = ReadRunLog(path); err != nil || len(spans) != 3 || spans[2].Stop == 0 {
		t.Fatalf("after a second guest: %+v, %v", spans, err)
	}
}

// runLogChild is the environment variable that makes the test binary the
// child of TestRunLogSurvivesKill.
const runLogChild = "MIGCTL_GUEST_RUNLOG_CHILD"

// TestRunLogSurvivesKill: a guest process killed with SIGKILL while its
// guest runs leaves its start line in the file (nothing waits in a user
// space buffer), so the interval reads as open.
func TestRunLogSurvivesKill(t *testing.T) {
	if path := os.Getenv(runLogChild); path != "" {
		g, err := New(Config{Size: 1 << 20, DirtyRate: 1 << 20, Seed: 1, VRAM: -1, RunLogFile: path})
		if err != nil {
			t.Fatal(err)
		}
		mustOK(t, g.Start())
		os.Stdout.WriteString("running\n")
		select {} // until killed
	}
	path := filepath.Join(t.TempDir(), "run.log")
	cmd := exec.Command(os.Args[0], "-test.run=^TestRunLogSurvivesKill$")
	cmd.Env = append(os.Environ(), runLogChild+"="+path)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 64)
	done := make(chan string, 1)
	go func() {
		n, _ := out.Read(buf)
		done <- string(buf[:n])
	}()
	select {
	case s := <-done:
		if !strings.Contains(s, "running") {
			cmd.Process.Kill()
			cmd.Wait()
			t.Fatalf("child said %q", s)
		}
	case <-time.After(30 * time.Second):
		cmd.Process.Kill()
		cmd.Wait()
		t.Fatal("the child did not start its guest")
	}
	mustOK(t, cmd.Process.Kill())
	cmd.Wait()
	spans, err := ReadRunLog(path)
	if err != nil {
		t.Fatal(err)
	}
	if len(spans) != 1 || spans[0].Stop != 0 || spans[0].Start <= 0 {
		t.Fatalf("run log of a killed guest: %+v, want one open span", spans)
	}
}

// TestParseRunLog: what a run log file may hold, and what is refused.
func TestParseRunLog(t *testing.T) {
	for _, c := range []struct {
		in   string
		want []Span
		err  string
	}{
		{in: "", want: nil},
		{in: "start 5\n", want: []Span{{5, 0}}},
		{in: "start 5\nstop 9\nstart 9\nstop 12\n", want: []Span{{5, 9}, {9, 12}}},
		{in: "start 5\nstop 9\nstart 10\n", want: []Span{{5, 9}, {10, 0}}},
		{in: "stop 5\n", err: "stop while stopped"},
		{in: "start 5\nstart 6\n", err: "start while running"},
		{in: "start 5\nstop 4\n", err: "before the previous"},
		{in: "start 5", err: "newline"},
		{in: "start\n", err: "want"},
		{in: "start -3\n", err: "want"},
		{in: "begin 5\n", err: "want"},
		{in: "start 5 6\n", err: "want"},
		{in: "start " + strings.Repeat("1", 80) + "\n", err: "longer than"},
		{in: strings.Repeat("x", 5000), err: "longer than"},
	} {
		got, err := ParseRunLog(strings.NewReader(c.in))
		if c.err != "" {
			if err == nil || !strings.Contains(err.Error(), c.err) {
				t.Errorf("%q: %v, want an error with %q", c.in, err, c.err)
			}
			continue
		}
		if err != nil || len(got) != len(c.want) {
			t.Errorf("%q: %+v, %v; want %+v", c.in, got, err, c.want)
			continue
		}
		for i := range got {
			if got[i] != c.want[i] {
				t.Errorf("%q: span %d %+v, want %+v", c.in, i, got[i], c.want[i])
			}
		}
	}
}

// FuzzParseRunLog: any bytes are refused or parsed into ordered spans of
// which only the last may be open.
func FuzzParseRunLog(f *testing.F) {
	f.Add([]byte("start 5\nstop 9\nstart 10\n"))
	f.Add([]byte("stop 1\n"))
	f.Add([]byte("start 99999999999999999999\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		spans, err := ParseRunLog(strings.NewReader(string(b)))
		if err != nil {
			return
		}
		var last int64
		for i, s := range spans {
			if s.Start < last || (s.Stop != 0 && s.Stop < s.Start) || (s.Stop == 0 && i != len(spans)-1) {
				t.Fatalf("spans %+v from %q", spans, b)
			}
			last = max(s.Start, s.Stop)
		}
	})
}
