package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/sys/unix"

	"github.com/migctl/migctl/engine"
	"github.com/migctl/migctl/guest"
	"github.com/migctl/migctl/host"
	"github.com/migctl/migctl/loaders"
	"github.com/migctl/migctl/machine"
	"github.com/migctl/migctl/spec"
)

// guestFlags are the built-in guest's settings, shared by both processes
// of the demo (the destination must build the same layout).
type guestFlags struct {
	size, dirtyRate string
	seed            uint64
	zero            float64
	random          bool
}

func (f *guestFlags) add(cmd *cobra.Command) {
	cmd.Flags().StringVar(&f.size, "size", "1G", "guest RAM size (K, M, G suffixes)")
	cmd.Flags().StringVar(&f.dirtyRate, "dirty-rate", "64M", "bytes per second the guest's writers dirty (0: idle)")
	cmd.Flags().Uint64Var(&f.seed, "seed", 1, "seed of the guest's memory pattern")
	cmd.Flags().Float64Var(&f.zero, "zero-fraction", 0.1, "fraction of pages that stay zero")
	cmd.Flags().BoolVar(&f.random, "random", false, "fill memory with incompressible random content")
}

func (f *guestFlags) config() (guest.Config, error) {
	size, err := spec.ParseSize(f.size)
	if err != nil {
		return guest.Config{}, fmt.Errorf("--size: %w", err)
	}
	rate, err := spec.ParseSize(f.dirtyRate)
	if err != nil {
		return guest.Config{}, fmt.Errorf("--dirty-rate: %w", err)
	}
	return guest.Config{Size: int64(size), DirtyRate: int64(rate), Seed: f.seed, ZeroFraction: f.zero, Random: f.random}, nil
}

func (f *guestFlags) args() []string {
	a := []string{"--size", f.size, "--dirty-rate", f.dirtyRate, "--seed", strconv.FormatUint(f.seed, 10),
		"--zero-fraction", strconv.FormatFloat(f.zero, 'g', -1, 64)}
	if f.random {
		a = append(a, "--random")
	}
	return a
}

// configFlags are --cap and --param, applied to a controller.
type configFlags struct {
	caps, params []string
	destCaps     []string // demo only: capabilities set on the destination alone
}

func (f *configFlags) add(cmd *cobra.Command) {
	cmd.Flags().StringArrayVar(&f.caps, "cap", nil, "capability NAME=on|off, set on both sides (repeatable)")
	cmd.Flags().StringArrayVar(&f.params, "param", nil, "parameter NAME=VALUE, set on both sides (repeatable)")
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

// apply sets the capabilities and parameters; unless the user set
// max-bandwidth, the demo lifts QEMU's default 128 MiB/s limit.
func (f *configFlags) apply(ctx context.Context, c *machine.Controller) error {
	caps := map[string]bool{}
	for _, s := range f.caps {
		name, val, _ := strings.Cut(s, "=")
		switch val {
		case "", "on", "true":
			caps[name] = true
		case "off", "false":
			caps[name] = false
		default:
			return fmt.Errorf("--cap %s: want NAME=on|off", s)
		}
	}
	params := map[string]any{"max-bandwidth": "0"}
	for _, s := range f.params {
		name, val, ok := strings.Cut(s, "=")
		if !ok {
			return fmt.Errorf("--param %s: want NAME=VALUE", s)
		}
		params[name] = val
	}
	if len(caps) > 0 {
		if err := c.SetCapabilities(ctx, caps); err != nil {
			return err
		}
	}
	return c.SetParameters(ctx, params)
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
	// TrueDowntimeMS is the guest's: source stop → the destination
	// confirms its guest runs (0 without a back channel: file, exec).
	TrueDowntimeMS      float64 `json:"true_downtime_ms"`
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
}

func newDemo() *cobra.Command {
	var gf guestFlags
	var cf configFlags
	var transportName string
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "demo",
		Short: "Migrate the built-in guest between two processes and verify the result",
		Long: "demo starts a second migctl process as the destination, migrates a running built-in guest to it\n" +
			"(default 1 GiB dirtying 64 MiB/s, over loopback TCP) with live progress, then prints a summary and\n" +
			"checks that the destination's memory and device state equal the source's. Exit status 0 only when\n" +
			"verified. The demo lifts QEMU's default 128 MiB/s bandwidth limit unless --param max-bandwidth=… is given.",
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			s, err := loadSpec(cmd, nil)
			if err != nil {
				printSpecErrors(cmd.ErrOrStderr(), err)
				return &exitError{code: 1}
			}
			specPath, _ := cmd.Flags().GetString("spec")
			res, err := runDemo(cmd.Context(), s, specPath, &gf, &cf, transportName, cmd.ErrOrStderr())
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
				return &exitError{code: 1}
			}
			if !res.Verified {
				return &exitError{code: 1}
			}
			return nil
		},
	}
	gf.add(cmd)
	cf.add(cmd)
	cmd.Flags().StringArrayVar(&cf.destCaps, "destination-cap", nil, "capability NAME=on|off set on the destination only, after --cap (shows how a mismatch fails)")
	cmd.Flags().StringVar(&transportName, "transport", "tcp", "tcp, unix, fd (a socketpair), file (save, then restore) or exec (cat > file, then cat file)")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print one JSON object instead of the summary (progress still goes to stderr)")
	return cmd
}

func printSummary(w io.Writer, r demoResult) {
	if r.SourceChecksum == "" && r.TotalTimeMS == 0 {
		return // the migration never started; the error says why
	}
	fmt.Fprintf(w, "\nmigration %s over %s\n", r.Status, r.Transport)
	fmt.Fprintf(w, "  guest          %s, dirtying %s/s\n", human(r.SizeBytes), human(r.DirtyRateBytes))
	fmt.Fprintf(w, "  total time     %.0f ms\n", r.TotalTimeMS)
	fmt.Fprintf(w, "  downtime       %.1f ms (QEMU's: guest stopped on the source → its last byte sent)\n", r.DowntimeMS)
	if r.TrueDowntimeMS > 0 {
		fmt.Fprintf(w, "  true downtime  %.1f ms (guest stopped on the source → the destination confirms it runs)\n", r.TrueDowntimeMS)
	}
	fmt.Fprintf(w, "  throughput     %.0f MiB/s\n", r.ThroughputMiBs)
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

func human(n uint64) string {
	switch {
	case n >= 1<<30 && n%(1<<30) == 0:
		return fmt.Sprintf("%d GiB", n>>30)
	case n >= 1<<20:
		return fmt.Sprintf("%d MiB", n>>20)
	case n >= 1<<10:
		return fmt.Sprintf("%d KiB", n>>10)
	}
	return fmt.Sprintf("%d B", n)
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
}

func startDest(ctx context.Context, args []string, extra []*os.File) (*destProc, error) {
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	d := &destProc{lines: make(chan destLine, 4)}
	d.cmd = exec.CommandContext(ctx, self, append([]string{"demo-destination"}, args...)...)
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

// next waits for the destination's next line of the given event.
func (d *destProc) next(event string) (destLine, error) {
	for l := range d.lines {
		if l.Event == event {
			return l, nil
		}
		if l.Event == "done" && l.Error != "" {
			return l, fmt.Errorf("the destination failed: %s", l.Error)
		}
	}
	_ = d.cmd.Wait()
	return destLine{}, fmt.Errorf("the destination process ended without reporting %q: %s", event, strings.TrimSpace(d.stderr.String()))
}

func (d *destProc) wait() { _ = d.cmd.Wait() }

func runDemo(ctx context.Context, s *spec.Spec, specPath string, gf *guestFlags, cf *configFlags, transportName string, progress io.Writer) (demoResult, error) {
	res := demoResult{Transport: transportName}
	cfg, err := gf.config()
	if err != nil {
		return res, err
	}
	res.SizeBytes, res.DirtyRateBytes = uint64(cfg.Size), uint64(cfg.DirtyRate)
	fmt.Fprintf(progress, "preparing a %s guest (pre-faulting and filling memory)...\n", human(uint64(cfg.Size)))
	g, err := guest.New(cfg)
	if err != nil {
		return res, err
	}
	defer g.Close()
	if err := g.Start(); err != nil {
		return res, err
	}
	c, err := newController(s, g, false)
	if err != nil {
		return res, err
	}
	defer c.Close()
	if err := cf.apply(ctx, c); err != nil {
		return res, err
	}

	tmp, err := os.MkdirTemp("", "migctl-demo-")
	if err != nil {
		return res, err
	}
	defer os.RemoveAll(tmp)
	destArgs := append(gf.args(), cf.args()...)
	if specPath != "" {
		destArgs = append(destArgs, "--spec", specPath) // both ends judge by the same rules
	}
	var dest *destProc
	var srcURI string
	var extra []*os.File
	switch transportName {
	case "tcp", "unix", "fd":
		listen := "tcp:127.0.0.1:0"
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
		l, err := dest.next("listening")
		if err != nil {
			return res, err
		}
		if srcURI == "" {
			srcURI = l.URI
		}
	case "file":
		srcURI = "file:" + filepath.Join(tmp, "guest.mig")
	case "exec":
		srcURI = "exec:cat > " + filepath.Join(tmp, "guest.mig")
	default:
		return res, fmt.Errorf("--transport %q: want tcp, unix, fd, file or exec", transportName)
	}

	m, err := engine.Start(ctx, c, g, srcURI, engine.Options{Checksum: g.Checksum})
	if err != nil {
		return res, fmt.Errorf("migrate %s: %w", srcURI, err)
	}
	stopProgress := showProgress(c, progress)
	sr, _ := m.Wait(context.Background())
	stopProgress()
	st := sr.Stats
	res.TotalTimeMS = float64(st.TotalTime.Microseconds()) / 1000
	res.DowntimeMS = float64(st.Downtime.Microseconds()) / 1000
	res.TrueDowntimeMS = float64(st.TrueDowntime.Microseconds()) / 1000
	if secs := st.TotalTime.Seconds(); secs > 0 {
		res.ThroughputMiBs = float64(st.Transferred) / secs / (1 << 20)
	}
	res.Passes, res.PagesSent, res.PagesZero, res.TransferredBytes = st.DirtySyncCount, st.Normal, st.Duplicate, st.Transferred
	res.SourceChecksum = fmt.Sprintf("%016x", st.Checksum)
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
		fmt.Fprintf(progress, "restoring from %s in a fresh process...\n", restore)
		dest, err = startDest(ctx, append(destArgs, "--listen", restore), nil)
		if err != nil {
			return res, err
		}
		defer dest.wait()
	}
	done, err := dest.next("done")
	if err != nil {
		return res, err
	}
	res.DestinationChecksum = done.Checksum
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

// showProgress prints the source's progress from controller events until
// the returned function is called.
func showProgress(c *machine.Controller, w io.Writer) func() {
	sub := c.Subscribe(256)
	tty := isTerminal(w)
	done := make(chan struct{})
	go func() {
		defer close(done)
		var last time.Time
		var st machine.Stats
		state, _ := c.State(spec.Outgoing)
		print := func(force bool) {
			if !force && time.Since(last) < 250*time.Millisecond {
				return
			}
			last = time.Now()
			line := fmt.Sprintf("%-10s pass %d  sent %s  remaining %s  rate %.0f MiB/s  expected downtime %d ms",
				state, st.DirtySyncCount, human(st.Transferred), human(st.Remaining), st.Mbps/8*1e6/(1<<20), st.ExpectedDowntime.Milliseconds())
			if tty {
				fmt.Fprintf(w, "\r\033[K%s", line)
			} else {
				fmt.Fprintln(w, line)
			}
		}
		for ev := range sub.C() {
			switch ev.Kind {
			case machine.EventStats:
				if ev.Side == spec.Outgoing {
					st = *ev.Stats
					print(false)
				}
			case machine.EventState:
				if ev.Side == spec.Outgoing {
					state = ev.To
					print(true)
				}
			}
		}
		print(true)
		if tty {
			fmt.Fprintln(w)
		}
	}()
	return func() { sub.Close(); <-done }
}

func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	return err == nil
}

// newDemoDestination is the destination half of the demo, run as a child
// process: it listens (or reads a file), loads, verifies and reports JSON
// lines on stdout.
func newDemoDestination() *cobra.Command {
	var gf guestFlags
	var cf configFlags
	var listen string
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
				return &exitError{code: 1}
			}
			err = demoDestination(cmd.Context(), s, &gf, &cf, listen, report)
			if err != nil {
				report(destLine{Event: "done", Error: err.Error()})
				return &exitError{code: 1}
			}
			return nil
		},
	}
	gf.add(cmd)
	cf.add(cmd)
	cmd.Flags().StringVar(&listen, "listen", "tcp:127.0.0.1:0", "URI to receive the migration on")
	return cmd
}

func demoDestination(ctx context.Context, s *spec.Spec, gf *guestFlags, cf *configFlags, listen string, report func(destLine)) error {
	cfg, err := gf.config()
	if err != nil {
		return err
	}
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
	if err := cf.apply(ctx, c); err != nil {
		return err
	}
	var checksum uint64
	in, err := loaders.Listen(ctx, c, g, listen, loaders.Options{
		PageSums: true,
		BeforeStart: func(sums [][]uint32) error {
			d, err := g.DigestWithPageSums(sums)
			checksum = d.Sum()
			return err
		},
	})
	if err != nil {
		return err
	}
	report(destLine{Event: "listening", URI: in.Addr().String()})
	r, err := in.Wait(ctx)
	if err != nil {
		in.Abort("interrupted")
		<-in.Done()
		return err
	}
	if r.Err != nil {
		return r.Err
	}
	report(destLine{Event: "done", State: string(r.State), Checksum: fmt.Sprintf("%016x", checksum), PeakRSS: peakRSS()})
	return nil
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
