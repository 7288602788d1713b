package main

import (
	"bytes"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/migctl/migctl/guest"
)

// The plain renderer (stderr not a terminal): a line at each change of
// status or pass, otherwise at most one a second; the percentage is of the
// RAM dirty when the pass began.
func TestProgressPlainLines(t *testing.T) {
	var buf bytes.Buffer
	pr := newProgress(&buf, false, false)
	now := time.Unix(1000, 0)
	pr.now = func() time.Time { return now }
	const mib = 1 << 20
	steps := []struct {
		after time.Duration
		snap  progressSnap
		want  string // "" means no line
	}{
		{0, progressSnap{Status: "setup"}, "setup\n"},
		{100 * time.Millisecond, progressSnap{Status: "active", Pass: 1, Total: 100 * mib, Remaining: 100 * mib, Rate: 50 * mib},
			"active         pass 1    0.0%  50 MiB/s  remaining 100 MiB  ETA 2.0 s\n"},
		{500 * time.Millisecond, progressSnap{Status: "active", Pass: 1, Total: 100 * mib, Remaining: 75 * mib, Rate: 50 * mib}, ""},
		{600 * time.Millisecond, progressSnap{Status: "active", Pass: 1, Total: 100 * mib, Remaining: 50 * mib, Rate: 50 * mib},
			"active         pass 1   50.0%  50 MiB/s  remaining 50 MiB  ETA 1.0 s\n"},
		// A new pass: its total is what is dirty now.
		{100 * time.Millisecond, progressSnap{Status: "active", Pass: 2, Total: 100 * mib, Remaining: 8 * mib, Rate: 80 * mib, ExpectedDowntime: 100 * time.Millisecond},
			"active         pass 2    0.0%  80 MiB/s  remaining 8 MiB  expected downtime 100 ms  ETA 100 ms\n"},
		{100 * time.Millisecond, progressSnap{Status: "device", Pass: 2, Total: 100 * mib, Remaining: 2 * mib, Rate: 80 * mib},
			"device         pass 2   75.0%  80 MiB/s  remaining 2 MiB  ETA 25 ms\n"},
	}
	for i, s := range steps {
		now = now.Add(s.after)
		buf.Reset()
		pr.update(s.snap)
		if got := buf.String(); got != s.want {
			t.Errorf("step %d: got %q, want %q", i, got, s.want)
		}
	}
	pr.finish(true)
	buf.Reset()
	q := newProgress(&buf, true, false)
	q.update(steps[1].snap)
	q.finish(true)
	if buf.Len() != 0 {
		t.Errorf("--quiet printed %q", buf.String())
	}
}

// The terminal renderer is an mpb bar carrying the same fields, with notes
// printed above it.
func TestProgressBar(t *testing.T) {
	var buf bytes.Buffer
	pr := newProgress(&buf, false, true)
	pr.update(progressSnap{Status: "active", Pass: 3, Total: 64 << 20, Remaining: 16 << 20, Rate: 32 << 20, ExpectedDowntime: 20 * time.Millisecond})
	if pr.bar == nil {
		t.Fatal("forceTTY did not make a bar")
	}
	pr.note("paused in pre-switchover")
	pr.update(progressSnap{Status: "active", Pass: 3, Total: 64 << 20, Remaining: 8 << 20, Rate: 32 << 20, ExpectedDowntime: 20 * time.Millisecond})
	pr.finish(true)
	out := buf.String()
	for _, want := range []string{"pass 3", "50.0%", "32 MiB/s", "remaining 8 MiB", "expected downtime 20 ms", "ETA 250 ms", "paused in pre-switchover", "["} {
		if !strings.Contains(out, want) {
			t.Errorf("bar output lacks %q:\n%q", want, out)
		}
	}
}

func TestFormatBytes(t *testing.T) {
	for n, want := range map[uint64]string{0: "0 B", 1023: "1023 B", 1024: "1 KiB", 1536: "1.5 KiB", 1 << 30: "1 GiB",
		3 << 29: "1.5 GiB", 100<<20 + 300<<10: "100.3 MiB", 1 << 40: "1 TiB"} {
		if got := formatBytes(n); got != want {
			t.Errorf("formatBytes(%d) = %q, want %q", n, got, want)
		}
	}
}

// One boolean vocabulary for every --cap and set-cap value.
func TestOnOffVocabulary(t *testing.T) {
	for _, c := range []struct {
		in       string
		on, ok   bool
		withName bool
	}{
		{"on", true, true, false}, {"ON", true, true, false}, {"yes", true, true, false}, {"true", true, true, false},
		{"off", false, true, false}, {"no", false, true, false}, {"False", false, true, false},
		{"maybe", false, false, false}, {"1", false, false, false},
	} {
		on, ok := parseOnOff(c.in, false)
		if on != c.on || ok != c.ok {
			t.Errorf("parseOnOff(%q) = %v, %v; want %v, %v", c.in, on, ok, c.on, c.ok)
		}
	}
	if _, on, err := parseCapArg("events"); err != nil || !on {
		t.Errorf("--cap events (no value) = %v, %v; want on", on, err)
	}
}

// The guest description: keys left out take the documented defaults (the
// README states them), the same for demo and serve.
func TestGuestDescription(t *testing.T) {
	const mib = 1 << 20
	for _, c := range []struct {
		in   string
		want guest.Config
	}{
		{"", guest.Config{Size: 1024 * mib, DirtyRate: 64 * mib, Seed: 1, Writers: 1, ZeroFraction: 0.1}},
		{"size=64M", guest.Config{Size: 64 * mib, DirtyRate: 64 * mib, Seed: 1, Writers: 1, ZeroFraction: 0.1}},
		{"size=64M,dirty-rate=0,seed=3,writers=4,zero=0,random=on", guest.Config{Size: 64 * mib, Seed: 3, Writers: 4, Random: true}},
		// The keys the demo hands its destination process too.
		{"size=64M,uuid=11111111-2222-3333-4444-555555555555,backing=memfd,prealloc=on", guest.Config{Size: 64 * mib, DirtyRate: 64 * mib, Seed: 1, Writers: 1, ZeroFraction: 0.1,
			UUID: guest.UUID{0x11, 0x11, 0x11, 0x11, 0x22, 0x22, 0x33, 0x33, 0x44, 0x44, 0x55, 0x55, 0x55, 0x55, 0x55, 0x55}, Backing: "memfd", Prealloc: true}},
	} {
		got, err := parseGuest(c.in)
		if err != nil || got != c.want {
			t.Errorf("parseGuest(%q) = %+v, %v; want %+v", c.in, got, err, c.want)
		}
		back, err := parseGuest(formatGuest(got))
		if err != nil || back != got {
			t.Errorf("formatGuest(%+v) = %q reads back as %+v, %v", got, formatGuest(got), back, err)
		}
	}
	if got, err := parseGuest("size=64M,runlog=/tmp/run.log"); err != nil || got.RunLogFile != "/tmp/run.log" {
		t.Errorf("parseGuest(runlog=) = %+v, %v", got, err)
	}
	for _, bad := range []string{"colour=blue", "size=0", "size=1000", "zero=2", "random=maybe", "size=1G,size=2G", "writers=-1", "seed", "runlog="} {
		if _, err := parseGuest(bad); err == nil {
			t.Errorf("parseGuest(%q) accepted", bad)
		}
	}
	readme, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(readme), "`"+guestDefaults+"`") {
		t.Errorf("README.md does not state the guest defaults %q", guestDefaults)
	}
}
