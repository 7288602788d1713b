package multifd

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/klauspost/compress/zstd"
	"github.com/migctl/migctl/stream"
)

// These tests decode multifd migrations sent by QEMU 7.2 (Debian 12's
// qemu-system-x86_64): live when QEMU is installed, and always from the
// captures recorded under testdata/qemu72 (see its README.md). Regenerate
// the captures with MIGCTL_RECORD_QEMU=1 go test -run TestQEMU72Live ./multifd.

const (
	qemuBin      = "qemu-system-x86_64"
	qemuChannels = 2
	qemuMem      = "32M"
	// patternAddr is where -device loader puts the pattern in guest memory:
	// offset 1 MiB of the RAM block pc.ram.
	patternAddr = 0x100000
	patternSize = 1 << 20
	qemuUUID    = "6d696763-7c6d-756c-7469-66642d746573" // arbitrary, fixed: "migc|multifd-tes"
)

var qemuUUIDBytes = [16]byte{0x6d, 0x69, 0x67, 0x63, 0x7c, 0x6d, 0x75, 0x6c, 0x74, 0x69, 0x66, 0x64, 0x2d, 0x74, 0x65, 0x73}

// guestPattern is the content loaded into the guest: page i holds
// "migctl multifd page NNNNNN\n" repeated, so every page differs and all
// compress well (small captures).
func guestPattern() []byte {
	var b bytes.Buffer
	for i := range patternSize / testPS {
		line := fmt.Sprintf("migctl multifd page %06d\n", i)
		page := bytes.Repeat([]byte(line), testPS/len(line)+1)[:testPS]
		b.Write(page)
	}
	return b.Bytes()
}

type capture struct {
	main  []byte
	chans map[int][]byte // by the order they were accepted (1..N)
}

// qmpClient is a minimal QMP client with deadlines on every read and write.
type qmpClient struct {
	c  net.Conn
	br *bufio.Reader
}

func dialQMP(ctx context.Context, path string) (*qmpClient, error) {
	var d net.Dialer
	for {
		c, err := d.DialContext(ctx, "unix", path)
		if err == nil {
			q := &qmpClient{c: c, br: bufio.NewReader(c)}
			if _, err := q.read(ctx); err != nil { // greeting
				c.Close()
				return nil, err
			}
			if _, err := q.cmd(ctx, "qmp_capabilities", nil); err != nil {
				c.Close()
				return nil, err
			}
			return q, nil
		}
		if ctx.Err() != nil {
			return nil, fmt.Errorf("QMP socket %s: %w", path, err)
		}
		// QEMU creates the socket shortly after it starts; wait for it with
		// the runtime's poller instead of sleeping.
		select {
		case <-ctx.Done():
		case <-time.After(20 * time.Millisecond):
		}
	}
}

func (q *qmpClient) read(ctx context.Context) (map[string]any, error) {
	dl, _ := ctx.Deadline()
	_ = q.c.SetReadDeadline(dl)
	line, err := q.br.ReadBytes('\n')
	if err != nil {
		return nil, err
	}
	var m map[string]any
	err = json.Unmarshal(line, &m)
	return m, err
}

// cmd runs a command and returns its "return"; events seen meanwhile are
// dropped except MIGRATION, which is returned through waitMigration.
func (q *qmpClient) cmd(ctx context.Context, name string, args map[string]any) (any, error) {
	msg := map[string]any{"execute": name}
	if args != nil {
		msg["arguments"] = args
	}
	b, _ := json.Marshal(msg)
	dl, _ := ctx.Deadline()
	_ = q.c.SetWriteDeadline(dl)
	if _, err := q.c.Write(append(b, '\n')); err != nil {
		return nil, err
	}
	for {
		m, err := q.read(ctx)
		if err != nil {
			return nil, err
		}
		if _, ok := m["event"]; ok {
			continue
		}
		if e, ok := m["error"]; ok {
			return nil, fmt.Errorf("QMP %s: %v", name, e)
		}
		return m["return"], nil
	}
}

// waitMigration reads events until MIGRATION reports completed or failed.
func (q *qmpClient) waitMigration(ctx context.Context) (string, error) {
	for {
		m, err := q.read(ctx)
		if err != nil {
			return "", err
		}
		if m["event"] != "MIGRATION" {
			continue
		}
		data, _ := m["data"].(map[string]any)
		if s, _ := data["status"].(string); s == "completed" || s == "failed" || s == "cancelled" {
			return s, nil
		}
	}
}

// captureQEMU runs a stopped QEMU 7.2 guest, migrates it with multifd to a
// raw TCP listener that records every connection, and returns the bytes.
func captureQEMU(t *testing.T, comp Compression) *capture {
	t.Helper()
	bin, err := exec.LookPath(qemuBin)
	if err != nil {
		t.Skipf("%s is not installed (apt-get install -y --no-install-recommends qemu-system-x86 qemu-utils): %v", qemuBin, err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	dir := t.TempDir()
	pat := filepath.Join(dir, "pattern.bin")
	if err := os.WriteFile(pat, guestPattern(), 0o644); err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()

	// Record connections: accepted in order; each read to EOF.
	var mu sync.Mutex
	conns := map[int][]byte{}
	var wg sync.WaitGroup
	accepted := make(chan error, 1)
	wg.Go(func() {
		for i := 0; i <= qemuChannels; i++ {
			c, err := ln.Accept()
			if err != nil {
				accepted <- err
				return
			}
			_ = c.SetDeadline(time.Now().Add(2 * time.Minute))
			wg.Go(func() {
				defer c.Close()
				b, err := io.ReadAll(io.LimitReader(c, 256<<20))
				mu.Lock()
				conns[i] = b
				mu.Unlock()
				if err != nil {
					t.Errorf("connection %d: %v", i, err)
				}
			})
		}
		accepted <- nil
	})

	sock := filepath.Join(dir, "qmp.sock")
	var out bytes.Buffer
	cmd := exec.CommandContext(ctx, bin, "-M", "pc", "-m", qemuMem, "-nodefaults", "-display", "none", "-S",
		"-uuid", qemuUUID, "-device", "loader,file="+pat+",addr="+fmt.Sprint(patternAddr),
		"-qmp", "unix:"+sock+",server=on,wait=off")
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	qctx, qcancel := context.WithCancel(ctx)
	defer qcancel()
	go func() {
		_ = cmd.Wait()
		qcancel() // QEMU gone: stop waiting for it
		close(exited)
	}()
	defer func() {
		_ = cmd.Process.Kill() // our own child, by PID
		<-exited
	}()
	q, err := dialQMP(qctx, sock)
	if err != nil {
		_ = cmd.Process.Kill()
		<-exited
		t.Fatalf("%v\nQEMU output:\n%s", err, out.String())
	}
	defer q.c.Close()
	steps := []struct {
		name string
		args map[string]any
	}{
		// QEMU 7.2 emits the MIGRATION event only with the events capability.
		{"migrate-set-capabilities", map[string]any{"capabilities": []any{
			map[string]any{"capability": "multifd", "state": true},
			map[string]any{"capability": "events", "state": true}}}},
		{"migrate-set-parameters", map[string]any{"multifd-channels": qemuChannels, "multifd-compression": comp.String(), "max-bandwidth": int64(10 << 30)}},
		{"migrate", map[string]any{"uri": "tcp:" + ln.Addr().String()}},
	}
	for _, s := range steps {
		if _, err := q.cmd(ctx, s.name, s.args); err != nil {
			_ = cmd.Process.Kill()
			<-exited
			t.Fatalf("%v\nQEMU output:\n%s", err, out.String())
		}
	}
	status, err := q.waitMigration(ctx)
	if err != nil || status != "completed" {
		_ = cmd.Process.Kill()
		<-exited // out is complete once QEMU has exited
		t.Fatalf("migration %q: %v\nQEMU output:\n%s", status, err, out.String())
	}
	_, _ = q.cmd(ctx, "quit", nil)
	if err := <-accepted; err != nil {
		t.Fatal(err)
	}
	wg.Wait()
	c := &capture{chans: map[int][]byte{}}
	for i, b := range conns {
		if i == 0 {
			c.main = b
		} else {
			c.chans[i] = b
		}
	}
	return c
}

// qemuResult is what a decoded capture showed.
type qemuResult struct {
	blocks   map[string]uint64
	zeroRecs int // ZERO records on the main channel
	eos      int // RAM EOS records
	syncs    map[uint8]int
	packets  int
	pages    int
	image    []byte // pc.ram as rebuilt from both channels' pages
	covered  []bool // pc.ram pages that arrived (as ZERO or page data)
}

// decodeCapture decodes the main channel up to the first QEMU device
// section (whose vmstate this package cannot parse) and every multifd
// channel to its end, checking what QEMU 7.2 promises.
func decodeCapture(t *testing.T, c *capture, comp Compression) *qemuResult {
	t.Helper()
	res := &qemuResult{syncs: map[uint8]int{}}
	d := stream.NewDecoder(bytes.NewReader(c.main), stream.Limits{})
	ramEnded := false
main:
	for {
		rec, err := d.Next()
		if err != nil {
			t.Fatalf("main channel: %v", err)
		}
		switch rec.Kind {
		case stream.KindMemSize:
			res.blocks = map[string]uint64{}
			for _, b := range rec.Blocks {
				res.blocks[b.Name] = b.Size
			}
			size := res.blocks["pc.ram"]
			res.image = make([]byte, size)
			res.covered = make([]bool, size/testPS)
		case stream.KindZero:
			res.zeroRecs++
			if rec.Block == "pc.ram" {
				res.covered[rec.Offset/testPS] = true
			}
		case stream.KindPage:
			t.Fatalf("main channel carries a PAGE record at %#x of %q: with multifd every page goes to the channels", rec.Offset, rec.Block)
		case stream.KindFlush:
			t.Fatalf("QEMU 7.2 sent a MULTIFD_FLUSH record: it syncs at EOS")
		case stream.KindEOS:
			res.eos++
		case stream.KindSectionEnd:
			ramEnded = true
		case stream.KindSectionFull:
			if ramEnded {
				break main // QEMU's own device state follows: not length-prefixed
			}
			t.Fatalf("device section %q before the RAM END", rec.Section.IDStr)
		}
	}
	if res.blocks == nil {
		t.Fatal("main channel has no MEM_SIZE record")
	}
	if len(c.chans) != qemuChannels {
		t.Fatalf("%d multifd connections, want %d", len(c.chans), qemuChannels)
	}
	seen := map[uint8]bool{}
	for _, raw := range c.chans {
		r := bytes.NewReader(raw)
		in, err := ReadInit(r)
		if err != nil {
			t.Fatal(err)
		}
		if err := in.Check(qemuUUIDBytes, qemuChannels); err != nil {
			t.Fatalf("initial packet %+v: %v", in, err)
		}
		if seen[in.Channel] {
			t.Fatalf("channel id %d twice", in.Channel)
		}
		seen[in.Channel] = true
		rd, err := NewReader(r, int(in.Channel), Limits{Blocks: res.blocks, Compression: comp, Layout: LayoutQEMU72})
		if err != nil {
			t.Fatal(err)
		}
		scratch := make([]byte, testPS)
		for {
			h, err := rd.Next()
			if err == io.EOF {
				break
			}
			if err != nil {
				rd.Close()
				t.Fatalf("channel %d after %d packets: %v", in.Channel, res.packets, err)
			}
			res.packets++
			if h.Sync() {
				res.syncs[in.Channel]++
			}
			if len(h.Normal) == 0 {
				continue
			}
			res.pages += len(h.Normal)
			err = rd.ReadPages(func(_ int, off uint64) []byte {
				if h.Block != "pc.ram" {
					return scratch
				}
				res.covered[off/testPS] = true
				return res.image[off : off+testPS]
			})
			if err != nil {
				rd.Close()
				t.Fatalf("channel %d pages of packet %d: %v", in.Channel, h.PacketNum, err)
			}
		}
		rd.Close()
	}
	return res
}

// checkResult compares a decoded capture with what the guest held.
func checkResult(t *testing.T, res *qemuResult) {
	t.Helper()
	if got := res.blocks["pc.ram"]; got != 32<<20 {
		t.Fatalf("pc.ram is %#x bytes, the guest has %s", got, qemuMem)
	}
	pat := guestPattern()
	for i := 0; i < patternSize; i += testPS {
		if !res.covered[(patternAddr+i)/testPS] {
			t.Fatalf("pattern page %#x never arrived", i)
		}
		if !bytes.Equal(res.image[patternAddr+i:patternAddr+i+testPS], pat[i:i+testPS]) {
			t.Fatalf("pattern page %#x differs after decoding", i)
		}
	}
	for i, ok := range res.covered {
		if !ok {
			t.Fatalf("pc.ram page %#x arrived neither as a ZERO record nor as multifd data", i*testPS)
		}
	}
	// 7.2 syncs every channel before every RAM EOS (FlushPerSection).
	for ch := range uint8(qemuChannels) {
		if res.syncs[ch] != res.eos {
			t.Fatalf("channel %d: %d sync packets for %d EOS records on the main channel", ch, res.syncs[ch], res.eos)
		}
	}
	if res.zeroRecs == 0 || res.pages < patternSize/testPS {
		t.Fatalf("%d ZERO records, %d multifd pages", res.zeroRecs, res.pages)
	}
	t.Logf("blocks %v; main: %d ZERO records, %d EOS; multifd: %d packets, %d pages, syncs %v",
		res.blocks, res.zeroRecs, res.eos, res.packets, res.pages, res.syncs)
}

func TestQEMU72Live(t *testing.T) {
	for _, comp := range []Compression{CompressionNone, CompressionZlib, CompressionZstd} {
		t.Run(comp.String(), func(t *testing.T) {
			c := captureQEMU(t, comp)
			res := decodeCapture(t, c, comp)
			checkResult(t, res)
			if os.Getenv("MIGCTL_RECORD_QEMU") == "1" {
				record(t, comp, c)
			}
		})
	}
}

func TestQEMU72Recorded(t *testing.T) {
	for _, comp := range []Compression{CompressionNone, CompressionZlib, CompressionZstd} {
		t.Run(comp.String(), func(t *testing.T) {
			c := load(t, comp)
			res := decodeCapture(t, c, comp)
			checkResult(t, res)
		})
	}
}

func captureDir(comp Compression) string { return filepath.Join("testdata", "qemu72", comp.String()) }

// record writes a capture as zstd-compressed files, whole: the main
// channel and each multifd connection (about 400 KB in all for the three
// methods; a 32 MiB guest holding a 1 MiB pattern is mostly zero pages).
const recordLimit = 2 << 20

func record(t *testing.T, comp Compression, c *capture) {
	dir := captureDir(comp)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	write := func(name string, b []byte) {
		if len(b) > recordLimit {
			t.Fatalf("%s: %d bytes, more than the %d a capture may keep", name, len(b), recordLimit)
		}
		enc, _ := zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedBestCompression))
		z := enc.EncodeAll(b, nil)
		enc.Close()
		if err := os.WriteFile(filepath.Join(dir, name), z, 0o644); err != nil {
			t.Fatal(err)
		}
		t.Logf("%s/%s: %d bytes, %d compressed", dir, name, len(b), len(z))
	}
	write("main.zst", c.main)
	for i, b := range c.chans {
		write(fmt.Sprintf("conn%d.zst", i), b)
	}
}

func load(t *testing.T, comp Compression) *capture {
	dir := captureDir(comp)
	dec, _ := zstd.NewReader(nil, zstd.WithDecoderConcurrency(1))
	defer dec.Close()
	read := func(name string) []byte {
		z, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			t.Fatalf("%v (record with MIGCTL_RECORD_QEMU=1 go test -run TestQEMU72Live ./multifd)", err)
		}
		b, err := dec.DecodeAll(z, nil)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	c := &capture{main: read("main.zst"), chans: map[int][]byte{}}
	for i := 1; i <= qemuChannels; i++ {
		c.chans[i] = read(fmt.Sprintf("conn%d.zst", i))
	}
	return c
}
