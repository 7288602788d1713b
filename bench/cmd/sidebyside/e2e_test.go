package main

import (
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/migctl/migctl"
	"github.com/migctl/migctl/spec"
)

var (
	buildOnce      sync.Once
	builtM, builtR string
	buildErr       error
	buildDir       string // removed by TestMain
)

// build builds migctl and rawcopy from this checkout once per test binary
// (binaries, as the campaign does).
func build(t *testing.T) (migctlBin, rawcopyBin string) {
	t.Helper()
	if testing.Short() {
		t.Skip("-short: the end-to-end tests build migctl and start real processes")
	}
	buildOnce.Do(func() {
		// One directory for the whole test binary: t.TempDir would be
		// removed with the first test.
		buildDir, buildErr = os.MkdirTemp("", "sidebyside-test-")
		if buildErr != nil {
			return
		}
		builtM, builtR, buildErr = binaries(t.Context(), options{}, buildDir, func(string, ...any) {})
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return builtM, builtR
}

// The driver measures every kind of configuration between real processes
// on a small guest: migctl serve pairs (plain, prepared, multifd ×4), raw
// streams, a raw write, and QEMU pairs when QEMU is installed. Each sample
// has the figures its kind must have, within bounds a correct run cannot
// miss.
func TestMeasureEndToEnd(t *testing.T) {
	m, r := build(t)
	const size = 32 << 20
	b := &bench{
		Size: size, Zero: 0.25, Backing: "anon", Dir: t.TempDir(), Migctl: m, Rawcopy: r,
		MaxBW: unlimitedBandwidth, Timeout: 2 * time.Minute, ReadyTimeout: time.Minute,
	}
	b.RandomBytes = int64(float64(size)*0.75) / pageBytes * pageBytes
	var err error
	if b.Data, err = planData(size, b.RandomBytes, layoutSpread); err != nil {
		t.Fatal(err)
	}
	want := []string{"migctl-plain", "migctl-prepared", "migctl-multifd4", "raw-1", "raw-4", "raw-write"}
	if q, err := exec.LookPath("qemu-system-x86_64"); err == nil {
		b.QEMU = q
		b.DataPath = b.Dir + "/guest-data.bin"
		if err := b.Data.write(b.DataPath); err != nil {
			t.Fatal(err)
		}
		want = append(want, "qemu-plain", "qemu-prealloc")
	} else {
		t.Log("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86): the QEMU configurations are not run")
	}
	byName := map[string]config{}
	for _, c := range configs {
		byName[c.Name] = c
	}
	readyRSS := map[string]uint64{} // destination VmRSS when ready, by configuration
	for _, name := range want {
		t.Run(name, func(t *testing.T) {
			c := byName[name]
			s := b.measure(t.Context(), c, 0)
			if s.Err != "" {
				t.Fatal(s.Err)
			}
			if s.Bytes < uint64(b.RandomBytes) || s.TotalMS <= 0 {
				t.Errorf("moved %d bytes in %v ms, want at least the %d random bytes", s.Bytes, s.TotalMS, b.RandomBytes)
			}
			migrates := c.Kind == kindQEMU || c.Kind == kindMigctl
			if migrates {
				if s.TrueDowntimeMS == nil || *s.TrueDowntimeMS <= 0 || s.EndToEndMS == nil || *s.EndToEndMS < *s.TrueDowntimeMS {
					t.Errorf("true downtime %v, end to end %v: want 0 < downtime ≤ end to end", s.TrueDowntimeMS, s.EndToEndMS)
				}
				if s.Settled == nil || s.DestStartMS == nil {
					t.Errorf("settled %v, destination start %v: want both measured", s.Settled, s.DestStartMS)
				}
				// A prepared destination (-mem-prealloc, prealloc=on)
				// holds all its RAM before the migration starts.
				if c.Prepare && s.DestReadyRSS < size {
					t.Errorf("prepared, but the destination's RSS when ready was %d for a %d-byte guest", s.DestReadyRSS, size)
				}
				readyRSS[name] = s.DestReadyRSS
			}
			if c.Kind == kindQEMU && (s.Verified == nil || !*s.Verified) {
				t.Errorf("QEMU's destination memory was not verified equal (verified: %v)", s.Verified != nil && *s.Verified)
			}
			if c.Kind != kindRawWrite {
				// A prepared destination has every page resident; any
				// destination has at least the random pages it received.
				floor := uint64(b.RandomBytes)
				if c.Prepare || c.Kind == kindRaw {
					floor = size
				}
				if s.DestPeakRSS < floor {
					t.Errorf("destination peak RSS %d, want at least %d", s.DestPeakRSS, floor)
				}
			}
		})
	}
	// A default destination holds almost none of its RAM when ready: the
	// prepared one of the same program holds about the guest's RAM more.
	for _, pair := range [][2]string{{"migctl-plain", "migctl-prepared"}, {"qemu-plain", "qemu-prealloc"}} {
		plain, okp := readyRSS[pair[0]]
		prepared, okq := readyRSS[pair[1]]
		if okp && okq && prepared < plain+size*9/10 {
			t.Errorf("destination RSS when ready: %s %d, %s %d; want the prepared one %d bytes more", pair[0], plain, pair[1], prepared, size*9/10)
		}
	}
}

// mapped-ram is measured exactly when migctl's spec honours it; when it
// refuses it, the reason printed names the capability.
func TestMappedRAMRefusal(t *testing.T) {
	m, _ := build(t)
	s, err := migctl.Spec()
	if err != nil {
		t.Fatal(err)
	}
	why := mappedRAMRefusal(t.Context(), m, t.TempDir())
	switch eff := s.Capability("mapped-ram").Effect; eff {
	case spec.EffectHonoured:
		if why != "" {
			t.Errorf("the spec honours mapped-ram but the driver would skip it: %s", why)
		}
	default:
		if !strings.Contains(why, "mapped-ram") {
			t.Errorf("the spec says mapped-ram is %s but the driver's reason is %q", eff, why)
		}
	}
}

// A whole campaign of one round of the raw configurations, through run:
// the report has its table and clocks, the JSON summary reads back and
// renders as markdown.
func TestRunRawCampaign(t *testing.T) {
	m, r := build(t)
	js := t.TempDir() + "/s.json"
	var out strings.Builder
	err := run(t.Context(), []string{"-size", "16M", "-n", "2", "-only", "raw-1,raw-4,raw-write",
		"-migctl", m, "-rawcopy", r, "-json", js}, &out, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"raw-1", "raw-4", "raw-write", "where each clock starts and stops", `"format": 1`,
		"not selected (-only)"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("the report lacks %q:\n%s", want, out.String())
		}
	}
	var md strings.Builder
	if err := run(t.Context(), []string{"-markdown", js}, &md, io.Discard); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(md.String(), "| raw: 1 TCP stream into pre-faulted memory | ") {
		t.Errorf("markdown lacks the raw-1 row:\n%s", md.String())
	}
}

// The spot check fails on a destination that holds other memory: here a
// QEMU that never received the migration.
func TestSpotCheckCatchesUnmigrated(t *testing.T) {
	if testing.Short() {
		t.Skip("-short: starts QEMU")
	}
	q, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		t.Skip("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
	}
	const size = 32 << 20
	b := &bench{Size: size, Dir: t.TempDir(), QEMU: q, Timeout: time.Minute, ReadyTimeout: time.Minute}
	if b.Data, err = planData(size, 24<<20, layoutSpread); err != nil {
		t.Fatal(err)
	}
	b.DataPath = b.Dir + "/guest-data.bin"
	if err := b.Data.write(b.DataPath); err != nil {
		t.Fatal(err)
	}
	c := config{Name: "qemu", Kind: kindQEMU}
	var ps [2]*proc
	for i, dest := range []bool{false, true} {
		sock := fmt.Sprintf("%s/%d.sock", b.Dir, i)
		p, err := startProc(t.Context(), fmt.Sprint("qemu ", i), b.sideArgs(c, dest, sock), sock, sock+".log", b.ReadyTimeout)
		if err != nil {
			t.Fatal(err)
		}
		defer p.stop()
		ps[i] = p
	}
	ok, err := b.spotCheck(t.Context(), ps[0], ps[0])
	if err != nil || !ok {
		t.Fatalf("the source against itself: %v, %v; want equal", ok, err)
	}
	ok, err = b.spotCheck(t.Context(), ps[0], ps[1])
	if err != nil || ok {
		t.Fatalf("a destination that was never migrated to: %v, %v; want a difference", ok, err)
	}
}
