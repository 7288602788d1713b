package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/sys/unix"

	"github.com/migctl/migctl/engine"
	"github.com/migctl/migctl/guest"
	"github.com/migctl/migctl/host"
	"github.com/migctl/migctl/loaders"
	"github.com/migctl/migctl/machine"
	"github.com/migctl/migctl/spec"
	"github.com/migctl/migctl/transport"
)

// configFlags are --cap and --param, applied to a controller.
type configFlags struct {
	caps, params []string
	destCaps     []string // demo only: capabilities set on the destination alone
}

func (f *configFlags) add(cmd *cobra.Command) {
	cmd.Flags().StringArrayVar(&f.caps, "cap", nil, "capability `NAME=on|off`, set on both sides (repeatable; also yes|no, true|false)")
	cmd.Flags().StringArrayVar(&f.params, "param", nil, "parameter `NAME=VALUE`, set on both sides (repeatable; sizes take K/M/G)")
}

func (f *configFlags) args() []string {
	var a []string
	for _, c := range append(slices.Clone(f.caps), f.destCaps...) {
		a = append(a, "--cap", c)
	}
	for _, p := range f.params {
		a = append(a, "--param", p)
	}
	return a
}

// demoConfig is what --cap and --param ask for, checked against the spec.
type demoConfig struct {
	caps   map[string]bool
	params map[string]any
}

// check parses and checks every --cap and --param against the spec
// (names, the boolean vocabulary, each parameter's type and range), as a
// usage error, before anything is prepared. Unless the user set
// max-bandwidth, the demo lifts QEMU's default 128 MiB/s limit.
func (f *configFlags) check(s *spec.Spec, withDest bool) (demoConfig, error) {
	dc := demoConfig{caps: map[string]bool{}, params: map[string]any{"max-bandwidth": "0"}}
	list := f.caps
	if withDest {
		list = append(slices.Clone(f.caps), f.destCaps...)
	}
	for _, c := range list {
		name, on, err := parseCapArg(c)
		if err != nil {
			return dc, &usageError{err: err}
		}
		if s.Capability(name) == nil {
			return dc, usagef("--cap %s: unknown capability (`migctl info` or docs/rules.md lists them)", name)
		}
		dc.caps[name] = on
	}
	for _, p := range f.params {
		name, val, ok := strings.Cut(p, "=")
		if !ok {
			return dc, usagef("--param %q: want NAME=VALUE", p)
		}
		par := s.Parameter(name)
		if par == nil {
			return dc, usagef("--param %s: unknown parameter (`migctl info` or docs/rules.md lists them)", name)
		}
		v, err := par.Normalize(val)
		if err != nil {
			return dc, usagef("--param %s=%s: %v (expects %s)", name, val, err, par.Range())
		}
		dc.params[name] = v
	}
	return dc, nil
}

// apply sets the checked capabilities and parameters on a controller.
func (dc demoConfig) apply(ctx context.Context, c *machine.Controller) error {
	if len(dc.caps) > 0 {
		if err := c.SetCapabilities(ctx, dc.caps); err != nil {
			return err
		}
	}
	return c.SetParameters(ctx, dc.params)
}

// newController builds the controller a migctl process runs with: the
// spec, this host's features, and the guest's facts (page size, identity)
// that the connect guard compares with the peer's. incoming makes it a
// destination (QEMU's -incoming): its guest waits for an incoming
// migration. The demo and serve use it alike.
func newController(s *spec.Spec, g guest.Guest, incoming bool) (*machine.Controller, error) {
	ps := "4096"
	if bs := g.Blocks(); len(bs) > 0 {
		ps = strconv.Itoa(bs[0].PageSize)
	}
	return machine.New(s, machine.Options{
		Features: host.Features(),
		Facts:    map[string]string{"page-size": ps, "guest": g.ID()},
		Incoming: incoming,
	})
}

// demoResult is what `migctl demo --json` prints.
type demoResult struct {
	Status         string  `json:"status"`
	Transport      string  `json:"transport"`
	SizeBytes      uint64  `json:"size_bytes"`
	DirtyRateBytes uint64  `json:"dirty_rate_bytes_s"`
	TotalTimeMS    float64 `json:"total_time_ms"`
	// DowntimeMS is QEMU's downtime: source stop → its last byte sent.
	DowntimeMS float64 `json:"downtime_ms"`
	// TrueDowntimeMS is the guest's: source stop → the destination's guest
	// ready to run (its stop and start stamps, exact on one host;
	// TrueDowntimeExact), 0 without a back channel (file, exec).
	TrueDowntimeMS    float64 `json:"true_downtime_ms"`
	TrueDowntimeExact bool    `json:"true_downtime_exact"`
	// PrepareMS is the destination's memory preparation (--guest
	// prealloc=on: every page faulted in before it listens, as QEMU's
	// -mem-prealloc), apart from the transfer; 0 without it.
	PrepareMS           float64 `json:"prepare_ms"`
	ThroughputMiBs      float64 `json:"throughput_mib_s"`
	Passes              uint64  `json:"passes"`
	PagesSent           uint64  `json:"pages_sent"`
	PagesZero           uint64  `json:"pages_zero"`
	TransferredBytes    uint64  `json:"transferred_bytes"`
	SourceChecksum      string  `json:"source_checksum"`
	DestinationChecksum string  `json:"destination_checksum"`
	// DestinationOverheadPct is the destination process's peak RSS beyond
	// its guest's RAM, as a percentage of the guest's RAM.
	DestinationOverheadPct float64 `json:"destination_rss_overhead_pct"`
	Verified               bool    `json:"verified"`
	Error                  string  `json:"error,omitempty"`
	// RDMAProvider is the RDMA provider of an rdma: migration (the
	// source's query-migrate x-migctl-rdma-provider).
	RDMAProvider string `json:"rdma_provider,omitempty"`
	// DestinationCPUSeconds is the CPU time (user + system, all threads:
	// getrusage RUSAGE_SELF) the destination process spent from listening
	// to its report after loading.
	DestinationCPUSeconds float64 `json:"destination_cpu_s"`
}

func newDemo() *cobra.Command {
	var gf guestFlags
	var cf configFlags
	var transportName, rdmaProvider string
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "demo [--guest size=1G,dirty-rate=64M] [--transport tcp|unix|fd|file|exec|rdma] [--rdma-provider verbs|soft] [--cap NAME=on]... [--param NAME=VALUE]...",
		Short: "Migrate the built-in guest between two processes and verify the result",
		Long: "demo starts a second migctl process as the destination, migrates a running built-in guest to it\n" +
			"(over loopback TCP by default) with live progress, then prints a summary and checks that the\n" +
			"destination's memory and device state equal the source's. Exit status 0 only when verified.\n" +
			"The demo lifts QEMU's default 128 MiB/s bandwidth limit unless --param max-bandwidth=… is given.\n\n" +
			"Every flag is checked against the spec before any guest memory is prepared, and the host must have\n" +
			"about twice the guest's RAM available (source and destination each hold a copy).\n\n" +
			"With --cap pause-before-switchover=on the source pauses in pre-switchover before its last pass, as\n" +
			"QEMU does; the demo shows the pause and sends migrate-continue itself (on a `migctl serve` the\n" +
			"operator types `migctl migrate-continue`).\n\n" +
			"--transport rdma migrates over rdma:127.0.0.1 with the --rdma-provider given (verbs by default, which\n" +
			"needs an RDMA device and a binary built with -tags rdma_verbs; soft runs RDMA's semantics over TCP).\n" +
			"There is no fallback between them: without a device, verbs fails and says why.\n\n" + guestHelp,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			// Everything the flags say is checked first: a typo costs
			// no time and no memory.
			cfg, err := gf.config(cmd)
			if err != nil {
				return &usageError{err: err}
			}
			if !slices.Contains(demoTransports, transportName) {
				return usagef("--transport %q: want %s", transportName, strings.Join(demoTransports, ", "))
			}
			if err := checkRDMAProvider(rdmaProvider); err != nil {
				return err
			}
			s, err := loadSpec(cmd, nil)
			if err != nil {
				printSpecErrors(cmd.ErrOrStderr(), err)
				return &exitError{code: exitFailed}
			}
			if _, err := cf.check(s, true); err != nil {
				return err
			}
			dc, _ := cf.check(s, false)
			if err := checkHostMemory(cfg); err != nil {
				fmt.Fprintln(cmd.ErrOrStderr(), "migctl demo:", err)
				return &exitError{code: exitFailed}
			}
			specPath, _ := cmd.Flags().GetString("spec")
			pr := newProgress(cmd.ErrOrStderr(), quiet(cmd), false)
			res, err := runDemo(cmd.Context(), s, specPath, cfg, &cf, dc, demoTransport{name: transportName, rdmaProvider: rdmaProvider}, pr)
			if cmd.Context().Err() != nil {
				// Interrupted: no summary, no verdict (nothing was
				// verified, nothing failed); main says "interrupted".
				return errInterrupted
			}
			if err != nil && res.Error == "" {
				res.Error = err.Error()
			}
			if asJSON {
				enc := json.NewEncoder(cmd.OutOrStdout())
				enc.SetIndent("", "  ")
				_ = enc.Encode(res)
			} else {
				printSummary(cmd.OutOrStdout(), res)
			}
			if err != nil {
				if !asJSON {
					fmt.Fprintln(cmd.ErrOrStderr(), "migctl demo:", err)
				}
				return &exitError{code: exitFailed}
			}
			if !res.Verified {
				return &exitError{code: exitFailed}
			}
			return nil
		},
	}
	gf.add(cmd, true)
	cf.add(cmd)
	cmd.Flags().StringArrayVar(&cf.destCaps, "destination-cap", nil, "capability `NAME=on|off` set on the destination only, after --cap (shows how a mismatch fails)")
	cmd.Flags().StringVar(&transportName, "transport", "tcp", "`NAME`: tcp, unix, fd (a socketpair), file (save, then restore), exec (cat > file, then cat file) or rdma (see --rdma-provider)")
	addRDMAProviderFlag(cmd.Flags(), &rdmaProvider)
	cmd.Flags().BoolVar(&asJSON, "json", false, "print one JSON object instead of the summary (progress still goes to stderr)")
	return cmd
}

// demoTransports are the demo's --transport values.
var demoTransports = []string{"tcp", "unix", "fd", "file", "exec", "rdma"}

// demoTransport is the demo's choice of transport.
type demoTransport struct {
	name         string // a demoTransports value
	rdmaProvider string // --rdma-provider
}

// checkHostMemory refuses a demo the host cannot hold: the source and the
// destination each hold the guest's RAM, so it needs about twice it
// available (MemAvailable in /proc/meminfo).
func checkHostMemory(cfg guest.Config) error {
	ram := uint64(cfg.Size) + guest.DefaultVRAM
	need := 2 * ram
	avail, err := memAvailable()
	if err != nil {
		return nil // not Linux's /proc: nothing to check against
	}
	if need > avail {
		return fmt.Errorf("the demo needs about %s of memory (twice the %s guest: the source and the destination each hold it), "+
			"but this host has %s available (MemAvailable in /proc/meminfo); use a smaller --guest size=…",
			formatBytes(need), formatBytes(uint64(cfg.Size)), formatBytes(avail))
	}
	return nil
}

// memAvailable reads MemAvailable from /proc/meminfo.
func memAvailable() (uint64, error) {
	data, err := os.ReadFile("/proc/meminfo")
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(data), "\n") {
		if rest, ok := strings.CutPrefix(line, "MemAvailable:"); ok {
			kb, err := strconv.ParseUint(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(rest), "kB")), 10, 64)
			if err != nil {
				return 0, fmt.Errorf("/proc/meminfo: MemAvailable %q: %w", rest, err)
			}
			return kb << 10, nil
		}
	}
	return 0, errors.New("/proc/meminfo has no MemAvailable")
}

func printSummary(w io.Writer, r demoResult) {
	if r.SourceChecksum == "" && r.TotalTimeMS == 0 {
		return // the migration never started; the error says why
	}
	if r.RDMAProvider != "" {
		fmt.Fprintf(w, "\nmigration %s over %s (RDMA provider %s)\n", r.Status, r.Transport, r.RDMAProvider)
	} else {
		fmt.Fprintf(w, "\nmigration %s over %s\n", r.Status, r.Transport)
	}
	fmt.Fprintf(w, "  guest          %s, dirtying %s\n", formatBytes(r.SizeBytes), formatRate(float64(r.DirtyRateBytes)))
	fmt.Fprintf(w, "  total time     %.0f ms\n", r.TotalTimeMS)
	fmt.Fprintf(w, "  downtime       %.1f ms (QEMU's: guest stopped on the source → its last byte sent)\n", r.DowntimeMS)
	if r.TrueDowntimeMS > 0 {
		how := "the destination's confirmation arrived (an upper bound)"
		if r.TrueDowntimeExact {
			how = "the destination's guest ready to run (both processes' monotonic clocks)"
		}
		fmt.Fprintf(w, "  true downtime  %.1f ms (guest stopped on the source → %s)\n", r.TrueDowntimeMS, how)
	}
	if r.PrepareMS > 0 {
		fmt.Fprintf(w, "  preparation    %.0f ms (the destination faulted in its memory before it listened; not in the total)\n", r.PrepareMS)
	}
	fmt.Fprintf(w, "  throughput     %s\n", formatRate(r.ThroughputMiBs*(1<<20)))
	fmt.Fprintf(w, "  passes         %d\n", r.Passes)
	fmt.Fprintf(w, "  pages          %d sent, %d zero\n", r.PagesSent, r.PagesZero)
	fmt.Fprintf(w, "  checksums      source %s, destination %s\n", r.SourceChecksum, r.DestinationChecksum)
	fmt.Fprintf(w, "  destination    peak RSS %.1f%% above guest RAM\n", r.DestinationOverheadPct)
	if r.Verified {
		fmt.Fprintln(w, "  verified       yes: the destination's memory and devices equal the source's")
	} else {
		fmt.Fprintln(w, "  verified       NO")
	}
	if r.Error != "" {
		fmt.Fprintf(w, "  error          %s\n", r.Error)
	}
}

// destProc is the destination process of the demo.
type destProc struct {
	cmd    *exec.Cmd
	lines  chan destLine
	stderr strings.Builder
}

// destLine is one JSON line the destination prints.
type destLine struct {
	Event    string `json:"event"` // listening | done
	URI      string `json:"uri,omitempty"`
	State    string `json:"state,omitempty"` // the incoming side's final state (done)
	Checksum string `json:"checksum,omitempty"`
	Error    string `json:"error,omitempty"`
	// PeakRSS is the destination process's peak resident set (VmHWM).
	PeakRSS uint64 `json:"peak_rss,omitempty"`
	// CPUSeconds is the CPU time the destination process has used so far
	// (user + system, every thread: getrusage RUSAGE_SELF).
	CPUSeconds float64 `json:"cpu_s,omitempty"`
	// PrepareMS is the guest's memory preparation before it listened
	// (listening; guest.Builtin.PrepareTime).
	PrepareMS float64 `json:"prepare_ms,omitempty"`
}

func startDest(ctx context.Context, args []string, extra []*os.File) (*destProc, error) {
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	d := &destProc{lines: make(chan destLine, 4)}
	d.cmd = exec.CommandContext(ctx, self, append([]string{"demo-destination"}, args...)...)
	// On an interrupt the destination is asked to stop (it aborts its
	// incoming migration), then killed if it has not within WaitDelay.
	d.cmd.Cancel = func() error { return d.cmd.Process.Signal(syscall.SIGTERM) }
	d.cmd.WaitDelay = 10 * time.Second
	d.cmd.ExtraFiles = extra
	d.cmd.Stderr = &d.stderr
	out, err := d.cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := d.cmd.Start(); err != nil {
		return nil, fmt.Errorf("start the destination process: %w", err)
	}
	go func() {
		defer close(d.lines)
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			var l destLine
			if json.Unmarshal(sc.Bytes(), &l) == nil {
				d.lines <- l
			}
		}
	}()
	return d, nil
}

// next waits for the destination's next line of the given event, at most
// destReportTimeout; ctx's end stops the process (startDest) and so the
// wait.
func (d *destProc) next(ctx context.Context, event string) (destLine, error) {
	timer := time.NewTimer(destReportTimeout)
	defer timer.Stop()
	for {
		select {
		case l, ok := <-d.lines:
			if !ok {
				_ = d.cmd.Wait()
				if err := ctx.Err(); err != nil {
					return destLine{}, err
				}
				return destLine{}, fmt.Errorf("the destination process ended without reporting %q: %s", event, strings.TrimSpace(d.stderr.String()))
			}
			if l.Event == event {
				return l, nil
			}
			if l.Event == "done" && l.Error != "" {
				return l, fmt.Errorf("the destination failed: %s", l.Error)
			}
		case <-timer.C:
			_ = d.cmd.Process.Kill()
			return destLine{}, fmt.Errorf("the destination did not report %q within %s; it was killed", event, destReportTimeout)
		}
	}
}

func (d *destProc) wait() { _ = d.cmd.Wait() }

// Bounds of the demo's waits. A migration itself is unbounded (it ends by
// converging, failing or an interrupt); these bound the waits around it.
const (
	// destReportTimeout bounds waiting for the destination's listening or
	// done line once it has what it needs.
	destReportTimeout = 5 * time.Minute
	// cancelTimeout bounds the wind-down after an interrupt.
	cancelTimeout = 30 * time.Second
)

func runDemo(ctx context.Context, s *spec.Spec, specPath string, cfg guest.Config, cf *configFlags, dc demoConfig, dt demoTransport, pr *progress) (demoResult, error) {
	transportName := dt.name
	res := demoResult{Transport: transportName, SizeBytes: uint64(cfg.Size), DirtyRateBytes: uint64(cfg.DirtyRate)}
	if !pr.quiet {
		fmt.Fprintf(pr.w, "preparing a %s guest (pre-faulting and filling memory)...\n", formatBytes(uint64(cfg.Size)))
	}
	g, err := guest.New(cfg)
	if err != nil {
		return res, err
	}
	defer g.Close()
	if err := ctx.Err(); err != nil {
		return res, err
	}
	if err := g.Start(); err != nil {
		return res, err
	}
	c, err := newController(s, g, false)
	if err != nil {
		return res, err
	}
	defer c.Close()
	if err := dc.apply(ctx, c); err != nil {
		return res, err
	}

	tmp, err := os.MkdirTemp("", "migctl-demo-")
	if err != nil {
		return res, err
	}
	defer os.RemoveAll(tmp)
	destArgs := append([]string{"--guest", formatGuest(cfg), "--rdma-provider", dt.rdmaProvider}, cf.args()...)
	if specPath != "" {
		destArgs = append(destArgs, "--spec", specPath) // both ends judge by the same rules
	}
	var dest *destProc
	var srcURI string
	var extra []*os.File
	switch transportName {
	case "tcp", "unix", "fd", "rdma":
		listen := "tcp:127.0.0.1:0"
		if transportName == "rdma" {
			listen = "rdma:127.0.0.1:0"
		}
		if transportName == "unix" {
			listen = "unix:" + filepath.Join(tmp, "migration.sock")
		}
		if transportName == "fd" {
			fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
			if err != nil {
				return res, err
			}
			mine := os.NewFile(uintptr(fds[0]), "migration-source")
			theirs := os.NewFile(uintptr(fds[1]), "migration-destination")
			defer mine.Close()
			extra = []*os.File{theirs}
			listen = "fd:3"
			srcURI = fmt.Sprintf("fd:%d", fds[0])
		}
		dest, err = startDest(ctx, append(destArgs, "--listen", listen), extra)
		for _, f := range extra {
			f.Close()
		}
		if err != nil {
			return res, err
		}
		defer dest.wait()
		l, err := dest.next(ctx, "listening")
		if err != nil {
			return res, err
		}
		if srcURI == "" {
			srcURI = l.URI
		}
		res.DestinationCPUSeconds = -l.CPUSeconds
		res.PrepareMS = l.PrepareMS
	case "file":
		srcURI = "file:" + filepath.Join(tmp, "guest.mig")
	case "exec":
		srcURI = "exec:cat > " + filepath.Join(tmp, "guest.mig")
	default:
		return res, usagef("--transport %q: want %s", transportName, strings.Join(demoTransports, ", "))
	}

	sub := c.Subscribe(256)
	m, err := engine.Start(ctx, c, g, srcURI, engine.Options{Checksum: g.Checksum, Transport: &transport.Config{RDMAProvider: dt.rdmaProvider}})
	if err != nil {
		sub.Close()
		return res, fmt.Errorf("migrate %s: %w", srcURI, err)
	}
	sr, err := followDemo(ctx, c, m, sub, pr)
	sub.Close()
	pr.finish(err == nil && sr.Err == nil)
	if err != nil {
		return res, err
	}
	st := sr.Stats
	res.TotalTimeMS = float64(st.TotalTime.Microseconds()) / 1000
	res.DowntimeMS = float64(st.Downtime.Microseconds()) / 1000
	res.TrueDowntimeMS = float64(st.TrueDowntime.Microseconds()) / 1000
	res.TrueDowntimeExact = st.TrueDowntimeExact
	if secs := st.TotalTime.Seconds(); secs > 0 {
		res.ThroughputMiBs = float64(st.Transferred) / secs / (1 << 20)
	}
	res.Passes, res.PagesSent, res.PagesZero, res.TransferredBytes = st.DirtySyncCount, st.Normal, st.Duplicate, st.Transferred
	res.SourceChecksum = fmt.Sprintf("%016x", st.Checksum)
	res.RDMAProvider = st.RDMAProvider
	res.Status = string(sr.State)
	if sr.Err != nil {
		res.Error = sr.Err.Error()
		return res, fmt.Errorf("the source ended %s: %v", sr.State, sr.Err)
	}
	if transportName == "file" || transportName == "exec" {
		restore := "file:" + filepath.Join(tmp, "guest.mig")
		if transportName == "exec" {
			restore = "exec:cat " + filepath.Join(tmp, "guest.mig")
		}
		if !pr.quiet {
			fmt.Fprintf(pr.w, "restoring from %s in a fresh process...\n", restore)
		}
		dest, err = startDest(ctx, append(destArgs, "--listen", restore), nil)
		if err != nil {
			return res, err
		}
		defer dest.wait()
		l, err := dest.next(ctx, "listening")
		if err != nil {
			return res, err
		}
		res.DestinationCPUSeconds = -l.CPUSeconds
	}
	done, err := dest.next(ctx, "done")
	if err != nil {
		return res, err
	}
	res.DestinationChecksum = done.Checksum
	res.DestinationCPUSeconds += done.CPUSeconds
	if done.PeakRSS > 0 {
		ram := uint64(0)
		for _, b := range g.Blocks() {
			ram += uint64(len(b.Mem))
		}
		res.DestinationOverheadPct = (float64(done.PeakRSS) - float64(ram)) / float64(ram) * 100
	}
	res.Status = done.State
	if done.Error != "" {
		res.Error = done.Error
		return res, fmt.Errorf("the destination ended %s: %s", done.State, done.Error)
	}
	res.Verified = res.DestinationChecksum == res.SourceChecksum && st.Checksum != 0
	if !res.Verified {
		return res, fmt.Errorf("checksums differ: source %s, destination %s", res.SourceChecksum, res.DestinationChecksum)
	}
	return res, nil
}

// followDemo renders the source's progress from the controller's events
// until the migration ends. At pre-switchover (capability
// pause-before-switchover) it says so and continues the migration itself,
// as the operator would with migrate-continue. When ctx ends (SIGINT,
// SIGTERM) it cancels the migration, waits a bounded time for it to wind
// down and returns ctx's error.
func followDemo(ctx context.Context, c *machine.Controller, m *engine.Migration, sub *machine.Subscription, pr *progress) (engine.Result, error) {
	state, _ := c.State(spec.Outgoing)
	var st machine.Stats
	show := func() {
		pr.update(progressSnap{Status: string(state), Pass: st.DirtySyncCount, Transferred: st.Transferred,
			Remaining: st.Remaining, Total: st.Total, Rate: st.Mbps * 1e6 / 8, ExpectedDowntime: st.ExpectedDowntime})
	}
	events := sub.C()
	for {
		select {
		case ev, ok := <-events:
			if !ok {
				events = nil // closed (overflow): wait for the end alone
				continue
			}
			if ev.Side != spec.Outgoing {
				continue
			}
			switch ev.Kind {
			case machine.EventStats:
				st = *ev.Stats
				show()
			case machine.EventState:
				state = ev.To
				show()
				if ev.To == machine.StatePreSwitchover {
					pr.note("paused in %s (capability pause-before-switchover): the guest is stopped and its last pass waits; "+
						"the demo continues by itself, as `migctl migrate-continue %s` would on a serve", ev.To, ev.To)
					if err := m.Continue(ctx); err != nil && ctx.Err() == nil {
						return engine.Result{}, fmt.Errorf("migrate-continue: %w", err)
					}
				}
			}
		case <-m.Done():
			r, _ := m.Wait(context.Background()) // Done is closed: returns at once
			return r, nil
		case <-ctx.Done():
			cctx, cancel := context.WithTimeout(context.Background(), cancelTimeout)
			defer cancel()
			_ = m.Cancel(cctx)
			_, _ = m.Wait(cctx)
			return engine.Result{}, ctx.Err()
		}
	}
}

// newDemoDestination is the destination half of the demo, run as a child
// process: it listens (or reads a file), loads, verifies and reports JSON
// lines on stdout.
func newDemoDestination() *cobra.Command {
	var gf guestFlags
	var cf configFlags
	var listen, rdmaProvider string
	cmd := &cobra.Command{
		Use:    "demo-destination",
		Short:  "The destination process of `migctl demo` (internal)",
		Hidden: true,
		Args:   cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			out := json.NewEncoder(cmd.OutOrStdout())
			report := func(l destLine) { _ = out.Encode(l) }
			s, err := loadSpec(cmd, nil)
			if err != nil {
				printSpecErrors(cmd.ErrOrStderr(), err)
				return &exitError{code: exitFailed}
			}
			cfg, err := gf.config(cmd)
			if err != nil {
				return &usageError{err: err}
			}
			dc, err := cf.check(s, false)
			if err != nil {
				return err
			}
			if err := checkRDMAProvider(rdmaProvider); err != nil {
				return err
			}
			err = demoDestination(cmd.Context(), s, cfg, dc, listen, rdmaProvider, report)
			if err != nil {
				report(destLine{Event: "done", Error: err.Error()})
				return &exitError{code: 1}
			}
			return nil
		},
	}
	gf.add(cmd, true)
	cf.add(cmd)
	cmd.Flags().StringVar(&listen, "listen", "tcp:127.0.0.1:0", "`URI` to receive the migration on")
	addRDMAProviderFlag(cmd.Flags(), &rdmaProvider)
	return cmd
}

func demoDestination(ctx context.Context, s *spec.Spec, cfg guest.Config, dc demoConfig, listen, rdmaProvider string, report func(destLine)) error {
	g, err := guest.NewDestination(cfg)
	if err != nil {
		return err
	}
	defer g.Close()
	c, err := newController(s, g, true)
	if err != nil {
		return err
	}
	defer c.Close()
	if err := dc.apply(ctx, c); err != nil {
		return err
	}
	// The guest stays paused when it arrives (QMP stop while waiting), so
	// its memory is checked after the migration, outside every measured
	// time, and equals the source's stopped guest.
	if _, err := c.Fire(ctx, spec.Guest, machine.TriggerStop, nil); err != nil {
		return err
	}
	in, err := loaders.Listen(ctx, c, g, listen, loaders.Options{
		Transport: &transport.Config{RDMAProvider: rdmaProvider},
	})
	if err != nil {
		return err
	}
	report(destLine{Event: "listening", URI: in.Addr().String(), CPUSeconds: cpuSeconds(),
		PrepareMS: float64(g.PrepareTime().Microseconds()) / 1000})
	r, err := in.Wait(ctx)
	if err != nil {
		in.Abort("interrupted")
		<-in.Done()
		return err
	}
	if r.Err != nil {
		return r.Err
	}
	checksum, err := g.Checksum()
	if err != nil {
		return fmt.Errorf("checksum the arrived guest: %w", err)
	}
	report(destLine{Event: "done", State: string(r.State), Checksum: fmt.Sprintf("%016x", checksum), PeakRSS: peakRSS(), CPUSeconds: cpuSeconds()})
	return nil
}

// cpuSeconds returns the CPU time this process has used (user + system,
// every thread), or 0 if getrusage fails.
func cpuSeconds() float64 {
	var ru unix.Rusage
	if err := unix.Getrusage(unix.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano()).Seconds()
}

// peakRSS returns this process's peak resident set size (VmHWM), or 0.
func peakRSS() uint64 {
	data, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(data), "\n") {
		if rest, ok := strings.CutPrefix(line, "VmHWM:"); ok {
			kb, _ := strconv.ParseUint(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(rest), "kB")), 10, 64)
			return kb << 10
		}
	}
	return 0
}
