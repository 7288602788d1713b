// Command sidebyside measures migctl against QEMU 7.2 and against raw
// copies on one machine, in one alternating run, and prints every figure
// as a median with its range and every comparison as a ratio against its
// baseline measured in the same rounds (issue 8's benchmark).
//
// From the module root:
//
//	go run ./bench/cmd/sidebyside                       # 1 GiB guest, 0.75 GiB random, 3 rounds
//	go run ./bench/cmd/sidebyside -size 2G -n 5         # the guest: 2 GiB holding 1.5 GiB random
//	go run ./bench/cmd/sidebyside -markdown result.json # docs/benchmarks.md rows from a saved summary
//
// It installs Debian's QEMU when qemu-system-x86_64 is missing (apt-get,
// as root), builds migctl and bench/cmd/rawcopy from this checkout, and
// runs every configuration of configs.go once per round, in the reverse
// order in odd rounds. Progress goes to stderr; the report, then the JSON
// summary, to stdout (and the summary to -json). bench/README.md says
// where each clock starts and stops.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/migctl/migctl/spec"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	interrupted := ctx.Err() != nil
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "sidebyside:", err)
		var ue usageError
		switch {
		case errors.As(err, &ue):
			os.Exit(2)
		case interrupted:
			os.Exit(130)
		}
		os.Exit(1)
	}
}

// usageError is a mistake in the command line (exit status 2).
type usageError struct{ msg string }

func (e usageError) Error() string { return e.msg }

// options are the command line.
type options struct {
	size, layout, backing, only, dir, jsonPath, markdown string
	migctl, rawcopy                                      string
	zero                                                 float64
	rounds                                               int
	noInstall, keep                                      bool
	timeout, readyTimeout                                time.Duration
}

func parseFlags(args []string, stderr io.Writer) (options, error) {
	var o options
	fs := flag.NewFlagSet("sidebyside", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&o.size, "size", "1G", "guest RAM (K/M/G suffixes; a multiple of 1 MiB); the issue's guest is 2G")
	fs.Float64Var(&o.zero, "zero", 0.25, "fraction of the guest's pages that are zero; the rest hold random bytes")
	fs.IntVar(&o.rounds, "n", 3, "alternating rounds: every figure is a median of this many runs")
	fs.StringVar(&o.backing, "backing", "anon", "migctl's guest RAM backing and the raw receiver's region: anon or memfd")
	fs.StringVar(&o.layout, "layout", layoutSpread, "QEMU guest data: spread (zero pages interleaved, like migctl's guest) or contiguous (mig.py's)")
	fs.StringVar(&o.only, "only", "", "comma-separated configurations to run (default all: "+strings.Join(configNames(), ",")+")")
	fs.StringVar(&o.dir, "dir", "", "scratch directory (default a new temporary one, removed at the end)")
	fs.BoolVar(&o.keep, "keep", false, "keep the scratch directory (logs of every process)")
	fs.StringVar(&o.jsonPath, "json", "sidebyside.json", "write the JSON summary here too (empty: stdout only)")
	fs.StringVar(&o.markdown, "markdown", "", "print docs/benchmarks.md rows from this saved JSON summary and exit")
	fs.StringVar(&o.migctl, "migctl", "", "migctl binary (default: built from this checkout)")
	fs.StringVar(&o.rawcopy, "rawcopy", "", "rawcopy binary (default: built from this checkout)")
	fs.BoolVar(&o.noInstall, "no-install", false, "fail instead of installing QEMU with apt-get when it is missing")
	fs.DurationVar(&o.timeout, "timeout", 5*time.Minute, "bound of one migration or raw copy")
	fs.DurationVar(&o.readyTimeout, "ready-timeout", 2*time.Minute, "bound of a process's start (its guest's preparation included)")
	if err := fs.Parse(args); err != nil {
		return o, usageError{err.Error()}
	}
	if fs.NArg() > 0 {
		return o, usageError{fmt.Sprintf("unexpected argument %q", fs.Arg(0))}
	}
	switch {
	case o.rounds < 1:
		return o, usageError{"-n: want at least 1"}
	case o.zero < 0 || o.zero >= 1:
		return o, usageError{"-zero: want a fraction in [0, 1)"}
	case o.backing != "anon" && o.backing != "memfd":
		return o, usageError{"-backing: want anon or memfd"}
	case o.layout != layoutSpread && o.layout != layoutContiguous:
		return o, usageError{"-layout: want spread or contiguous"}
	case o.timeout <= 0 || o.readyTimeout <= 0:
		return o, usageError{"-timeout and -ready-timeout: want positive durations"}
	}
	return o, nil
}

func configNames() []string {
	var n []string
	for _, c := range configs {
		n = append(n, c.Name)
	}
	return n
}

// selectConfigs returns the configurations -only names (all for "").
func selectConfigs(only string) ([]config, error) {
	if only == "" {
		return slices.Clone(configs), nil
	}
	want := map[string]bool{}
	for _, n := range strings.Split(only, ",") {
		n = strings.TrimSpace(n)
		if !slices.Contains(configNames(), n) {
			return nil, usageError{fmt.Sprintf("-only: unknown configuration %q (want %s)", n, strings.Join(configNames(), ", "))}
		}
		want[n] = true
	}
	var out []config
	for _, c := range configs {
		if want[c.Name] {
			out = append(out, c)
		}
	}
	return out, nil
}

// roundOrder is the order of round r: configs as given in even rounds,
// reversed in odd ones.
func roundOrder(cs []config, r int) []config {
	out := slices.Clone(cs)
	if r%2 == 1 {
		slices.Reverse(out)
	}
	return out
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	o, err := parseFlags(args, stderr)
	if err != nil {
		return err
	}
	if o.markdown != "" {
		data, err := os.ReadFile(o.markdown)
		if err != nil {
			return err
		}
		var sum summary
		if err := json.Unmarshal(data, &sum); err != nil {
			return fmt.Errorf("%s: %w", o.markdown, err)
		}
		if sum.Format != summaryFormat {
			return fmt.Errorf("%s: summary format %d, this program reads %d", o.markdown, sum.Format, summaryFormat)
		}
		printMarkdown(stdout, sum)
		return nil
	}
	size, err := spec.ParseSize(o.size)
	if err != nil || size == 0 || size%(1<<20) != 0 || size > 1<<40 {
		return usageError{fmt.Sprintf("-size %q: want a positive multiple of 1 MiB, e.g. 1G", o.size)}
	}
	cs, err := selectConfigs(o.only)
	if err != nil {
		return err
	}
	b := &bench{
		Size: int64(size), Zero: o.zero, Backing: o.backing, MaxBW: unlimitedBandwidth,
		Timeout: o.timeout, ReadyTimeout: o.readyTimeout,
	}
	b.RandomBytes = int64(float64(b.Size)*(1-o.zero)) / pageBytes * pageBytes
	if b.Data, err = planData(b.Size, b.RandomBytes, o.layout); err != nil {
		return usageError{err.Error()}
	}
	if err := checkMemory(b.Size, stderr); err != nil {
		return err
	}

	b.Dir = o.dir
	if b.Dir == "" {
		if b.Dir, err = os.MkdirTemp("", "sidebyside-"); err != nil {
			return err
		}
		if !o.keep {
			defer os.RemoveAll(b.Dir)
		}
	} else if err := os.MkdirAll(b.Dir, 0o700); err != nil {
		return err
	}
	logf := func(format string, a ...any) { fmt.Fprintf(stderr, "sidebyside: "+format+"\n", a...) }
	logf("scratch directory %s", b.Dir)

	needQEMU := slices.ContainsFunc(cs, func(c config) bool { return c.Kind == kindQEMU })
	if needQEMU {
		if b.QEMU, err = ensureQEMU(ctx, !o.noInstall, stderr); err != nil {
			return err
		}
	}
	if b.Migctl, b.Rawcopy, err = binaries(ctx, o, b.Dir, logf); err != nil {
		return err
	}
	skipped := map[string]string{}
	if slices.ContainsFunc(cs, func(c config) bool { return c.Kind == kindMappedRAM }) {
		if why := mappedRAMRefusal(ctx, b.Migctl, b.Dir); why != "" {
			skipped["migctl-mapped-ram"] = why
			logf("skipping migctl-mapped-ram: %s", why)
		}
	}
	if needQEMU {
		b.DataPath = filepath.Join(b.Dir, "guest-data.bin")
		logf("writing QEMU's guest data (%s, %s layout) to %s", fmtBytes(b.Data.Length), b.Data.Layout, b.DataPath)
		if err := b.Data.write(b.DataPath); err != nil {
			return err
		}
	}

	started := time.Now()
	var samples []sample
	for r := 0; r < o.rounds; r++ {
		for _, c := range roundOrder(cs, r) {
			if _, ok := skipped[c.Name]; ok {
				continue
			}
			if err := ctx.Err(); err != nil {
				return fmt.Errorf("interrupted in round %d: %w", r+1, err)
			}
			logf("round %d/%d: %s", r+1, o.rounds, c.Name)
			s := b.measure(ctx, c, r)
			samples = append(samples, s)
			logf("  %s", sampleLine(s))
		}
	}
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("interrupted: %w", err)
	}

	sum := summary{
		Tool: "bench/cmd/sidebyside", Format: summaryFormat, Started: started.UTC().Format(time.RFC3339),
		FinishedSec: time.Since(started).Seconds(), Command: "go run ./bench/cmd/sidebyside " + strings.Join(args, " "),
		Host: hostInfo(ctx, b), Clocks: clockTexts(), Skipped: skipped, Samples: samples,
		Params: params{
			GuestBytes: b.Size, ZeroFraction: b.Zero, RandomBytes: b.RandomBytes, Rounds: o.rounds, Backing: b.Backing,
			QEMULayout: b.Data.Layout, MaxBandwidth: b.MaxBW, Transport: "loopback TCP",
			Guest: "idle: migctl's guest dirty-rate=0; QEMU's guest runs its BIOS with no boot device; each source waited for " +
				"until it used < 5 % CPU over 0.5 s",
		},
	}
	for _, c := range cs {
		sum.Configs = append(sum.Configs, summarizeConfig(c, samples))
	}
	selected := map[string]bool{}
	for _, c := range cs {
		selected[c.Name] = true
	}
	for _, cmp := range comparisons {
		out := compare(cmp, samples)
		for _, side := range []string{cmp.Candidate, cmp.Baseline} {
			switch _, ok := skipped[side]; {
			case ok:
				out.Skipped = side + " skipped"
			case !selected[side]:
				out.Skipped = side + " not selected (-only)"
			}
		}
		sum.Comparisons = append(sum.Comparisons, out)
	}
	printText(stdout, sum)
	js, err := json.MarshalIndent(sum, "", "  ")
	if err != nil {
		return err
	}
	if o.jsonPath != "" {
		if err := os.WriteFile(o.jsonPath, append(js, '\n'), 0o644); err != nil {
			return err
		}
		fmt.Fprintf(stdout, "\nJSON summary (also written to %s; `-markdown %s` prints docs rows):\n", o.jsonPath, o.jsonPath)
	} else {
		fmt.Fprintln(stdout, "\nJSON summary:")
	}
	fmt.Fprintln(stdout, string(js))
	return nil
}

// sampleLine is one sample in the progress output.
func sampleLine(s sample) string {
	if s.Err != "" {
		return "FAILED: " + s.Err
	}
	var b strings.Builder
	if v, ok := s.value(metricThroughput); ok {
		fmt.Fprintf(&b, "%.2f GB/s (%s in %.0f ms)", v, fmtBytes(int64(s.Bytes)), s.TotalMS)
	}
	if s.TrueDowntimeMS != nil {
		fmt.Fprintf(&b, ", true downtime %.1f ms", *s.TrueDowntimeMS)
	}
	if s.DestStartMS != nil {
		fmt.Fprintf(&b, ", destination start %.0f ms", *s.DestStartMS)
	}
	if v, ok := s.value(metricRSSRatio); ok {
		fmt.Fprintf(&b, ", destination peak RSS %.3f×RAM", v)
	}
	if s.Settled != nil && !*s.Settled {
		b.WriteString(", SOURCE NOT IDLE before migrate")
	}
	if s.Verified != nil && !*s.Verified {
		b.WriteString(", DESTINATION MEMORY DIFFERS from the source's")
	}
	return b.String()
}

// ensureQEMU finds qemu-system-x86_64, installing Debian's QEMU when it is
// missing and install is set.
func ensureQEMU(ctx context.Context, install bool, stderr io.Writer) (string, error) {
	const bin = "qemu-system-x86_64"
	if p, err := exec.LookPath(bin); err == nil {
		return p, nil
	}
	pkgs := []string{"install", "-y", "--no-install-recommends", "qemu-system-x86", "qemu-utils"}
	how := "apt-get " + strings.Join(pkgs, " ")
	if !install {
		return "", fmt.Errorf("%s is not installed (-no-install): run `%s` as root", bin, how)
	}
	if os.Geteuid() != 0 {
		return "", fmt.Errorf("%s is not installed and this is not root: run `%s` as root, then again", bin, how)
	}
	apt := func(args ...string) error {
		cmd := exec.CommandContext(ctx, "apt-get", args...)
		cmd.Env = append(os.Environ(), "DEBIAN_FRONTEND=noninteractive")
		cmd.Stdout, cmd.Stderr = stderr, stderr
		return cmd.Run()
	}
	fmt.Fprintf(stderr, "sidebyside: %s is missing; running %s\n", bin, how)
	if err := apt(pkgs...); err != nil {
		fmt.Fprintln(stderr, "sidebyside: apt-get install failed; running apt-get update and trying once more")
		if err := apt("update"); err != nil {
			return "", fmt.Errorf("apt-get update: %w", err)
		}
		if err := apt(pkgs...); err != nil {
			return "", fmt.Errorf("%s: %w", how, err)
		}
	}
	return exec.LookPath(bin)
}

// binaries returns the migctl and rawcopy binaries: the flags', or built
// from this checkout into dir.
func binaries(ctx context.Context, o options, dir string, logf func(string, ...any)) (migctl, rawcopy string, err error) {
	migctl, rawcopy = o.migctl, o.rawcopy
	if migctl != "" && rawcopy != "" {
		return migctl, rawcopy, nil
	}
	out, err := exec.CommandContext(ctx, "go", "env", "GOMOD").Output()
	root := filepath.Dir(strings.TrimSpace(string(out)))
	if err != nil || strings.TrimSpace(string(out)) == "" || strings.TrimSpace(string(out)) == os.DevNull {
		return "", "", errors.New("not inside the migctl module: run from the checkout, or give -migctl and -rawcopy")
	}
	build := func(pkg, name string) (string, error) {
		dst := filepath.Join(dir, "bin", name)
		logf("building %s", pkg)
		cmd := exec.CommandContext(ctx, "go", "build", "-o", dst, pkg)
		cmd.Dir = root
		if out, err := cmd.CombinedOutput(); err != nil {
			return "", fmt.Errorf("go build %s: %w: %s", pkg, err, out)
		}
		return dst, nil
	}
	if migctl == "" {
		if migctl, err = build("./cmd/migctl", "migctl"); err != nil {
			return "", "", err
		}
	}
	if rawcopy == "" {
		if rawcopy, err = build("./bench/cmd/rawcopy", "rawcopy"); err != nil {
			return "", "", err
		}
	}
	return migctl, rawcopy, nil
}

// mappedRAMRefusal asks migctl whether it would save with mapped-ram to a
// file (`migctl explain --transport file:… --cap mapped-ram`); it returns
// why not, or "" when it would.
func mappedRAMRefusal(ctx context.Context, migctl, dir string) string {
	cmd := exec.CommandContext(ctx, migctl, "explain", "--transport", "file:"+filepath.Join(dir, "x"), "--cap", "mapped-ram")
	out, err := cmd.CombinedOutput()
	if err == nil {
		return ""
	}
	var reasons []string
	for _, l := range strings.Split(string(out), "\n") {
		if strings.HasPrefix(l, "REFUSED") {
			reasons = append(reasons, strings.Join(strings.Fields(l)[1:], " "))
		}
	}
	if len(reasons) == 0 {
		return fmt.Sprintf("`migctl explain --cap mapped-ram` failed (%v): %s", err, strings.TrimSpace(string(out)))
	}
	return "migctl refuses mapped-ram on file: (`migctl explain --transport file:/tmp/x --cap mapped-ram`): " + strings.Join(reasons, "; ")
}

// checkMemory warns when the host may not hold a configuration: a QEMU
// source holds its RAM plus the loader's copy of the data, and its
// destination the RAM again.
func checkMemory(size int64, stderr io.Writer) error {
	data, err := os.ReadFile("/proc/meminfo")
	if err != nil {
		return nil
	}
	avail, err := parseStatusKB(string(data), "MemAvailable")
	if err != nil {
		return nil
	}
	need := uint64(3*size) + 512<<20
	if avail < need {
		fmt.Fprintf(stderr, "sidebyside: warning: %s available (MemAvailable), a QEMU pair of this size needs about %s\n",
			fmtBytes(int64(avail)), fmtBytes(int64(need)))
	}
	return nil
}

// hostInfo records what the figures depend on.
func hostInfo(ctx context.Context, b *bench) map[string]string {
	h := map[string]string{"cpus": fmt.Sprint(runtime.NumCPU()), "go": runtime.Version()}
	first := func(name string, args ...string) string {
		out, err := exec.CommandContext(ctx, name, args...).Output()
		if err != nil {
			return "unknown (" + err.Error() + ")"
		}
		l, _, _ := strings.Cut(strings.TrimSpace(string(out)), "\n")
		return l
	}
	if b.QEMU != "" {
		h["qemu"] = first(b.QEMU, "--version")
	}
	h["migctl"] = first(b.Migctl, "version")
	h["commit"] = first("git", "describe", "--always", "--dirty", "--abbrev=12")
	for k, path := range map[string]string{
		"kernel":    "/proc/sys/kernel/osrelease",
		"thp":       "/sys/kernel/mm/transparent_hugepage/enabled",
		"thp_shmem": "/sys/kernel/mm/transparent_hugepage/shmem_enabled",
	} {
		if data, err := os.ReadFile(path); err == nil {
			h[k] = strings.TrimSpace(string(data))
		}
	}
	return h
}
