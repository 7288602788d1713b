package guest

import (
	"encoding/binary"
	"fmt"
	"sync"
	"time"
)

// The built-in guest's devices. Each keeps its state behind its own mutex:
// writers update it while the guest runs, Save and Load may come from the
// engine's goroutines, and Console from the control plane. Every Save format
// is canonical (Load accepts exactly what Save can produce, and Save after a
// successful Load returns the same bytes), little-endian, with every length
// bounded.

// deviceVersion is the Save format version of all three devices.
const deviceVersion = 1

func errState(dev, format string, args ...any) error {
	return fmt.Errorf("guest: %s: %s: %w", dev, fmt.Sprintf(format, args...), ErrDeviceState)
}

// ---- timer ----

// timerDev counts writer ticks and keeps a virtual clock: the time the guest
// has spent running, carried across migrations.
type timerDev struct {
	running func() bool

	mu      sync.Mutex
	ticks   uint64
	clockNS int64     // running time accumulated until since
	since   time.Time // when the guest last started; zero while stopped
}

const timerStateLen = 16 // ticks u64, clock ns i64 (>= 0)

func (d *timerDev) Name() string       { return "timer" }
func (d *timerDev) Instance() uint32   { return 0 }
func (d *timerDev) Version() uint32    { return deviceVersion }
func (d *timerDev) NeedsLock() bool    { return false }
func (d *timerDev) tick()              { d.mu.Lock(); d.ticks++; d.mu.Unlock() }
func (d *timerDev) resume(t time.Time) { d.mu.Lock(); d.since = t; d.mu.Unlock() }

func (d *timerDev) pause(t time.Time) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if !d.since.IsZero() {
		d.clockNS += int64(t.Sub(d.since))
		d.since = time.Time{}
	}
}

func (d *timerDev) clockLocked() int64 {
	if d.since.IsZero() {
		return d.clockNS
	}
	return d.clockNS + int64(time.Since(d.since))
}

// clock returns the virtual clock: running time so far.
func (d *timerDev) clock() time.Duration {
	d.mu.Lock()
	defer d.mu.Unlock()
	return time.Duration(d.clockLocked())
}

func (d *timerDev) Save() ([]byte, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	b := make([]byte, 0, timerStateLen)
	b = binary.LittleEndian.AppendUint64(b, d.ticks)
	b = binary.LittleEndian.AppendUint64(b, uint64(d.clockLocked()))
	return b, nil
}

func (d *timerDev) Load(state []byte) error {
	if d.running() {
		return fmt.Errorf("guest: timer: Load: %w", ErrRunning)
	}
	if len(state) != timerStateLen {
		return errState("timer", "state is %d bytes, want %d", len(state), timerStateLen)
	}
	ticks := binary.LittleEndian.Uint64(state[0:8])
	clock := int64(binary.LittleEndian.Uint64(state[8:16]))
	if clock < 0 {
		return errState("timer", "virtual clock %d ns is negative", clock)
	}
	d.mu.Lock()
	d.ticks, d.clockNS, d.since = ticks, clock, time.Time{}
	d.mu.Unlock()
	return nil
}

// ---- serial ----

// Limits of the serial device's ring of console lines.
const (
	SerialLines   = 64  // lines kept
	SerialLineMax = 200 // bytes per line; longer lines are cut
)

// serialDev keeps the last SerialLines lines the guest printed. The control
// plane reads them (Builtin.Console), so its Load needs the controller lock.
type serialDev struct {
	running func() bool

	mu    sync.Mutex
	lines []string // oldest first, len <= SerialLines
	total uint64   // lines printed since boot, >= len(lines)
}

func (d *serialDev) Name() string     { return "serial" }
func (d *serialDev) Instance() uint32 { return 0 }
func (d *serialDev) Version() uint32  { return deviceVersion }
func (d *serialDev) NeedsLock() bool  { return true }

func (d *serialDev) print(line string) {
	if len(line) > SerialLineMax {
		line = line[:SerialLineMax]
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if len(d.lines) == SerialLines {
		copy(d.lines, d.lines[1:])
		d.lines = d.lines[:SerialLines-1]
	}
	d.lines = append(d.lines, line)
	d.total++
}

func (d *serialDev) console() ([]string, uint64) {
	d.mu.Lock()
	defer d.mu.Unlock()
	return append([]string(nil), d.lines...), d.total
}

// Format: total u64, count u16, then count × (len u16, bytes).
func (d *serialDev) Save() ([]byte, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	b := binary.LittleEndian.AppendUint64(nil, d.total)
	b = binary.LittleEndian.AppendUint16(b, uint16(len(d.lines)))
	for _, l := range d.lines {
		b = binary.LittleEndian.AppendUint16(b, uint16(len(l)))
		b = append(b, l...)
	}
	return b, nil
}

func (d *serialDev) Load(state []byte) error {
	if d.running() {
		return fmt.Errorf("guest: serial: Load: %w", ErrRunning)
	}
	if len(state) < 10 {
		return errState("serial", "state is %d bytes, shorter than its 10-byte header", len(state))
	}
	total := binary.LittleEndian.Uint64(state[0:8])
	n := int(binary.LittleEndian.Uint16(state[8:10]))
	if n > SerialLines {
		return errState("serial", "%d lines, more than the %d the ring holds", n, SerialLines)
	}
	if total < uint64(n) {
		return errState("serial", "%d lines printed in total but %d kept", total, n)
	}
	rest := state[10:]
	lines := make([]string, 0, n)
	for i := range n {
		if len(rest) < 2 {
			return errState("serial", "line %d: truncated length", i)
		}
		l := int(binary.LittleEndian.Uint16(rest[0:2]))
		if l > SerialLineMax {
			return errState("serial", "line %d is %d bytes, more than %d", i, l, SerialLineMax)
		}
		if len(rest)-2 < l {
			return errState("serial", "line %d: %d bytes announced, %d left", i, l, len(rest)-2)
		}
		lines = append(lines, string(rest[2:2+l]))
		rest = rest[2+l:]
	}
	if len(rest) != 0 {
		return errState("serial", "%d unexpected bytes after the last line", len(rest))
	}
	d.mu.Lock()
	d.lines, d.total = lines, total
	d.mu.Unlock()
	return nil
}

// ---- nic ----

// nicDev is a network card: its MAC, link state and traffic counters.
type nicDev struct {
	running func() bool

	mu                 sync.Mutex
	mac                [6]byte
	link               bool
	rxPackets, rxBytes uint64
	txPackets, txBytes uint64
}

const nicStateLen = 6 + 1 + 4*8 // mac, link (0/1), rx packets/bytes, tx packets/bytes

func newNIC(seed uint64, running func() bool) *nicDev {
	h := mix64(seed ^ 0x6e69632020202020)
	// 52:54:00 is QEMU's prefix: locally administered, unicast.
	return &nicDev{running: running, mac: [6]byte{0x52, 0x54, 0x00, byte(h >> 16), byte(h >> 8), byte(h)}, link: true}
}

func (d *nicDev) Name() string     { return "nic" }
func (d *nicDev) Instance() uint32 { return 0 }
func (d *nicDev) Version() uint32  { return deviceVersion }
func (d *nicDev) NeedsLock() bool  { return false }

// traffic counts one transmitted packet of txBytes and one 64-byte reply.
func (d *nicDev) traffic(txBytes uint64) {
	d.mu.Lock()
	d.txPackets++
	d.txBytes += txBytes
	d.rxPackets++
	d.rxBytes += 64
	d.mu.Unlock()
}

func (d *nicDev) Save() ([]byte, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	b := make([]byte, 0, nicStateLen)
	b = append(b, d.mac[:]...)
	link := byte(0)
	if d.link {
		link = 1
	}
	b = append(b, link)
	for _, v := range [...]uint64{d.rxPackets, d.rxBytes, d.txPackets, d.txBytes} {
		b = binary.LittleEndian.AppendUint64(b, v)
	}
	return b, nil
}

func (d *nicDev) Load(state []byte) error {
	if d.running() {
		return fmt.Errorf("guest: nic: Load: %w", ErrRunning)
	}
	if len(state) != nicStateLen {
		return errState("nic", "state is %d bytes, want %d", len(state), nicStateLen)
	}
	var mac [6]byte
	copy(mac[:], state[0:6])
	if mac[0]&1 != 0 || mac == [6]byte{} {
		return errState("nic", "MAC %x is not a unicast address", mac)
	}
	if state[6] > 1 {
		return errState("nic", "link state %d, want 0 or 1", state[6])
	}
	le := binary.LittleEndian
	d.mu.Lock()
	d.mac, d.link = mac, state[6] == 1
	d.rxPackets, d.rxBytes = le.Uint64(state[7:15]), le.Uint64(state[15:23])
	d.txPackets, d.txBytes = le.Uint64(state[23:31]), le.Uint64(state[31:39])
	d.mu.Unlock()
	return nil
}
