package guest

import (
	"bytes"
	"errors"
	"strings"
	"testing"

	"pgregory.net/rapid"
)

func stopped() bool { return false }

func newDevices() []Device {
	return []Device{&timerDev{running: stopped}, &serialDev{running: stopped}, newNIC(1, stopped)}
}

// randomState puts d into an arbitrary valid state.
func randomState(t *rapid.T, d Device) {
	switch d := d.(type) {
	case *timerDev:
		d.ticks = rapid.Uint64().Draw(t, "ticks")
		d.clockNS = rapid.Int64Min(0).Draw(t, "clock")
	case *serialDev:
		d.lines = nil
		for range rapid.IntRange(0, SerialLines).Draw(t, "lines") {
			d.lines = append(d.lines, string(rapid.SliceOfN(rapid.Byte(), 0, SerialLineMax).Draw(t, "line")))
		}
		d.total = uint64(len(d.lines))
	case *nicDev:
		mac := rapid.SliceOfN(rapid.Byte(), 6, 6).Draw(t, "mac")
		mac[0] &^= 1
		mac[0] |= 2
		copy(d.mac[:], mac)
		d.link = rapid.Bool().Draw(t, "link")
		d.rxPackets, d.rxBytes = rapid.Uint64().Draw(t, "rxp"), rapid.Uint64().Draw(t, "rxb")
		d.txPackets, d.txBytes = rapid.Uint64().Draw(t, "txp"), rapid.Uint64().Draw(t, "txb")
	}
}

func TestDeviceRoundTrip(t *testing.T) {
	rapid.Check(t, func(t *rapid.T) {
		for i, src := range newDevices() {
			randomState(t, src)
			if s, ok := src.(*serialDev); ok {
				s.total = uint64(len(s.lines)) + rapid.Uint64Max(1<<40).Draw(t, "extra")
			}
			state, err := src.Save()
			if err != nil {
				t.Fatalf("%s.Save: %v", src.Name(), err)
			}
			dst := newDevices()[i]
			if err := dst.Load(state); err != nil {
				t.Fatalf("%s.Load of its own Save: %v", src.Name(), err)
			}
			again, _ := dst.Save()
			if !bytes.Equal(state, again) {
				t.Fatalf("%s: Save after Load differs:\n %x\n %x", src.Name(), state, again)
			}
		}
	})
}

// TestDeviceLoadHostile: arbitrary and mutated blobs never panic; a refused
// blob leaves the state untouched and wraps ErrDeviceState; an accepted one
// is canonical (Save returns it unchanged).
func TestDeviceLoadHostile(t *testing.T) {
	rapid.Check(t, func(t *rapid.T) {
		for _, d := range newDevices() {
			randomState(t, d)
			valid, _ := d.Save()
			var blob []byte
			switch rapid.IntRange(0, 3).Draw(t, "kind") {
			case 0:
				blob = rapid.SliceOfN(rapid.Byte(), 0, 400).Draw(t, "bytes")
			case 1: // one byte changed
				blob = bytes.Clone(valid)
				if len(blob) > 0 {
					blob[rapid.IntRange(0, len(blob)-1).Draw(t, "at")] ^= rapid.ByteRange(1, 255).Draw(t, "xor")
				}
			case 2: // truncated
				blob = valid[:rapid.IntRange(0, len(valid)).Draw(t, "len")]
			case 3: // extended
				blob = append(bytes.Clone(valid), rapid.SliceOfN(rapid.Byte(), 1, 10).Draw(t, "tail")...)
			}
			before, _ := d.Save()
			err := d.Load(blob)
			after, _ := d.Save()
			if err != nil {
				if !errors.Is(err, ErrDeviceState) {
					t.Fatalf("%s.Load error %v does not wrap ErrDeviceState", d.Name(), err)
				}
				if !bytes.Equal(before, after) {
					t.Fatalf("%s: a refused Load changed the state", d.Name())
				}
				continue
			}
			if !bytes.Equal(blob, after) {
				t.Fatalf("%s accepted a non-canonical blob:\n in  %x\n out %x", d.Name(), blob, after)
			}
		}
	})
}

func TestDeviceLoadErrors(t *testing.T) {
	cases := []struct {
		dev  Device
		blob []byte
		want string
	}{
		{&timerDev{running: stopped}, make([]byte, 15), "15 bytes"},
		{&timerDev{running: stopped}, append(make([]byte, 15), 0x80), "negative"},
		{&serialDev{running: stopped}, []byte{1, 2, 3}, "shorter"},
		{&serialDev{running: stopped}, []byte{100, 0, 0, 0, 0, 0, 0, 0, 65, 0}, "more than the 64"},
		{&serialDev{running: stopped}, []byte{0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0}, "0 lines printed in total but 1"},
		{&serialDev{running: stopped}, []byte{1, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0xff, 0xff, 'x'}, "65535 bytes"},
		{&serialDev{running: stopped}, []byte{1, 0, 0, 0, 0, 0, 0, 0, 1, 0, 5, 0, 'x'}, "5 bytes announced, 1 left"},
		{newNIC(1, stopped), make([]byte, 39), "not a unicast"},
		{newNIC(1, stopped), append([]byte{0x53, 0, 0, 0, 0, 1, 0}, make([]byte, 32)...), "not a unicast"},
		{newNIC(1, stopped), append([]byte{0x52, 0, 0, 0, 0, 1, 2}, make([]byte, 32)...), "link state 2"},
	}
	for _, c := range cases {
		err := c.dev.Load(c.blob)
		if !errors.Is(err, ErrDeviceState) || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s.Load(%x) = %v, want ErrDeviceState mentioning %q", c.dev.Name(), c.blob, err, c.want)
		}
	}
}

func TestDeviceLoadWhileRunning(t *testing.T) {
	g := newDest(t, Config{Size: 1 * mib})
	states := map[string][]byte{}
	for _, d := range g.Devices() {
		states[d.Name()], _ = d.Save()
	}
	mustOK(t, g.Start())
	for _, d := range g.Devices() {
		if err := d.Load(states[d.Name()]); !errors.Is(err, ErrRunning) {
			t.Errorf("%s.Load on a running guest = %v, want ErrRunning", d.Name(), err)
		}
	}
	mustOK(t, g.Stop())
	for _, d := range g.Devices() {
		mustOK(t, d.Load(states[d.Name()]))
	}
}

func TestSerialRing(t *testing.T) {
	d := &serialDev{running: stopped}
	for i := range SerialLines + 10 {
		d.print(strings.Repeat("x", i*5))
	}
	lines, total := d.console()
	if len(lines) != SerialLines || total != SerialLines+10 {
		t.Fatalf("ring holds %d lines, total %d", len(lines), total)
	}
	if len(lines[0]) != 50 || len(lines[len(lines)-1]) != SerialLineMax {
		t.Fatalf("oldest line %d bytes (want 50), newest %d (want cut to %d)", len(lines[0]), len(lines[len(lines)-1]), SerialLineMax)
	}
}
