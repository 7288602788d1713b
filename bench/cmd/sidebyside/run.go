package main

import (
	"bufio"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/migctl/migctl/qmp"
)

// bench is one campaign's fixed inputs.
type bench struct {
	Size        int64   // guest RAM, bytes
	Zero        float64 // fraction of zero pages
	RandomBytes int64   // Size·(1−Zero), whole pages: the data every configuration moves
	Backing     string  // migctl's guest backing and rawcopy's region
	Dir         string  // scratch: sockets, logs, the data file, saved files
	QEMU        string  // qemu-system-x86_64
	Migctl      string  // the migctl binary
	Rawcopy     string  // the rawcopy binary
	Data        dataPlan
	DataPath    string
	MaxBW       uint64        // max-bandwidth set on every source, B/s
	Timeout     time.Duration // bound of one migration
	// ReadyTimeout bounds a process's start (a prepared 2 GiB memfd guest
	// takes seconds here).
	ReadyTimeout time.Duration
}

// unlimitedBandwidth is max-bandwidth for "unlimited": 100 GiB/s, as
// ../shared/tools/qemu-bench/mig.py sets it, on QEMU and migctl alike.
const unlimitedBandwidth = 100 << 30

// measure runs one configuration once.
func (b *bench) measure(ctx context.Context, c config, round int) sample {
	s := sample{Config: c.Name, Round: round, GuestRAM: uint64(b.Size)}
	var err error
	switch c.Kind {
	case kindQEMU, kindMigctl:
		err = b.migrate(ctx, c, &s)
	case kindRaw:
		err = b.raw(ctx, c, &s)
	case kindRawWrite:
		err = b.rawWrite(ctx, &s)
	case kindMappedRAM:
		err = b.mappedRAM(ctx, c, &s)
	default:
		err = fmt.Errorf("unknown kind %q", c.Kind)
	}
	if err != nil {
		s.Err = err.Error()
	}
	return s
}

// sideArgs returns the argv of a source or destination of c with its QMP
// socket at sock.
func (b *bench) sideArgs(c config, dest bool, sock string) []string {
	if c.Kind == kindQEMU {
		a := []string{b.QEMU, "-M", "pc", "-m", strconv.FormatInt(b.Size>>20, 10) + "M", "-nodefaults", "-display", displayNone,
			"-qmp", "unix:" + sock + ",server=on,wait=off"}
		if dest {
			// No -S: the destination runs its guest when the migration
			// completes (RESUME), as the source's guest ran.
			a = append(a, "-incoming", "defer")
			if c.Prepare {
				a = append(a, "-mem-prealloc")
			}
			return a
		}
		return append(a, "-S", "-device", fmt.Sprintf("loader,file=%s,addr=%#x", b.DataPath, guestDataAddr))
	}
	g := fmt.Sprintf("size=%d,dirty-rate=0,seed=1,zero=%s,random=on,backing=%s",
		b.Size, strconv.FormatFloat(b.Zero, 'g', -1, 64), b.Backing)
	a := []string{b.Migctl, "serve", "--qmp", "unix:" + sock}
	if dest {
		if c.Prepare {
			g += ",prealloc=on"
		}
		a = append(a, "--destination")
	}
	return append(a, "--guest", g)
}

// configure sets c's capabilities and parameters on p.
func configure(ctx context.Context, p *proc, c config, source bool) error {
	if c.Multifd > 0 {
		if _, err := p.execute(ctx, "migrate-set-capabilities", map[string]any{
			"capabilities": []map[string]any{{"capability": "multifd", "state": true}},
		}); err != nil {
			return err
		}
		if _, err := p.execute(ctx, "migrate-set-parameters", map[string]any{"multifd-channels": c.Multifd}); err != nil {
			return err
		}
	}
	if source {
		if _, err := p.execute(ctx, "migrate-set-parameters", map[string]any{"max-bandwidth": unlimitedBandwidth}); err != nil {
			return err
		}
	}
	return nil
}

// statusPoll is how often the source's query-migrate is read while it
// migrates (as mig.py does; the destination is not polled, so its loader
// is never delayed by the driver).
const statusPoll = 50 * time.Millisecond

// migrate runs one migration between two processes of c (QEMU or migctl
// serve) and fills s.
func (b *bench) migrate(ctx context.Context, c config, s *sample) error {
	ctx, cancel := context.WithTimeout(ctx, b.Timeout)
	defer cancel()
	tag := fmt.Sprintf("%s-r%d", c.Name, s.Round)
	dsock := filepath.Join(b.Dir, tag+"-dst.sock")
	ssock := filepath.Join(b.Dir, tag+"-src.sock")
	dst, err := startProc(ctx, c.Name+" destination", b.sideArgs(c, true, dsock), dsock, filepath.Join(b.Dir, tag+"-dst.log"), b.ReadyTimeout)
	if err != nil {
		return err
	}
	defer dst.stop()
	ms := float64(dst.Ready.Microseconds()) / 1000
	s.DestStartMS = &ms
	if s.DestReadyRSS, err = procStatus(dst.cmd.Process.Pid, "VmRSS"); err != nil {
		return err
	}
	src, err := startProc(ctx, c.Name+" source", b.sideArgs(c, false, ssock), ssock, filepath.Join(b.Dir, tag+"-src.log"), b.ReadyTimeout)
	if err != nil {
		return err
	}
	defer src.stop()
	if c.Kind == kindQEMU {
		// QEMU's source starts paused (-S) so the loader has placed the
		// data; then its guest runs, as migctl's source guest runs.
		if _, err := src.execute(ctx, qmpCont, nil); err != nil {
			return err
		}
	}
	settled, err := settle(ctx, src.cmd.Process.Pid)
	if err != nil {
		return err
	}
	s.Settled = &settled
	if err := configure(ctx, dst, c, false); err != nil {
		return err
	}
	if err := configure(ctx, src, c, true); err != nil {
		return err
	}
	if _, err := dst.execute(ctx, "migrate-incoming", map[string]any{"uri": "tcp:127.0.0.1:0"}); err != nil {
		return err
	}
	din, err := dst.queryMigrate(ctx)
	if err != nil {
		return err
	}
	uri, err := listenURI(din)
	if err != nil {
		return fmt.Errorf("%s: %w", dst.name, err)
	}
	tMigrate := time.Now()
	if _, err := src.execute(ctx, qmpMigrate, map[string]any{"uri": uri}); err != nil {
		return err
	}
	info, err := waitMigration(ctx, src)
	if err != nil {
		return err
	}
	if info.Status != statusCompleted {
		return fmt.Errorf("%s ended %s: %s", src.name, info.Status, info.ErrorDesc)
	}
	stop, err := src.events.waitFor(ctx, qmp.EventStop, tMigrate)
	if err != nil {
		return fmt.Errorf("%s: %w", src.name, err)
	}
	resume, err := dst.events.waitFor(ctx, qmp.EventResume, tMigrate)
	if err != nil {
		return fmt.Errorf("%s: %w (its log: %s)", dst.name, err, dst.logTail())
	}
	td := float64(resume.Timestamp.Time().Sub(stop.Timestamp.Time()).Microseconds()) / 1000
	s.TrueDowntimeMS = &td
	e2e := float64(resume.Timestamp.Time().Sub(tMigrate).Microseconds()) / 1000
	s.EndToEndMS = &e2e
	if info.TotalTime == nil || info.RAM == nil {
		return fmt.Errorf("%s: query-migrate of a completed migration lacks total-time or ram", src.name)
	}
	s.TotalMS = float64(*info.TotalTime)
	s.Bytes = info.RAM.Transferred
	s.Passes = info.RAM.DirtySyncCount
	if info.Downtime != nil {
		d := float64(*info.Downtime)
		s.ReportedDowntimeMS = &d
	}
	if c.Kind == kindQEMU {
		ok, err := b.spotCheck(ctx, src, dst)
		if err != nil {
			return err
		}
		s.Verified = &ok
	}
	rss, err := procStatus(dst.cmd.Process.Pid, "VmHWM")
	if err != nil {
		return err
	}
	s.DestPeakRSS = rss
	return nil
}

// listenURI is the tcp: address a destination's query-migrate says it
// listens on.
func listenURI(info qmp.MigrationInfo) (string, error) {
	for _, sa := range info.SocketAddress {
		if sa.Port != "" && sa.Port != "0" {
			host := sa.Host
			if host == "" {
				host = "127.0.0.1"
			}
			return "tcp:" + host + ":" + sa.Port, nil
		}
	}
	return "", errors.New("query-migrate shows no listening port after migrate-incoming tcp:127.0.0.1:0")
}

// waitMigration polls the source's query-migrate until its migration
// ends (bounded by ctx).
func waitMigration(ctx context.Context, src *proc) (qmp.MigrationInfo, error) {
	tick := time.NewTicker(statusPoll)
	defer tick.Stop()
	for {
		info, err := src.queryMigrate(ctx)
		if err != nil {
			return info, err
		}
		switch info.Status {
		case statusCompleted, statusFailed, statusCancelled:
			return info, nil
		}
		select {
		case <-tick.C:
		case <-ctx.Done():
			return info, fmt.Errorf("%s still %s: %w", src.name, info.Status, context.Cause(ctx))
		case <-src.exited:
			return info, fmt.Errorf("%s exited while migrating: %s", src.name, src.logTail())
		}
	}
}

// spotCheck reads 16 bytes at a few guest addresses of the data on the
// stopped source and on the destination (HMP xp) and compares both with
// the data file, as mig.py does; it reports whether all three agree.
func (b *bench) spotCheck(ctx context.Context, src, dst *proc) (bool, error) {
	f, err := os.Open(b.DataPath)
	if err != nil {
		return false, err
	}
	defer f.Close()
	buf := make([]byte, 16)
	for _, off := range b.Data.spotOffsets(8) {
		if _, err := f.ReadAt(buf, off); err != nil {
			return false, fmt.Errorf("read the data file at %d: %w", off, err)
		}
		want := [2]uint64{binary.LittleEndian.Uint64(buf), binary.LittleEndian.Uint64(buf[8:])}
		line := fmt.Sprintf("xp /2gx %#x", guestDataAddr+off)
		for _, p := range []*proc{src, dst} {
			raw, err := p.execute(ctx, "human-monitor-command", map[string]any{"command-line": line})
			if err != nil {
				return false, err
			}
			var out string
			if err := json.Unmarshal(raw, &out); err != nil {
				return false, err
			}
			got, err := parseXP(out)
			if err != nil {
				return false, fmt.Errorf("%s: %s: %w", p.name, line, err)
			}
			if got != want {
				return false, nil
			}
		}
	}
	return true, nil
}

// parseXP reads the two quadwords of HMP's "xp /2gx ADDR" answer,
// "ADDR: 0xQUAD 0xQUAD".
func parseXP(out string) ([2]uint64, error) {
	var q [2]uint64
	_, v, ok := strings.Cut(out, ":")
	f := strings.Fields(v)
	if !ok || len(f) != 2 {
		return q, fmt.Errorf("answer %q: want ADDR: 0xQUAD 0xQUAD", out)
	}
	for i := range q {
		n, err := strconv.ParseUint(strings.TrimPrefix(f[i], "0x"), 16, 64)
		if err != nil {
			return q, fmt.Errorf("answer %q: %w", out, err)
		}
		q[i] = n
	}
	return q, nil
}

// raw runs rawcopy recv and send for c.Streams streams.
func (b *bench) raw(ctx context.Context, c config, s *sample) error {
	ctx, cancel := context.WithTimeout(ctx, b.Timeout)
	defer cancel()
	timeout := b.Timeout.String()
	recv := exec.CommandContext(ctx, b.Rawcopy, "recv", "-region", strconv.FormatInt(b.Size, 10),
		"-streams", strconv.Itoa(c.Streams), "-backing", b.Backing, "-timeout", timeout)
	var stderr strings.Builder
	recv.Stderr = &stderr
	out, err := recv.StdoutPipe()
	if err != nil {
		return err
	}
	if err := recv.Start(); err != nil {
		return err
	}
	defer func() {
		// On an early return the receiver may still wait for streams:
		// it is killed (by its PID, through its context) before the wait.
		cancel()
		_ = recv.Wait()
	}()
	lines := bufio.NewScanner(out)
	var ready struct {
		Event     string  `json:"event"`
		Addr      string  `json:"addr"`
		PrepareMS float64 `json:"prepare_ms"`
		Bytes     uint64  `json:"bytes"`
		PeakRSS   uint64  `json:"peak_rss"`
	}
	if !lines.Scan() || json.Unmarshal(lines.Bytes(), &ready) != nil || ready.Event != "ready" {
		return fmt.Errorf("rawcopy recv did not say ready: %q %s", lines.Text(), stderr.String())
	}
	s.DestStartMS = &ready.PrepareMS
	send := exec.CommandContext(ctx, b.Rawcopy, "send", "-addr", ready.Addr, "-bytes", strconv.FormatInt(b.RandomBytes, 10),
		"-streams", strconv.Itoa(c.Streams), "-timeout", timeout)
	res, err := send.Output()
	if err != nil {
		return fmt.Errorf("rawcopy send: %w: %s", err, exitText(err))
	}
	var r struct {
		Bytes   uint64  `json:"bytes"`
		Seconds float64 `json:"seconds"`
	}
	if err := json.Unmarshal(res, &r); err != nil {
		return fmt.Errorf("rawcopy send printed %q: %w", res, err)
	}
	done := ready
	if !lines.Scan() || json.Unmarshal(lines.Bytes(), &done) != nil || done.Event != "done" {
		return fmt.Errorf("rawcopy recv did not say done: %q %s", lines.Text(), stderr.String())
	}
	if done.Bytes != r.Bytes {
		return fmt.Errorf("rawcopy recv got %d bytes, send sent %d", done.Bytes, r.Bytes)
	}
	s.Bytes, s.TotalMS, s.DestPeakRSS = r.Bytes, r.Seconds*1000, done.PeakRSS
	return nil
}

// rawWrite runs rawcopy write of the random bytes into the scratch
// directory and removes the file.
func (b *bench) rawWrite(ctx context.Context, s *sample) error {
	ctx, cancel := context.WithTimeout(ctx, b.Timeout)
	defer cancel()
	path := filepath.Join(b.Dir, fmt.Sprintf("raw-write-r%d.bin", s.Round))
	defer os.Remove(path)
	res, err := exec.CommandContext(ctx, b.Rawcopy, "write", "-path", path, "-bytes", strconv.FormatInt(b.RandomBytes, 10),
		"-timeout", b.Timeout.String()).Output()
	if err != nil {
		return fmt.Errorf("rawcopy write: %w: %s", err, exitText(err))
	}
	var r struct {
		Bytes   uint64  `json:"bytes"`
		Seconds float64 `json:"seconds"`
	}
	if err := json.Unmarshal(res, &r); err != nil {
		return fmt.Errorf("rawcopy write printed %q: %w", res, err)
	}
	s.Bytes, s.TotalMS, s.FileBytes = r.Bytes, r.Seconds*1000, int64(r.Bytes)
	return nil
}

// mappedRAM saves a migctl serve's guest to file: with mapped-ram on and
// removes the file.
func (b *bench) mappedRAM(ctx context.Context, c config, s *sample) error {
	ctx, cancel := context.WithTimeout(ctx, b.Timeout)
	defer cancel()
	tag := fmt.Sprintf("%s-r%d", c.Name, s.Round)
	sock := filepath.Join(b.Dir, tag+".sock")
	path := filepath.Join(b.Dir, tag+".mig")
	defer os.Remove(path)
	src, err := startProc(ctx, c.Name+" source", b.sideArgs(config{Kind: kindMigctl}, false, sock), sock, filepath.Join(b.Dir, tag+".log"), b.ReadyTimeout)
	if err != nil {
		return err
	}
	defer src.stop()
	settled, err := settle(ctx, src.cmd.Process.Pid)
	if err != nil {
		return err
	}
	s.Settled = &settled
	if _, err := src.execute(ctx, "migrate-set-capabilities", map[string]any{
		"capabilities": []map[string]any{{"capability": "mapped-ram", "state": true}},
	}); err != nil {
		return err
	}
	if err := configure(ctx, src, c, true); err != nil {
		return err
	}
	if _, err := src.execute(ctx, qmpMigrate, map[string]any{"uri": "file:" + path}); err != nil {
		return err
	}
	info, err := waitMigration(ctx, src)
	if err != nil {
		return err
	}
	if info.Status != statusCompleted {
		return fmt.Errorf("%s ended %s: %s", src.name, info.Status, info.ErrorDesc)
	}
	if info.TotalTime == nil || info.RAM == nil {
		return fmt.Errorf("%s: query-migrate of a completed save lacks total-time or ram", src.name)
	}
	s.TotalMS, s.Bytes = float64(*info.TotalTime), info.RAM.Transferred
	if st, err := os.Stat(path); err == nil {
		s.FileBytes = st.Size()
	}
	return nil
}

// exitText is a failed command's stderr, when it has one.
func exitText(err error) string {
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return strings.TrimSpace(string(ee.Stderr))
	}
	return ""
}
