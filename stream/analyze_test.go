package stream

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"reflect"
	"strings"
	"testing"
	"unicode/utf8"
)

// This file re-implements, in Go, what QEMU's scripts/analyze-migration.py
// relies on, in both the version Debian 12 ships (QEMU 7.2) and the current
// one (qemu-wire.md §3), taking the stricter of the two wherever they differ.
// qemu_test.go runs the real script where it can be fetched; these checks
// run everywhere and say precisely which assumption a stream breaks.

// scanVMDesc mirrors MigrationFile.read_migration_debug_json: in the last
// 10 MiB, the last NUL byte, then the first '{' after it; the byte 5 before
// must be 0x06 and the 4 in between the JSON length. It returns the JSON and
// the offset of the 0x06 byte.
func scanVMDesc(file []byte) ([]byte, int, error) {
	start := max(0, len(file)-10<<20)
	data := file[start:]
	nul := bytes.LastIndexByte(data, 0)
	if nul < 0 {
		return nil, 0, errors.New("no NUL byte in the tail")
	}
	rel := bytes.IndexByte(data[nul:], '{')
	if rel < 0 {
		return nil, 0, errors.New("no '{' after the last NUL byte")
	}
	jsonpos := nul + rel
	if jsonpos < 5 || data[jsonpos-5] != SecVMDesc {
		return nil, 0, fmt.Errorf("No Debug Migration device found (first '{' after the last NUL at tail offset %d)", jsonpos)
	}
	n := int(binary.BigEndian.Uint32(data[jsonpos-4 : jsonpos]))
	end := min(jsonpos+n, len(data))
	return data[jsonpos:end], start + jsonpos - 5, nil
}

// pyReader reads like MigrationFile: big-endian ints, a sticky error when
// the file runs out (where Python would fail).
type pyReader struct {
	b   []byte
	pos int
	err error
}

func (r *pyReader) take(n int) []byte {
	if r.err != nil {
		return make([]byte, n)
	}
	if n < 0 || r.pos+n > len(r.b) {
		r.err = fmt.Errorf("unexpected end of file at %#x reading %d bytes", r.pos, n)
		return make([]byte, max(n, 0))
	}
	p := r.b[r.pos : r.pos+n]
	r.pos += n
	return p
}
func (r *pyReader) s8() int     { return int(int8(r.take(1)[0])) }
func (r *pyReader) u32() uint32 { return binary.BigEndian.Uint32(r.take(4)) }
func (r *pyReader) u64() uint64 { return binary.BigEndian.Uint64(r.take(8)) }
func (r *pyReader) fail(f string, a ...any) {
	if r.err == nil {
		r.err = fmt.Errorf("at %#x: "+f, append([]any{r.pos}, a...)...)
	}
}

// readstr mirrors readstr(): a signed length byte; both versions fail on 0
// ("".decode) and on a negative length, and decode UTF-8.
func (r *pyReader) readstr(n int) string {
	if n <= 0 {
		r.fail("string length %d: the script needs 1..127", n)
		return ""
	}
	s := r.take(n)
	if !utf8.Valid(s) {
		r.fail("string %q is not UTF-8", s)
	}
	return string(s)
}

type analysis struct {
	PageSize uint64
	Machine  string
	Sections []string          // "idstr (id)" in the order the script lists them
	Devices  map[string][]byte // "idstr (id)" -> data field
	RAM      map[string]uint64 // block -> size ("section sizes")
	Image    map[string][]byte // block -> contents, as -x would extract it
	JSON     map[string]any    // the vmdesc
	desc     map[[2]any]VMDescDevice
}

// analyze walks file as analyze-migration.py does and returns what it would
// print, or the reason it would fail.
func analyze(file []byte) (*analysis, error) {
	js, descPos, err := scanVMDesc(file)
	if err != nil {
		return nil, err
	}
	a := &analysis{Devices: map[string][]byte{}, RAM: map[string]uint64{}, Image: map[string][]byte{}, desc: map[[2]any]VMDescDevice{}}
	if err := json.Unmarshal(js, &a.JSON); err != nil {
		return nil, fmt.Errorf("vmdesc JSON: %w", err)
	}
	ps, ok := a.JSON["page_size"].(float64)
	if !ok || ps <= 0 {
		return nil, errors.New("vmdesc has no page_size")
	}
	a.PageSize = uint64(ps)
	devs, ok := a.JSON["devices"].([]any)
	if !ok {
		return nil, errors.New("vmdesc has no devices list")
	}
	var desc VMDesc
	if err := json.Unmarshal(js, &desc); err != nil {
		return nil, err
	}
	for i, raw := range devs {
		m, _ := raw.(map[string]any)
		for _, k := range []string{"name", "instance_id", "fields"} {
			if _, ok := m[k]; !ok {
				return nil, fmt.Errorf("vmdesc device %d has no %q", i, k)
			}
		}
		dd := desc.Devices[i]
		if dd.Name == RAMIDStr && dd.InstanceID == 0 {
			return nil, errors.New(`vmdesc describes ("ram", 0), hiding the RAM parser`)
		}
		a.desc[[2]any{dd.Name, dd.InstanceID}] = dd
	}

	r := &pyReader{b: file}
	if r.u32() != Magic || r.u32() != Version {
		return nil, errors.New("bad magic or version")
	}
	var seen []VMDescDevice
	lastID := int64(-1)
	ramID := int64(-1)
	var ramName string // RamSection.name, kept across PART/END
	for r.err == nil {
		typ := r.s8()
		switch typ {
		case SecEOF:
			if r.pos != descPos {
				return nil, fmt.Errorf("EOF at %#x is not right before the vmdesc at %#x", r.pos-1, descPos)
			}
			if !reflect.DeepEqual(seen, desc.Devices) && !(len(seen) == 0 && len(desc.Devices) == 0) {
				return nil, fmt.Errorf("vmdesc devices %v are not the FULL sections in stream order %v", desc.Devices, seen)
			}
			return a, nil
		case SecConfig:
			n := r.u32()
			if n == 0 || n > 1<<31-1 {
				r.fail("machine name length %d", n)
			}
			a.Machine = r.readstr(int(n))
		case SecStart, SecFull:
			id := r.u32()
			name := r.readstr(r.s8())
			inst := r.u32()
			ver := r.u32()
			if inst > 1<<31-1 {
				r.fail("instance %d reads as negative in the 7.2 script", inst)
			}
			lastID = int64(id)
			key := fmt.Sprintf("%s (%d)", name, id)
			a.Sections = append(a.Sections, key)
			if dd, ok := a.desc[[2]any{name, inst}]; ok {
				seen = append(seen, dd)
				a.Devices[key] = walkDevice(r, dd, id)
				continue
			}
			if name != RAMIDStr || inst != 0 {
				r.fail("no parser for (%q, %d): KeyError", name, inst)
				continue
			}
			if ver != 4 {
				r.fail("Unknown RAM version %d", ver)
			}
			ramID = int64(id)
			walkRAM(r, a, &ramName)
		case SecPart, SecEnd:
			id := r.u32()
			lastID = int64(id)
			if int64(id) != ramID {
				r.fail("PART/END for section %d, which is not RAM: KeyError", id)
			}
			walkRAM(r, a, &ramName)
		case SecFooter:
			if id := r.u32(); int64(id) != lastID {
				r.fail("Mismatched section footer: %x vs %x", id, lastID)
			}
		case SecCommand:
			r.fail("COMMAND: the 7.2 script knows none, the current one only SWITCHOVER_START")
		default:
			r.fail("Unknown section type: %d", typ)
		}
	}
	return nil, r.err
}

// walkDevice reads the fields of a described device exactly as
// VMSDFieldStruct.read does (each field `size` bytes), then checks migctl's
// own layout: size (uint32) == len(data), and the footer right after.
func walkDevice(r *pyReader, dd VMDescDevice, id uint32) []byte {
	var sizeField uint32
	var data []byte
	for i, f := range dd.Fields {
		b := r.take(int(f.Size))
		switch {
		case i == 0 && f.Name == "size" && f.Type == "uint32" && f.Size == 4:
			sizeField = binary.BigEndian.Uint32(b)
		case i == 1 && f.Name == "data" && f.Type == "buffer":
			data = b
		default:
			r.fail("device %q field %d is %+v, not migctl's size/data layout", dd.Name, i, f)
		}
	}
	if len(dd.Fields) != 2 || uint64(sizeField) != uint64(len(data)) {
		r.fail("device %q: size field %d, data field %d bytes", dd.Name, sizeField, len(data))
	}
	if r.err == nil && (r.pos+5 > len(r.b) || r.b[r.pos] != SecFooter || binary.BigEndian.Uint32(r.b[r.pos+1:]) != id) {
		r.fail("device %q: the described fields do not end at the section's footer", dd.Name)
	}
	return data
}

// walkRAM mirrors RamSection.read, checking that the 7.2 and current block
// list loops agree.
func walkRAM(r *pyReader, a *analysis, name *string) {
	ps := a.PageSize
	for r.err == nil {
		w := r.u64()
		flags := w & (ps - 1)
		addr := w &^ (ps - 1)
		if flags&FlagMemSize != 0 {
			// Current script: while total > 0.
			save := r.pos
			total := int64(addr)
			var cur []Block
			for total > 0 && r.err == nil {
				n := r.readstr(r.s8())
				ln := r.u64()
				total -= int64(ln)
				cur = append(cur, Block{n, ln})
			}
			endCur := r.pos
			// 7.2 script: until a zero length byte (the next word's high byte).
			r.pos = save
			var old []Block
			for r.err == nil {
				n := r.s8()
				if n == 0 {
					r.pos--
					break
				}
				s := r.readstr(n)
				old = append(old, Block{s, r.u64()})
			}
			if r.err == nil && (r.pos != endCur || !reflect.DeepEqual(old, cur) || total != 0) {
				r.fail("block list read differently by the 7.2 (%v) and current (%v, %d left) scripts", old, cur, total)
			}
			for _, b := range cur {
				*name = b.Name
				a.RAM[b.Name] = b.Size
				a.Image[b.Name] = make([]byte, b.Size)
			}
			flags &^= FlagMemSize
		}
		switch {
		case flags&FlagZero != 0:
			if flags&FlagContinue != 0 {
				flags &^= FlagContinue
			} else {
				*name = r.readstr(r.s8())
			}
			r.take(1)
			flags &^= FlagZero
		case flags&FlagPage != 0:
			if flags&FlagContinue != 0 {
				flags &^= FlagContinue
			} else {
				*name = r.readstr(r.s8())
			}
			p := r.take(int(ps))
			img, ok := a.Image[*name]
			if !ok || addr+ps > uint64(len(img)) {
				r.fail("page %q@%#x is outside the extracted file (-x)", *name, addr)
			} else {
				copy(img[addr:], p)
			}
			flags &^= FlagPage
		case flags&(FlagXBZRLE|FlagHook) != 0:
			r.fail("XBZRLE or HOOK")
		}
		if flags&FlagMultifdFlush != 0 {
			r.fail("MULTIFD_FLUSH: Unknown RAM flags in the 7.2 script")
		}
		if flags&FlagEOS != 0 {
			return
		}
		if flags != 0 {
			r.fail("Unknown RAM flags: %x", flags)
		}
	}
}

func checkAnalyzable(file []byte) error {
	_, err := analyze(file)
	return err
}

func TestAnalyzeSample(t *testing.T) {
	var buf bytes.Buffer
	e := writeSample(t, &buf, false)
	a, err := analyze(buf.Bytes())
	if err != nil {
		t.Fatal(err)
	}
	wantSections := []string{HandshakeIDStr + " (0)", "ram (1)", "timer (2)", "0000:00:02.0/virtio-net (3)", "cpu (4)"}
	if !reflect.DeepEqual(a.Sections, wantSections) {
		t.Errorf("sections %v, want %v", a.Sections, wantSections)
	}
	if a.PageSize != testPS || a.Machine != guestName {
		t.Errorf("page_size %d machine %q", a.PageSize, a.Machine)
	}
	if !reflect.DeepEqual(a.RAM, map[string]uint64{"pc.ram": ramSize, romName: romSize}) {
		t.Errorf("section sizes %v", a.RAM)
	}
	if !bytes.Equal(a.Devices["timer (2)"], []byte{1, 2, 3, 4, 5, 6, 7, 8}) {
		t.Errorf("timer data %x", a.Devices["timer (2)"])
	}
	var hs Handshake
	if err := json.Unmarshal(a.Devices[HandshakeIDStr+" (0)"], &hs); err != nil || hs.GuestID != guestName {
		t.Errorf("handshake as the script sees it: %v %+v", err, hs)
	}
	// The extracted RAM image has our pages where we put them, zeros elsewhere.
	if !bytes.Equal(a.Image["pc.ram"], sampleImage("pc.ram")) || !bytes.Equal(a.Image[romName], sampleImage(romName)) {
		t.Error("extracted RAM differs from what was written")
	}
	if got := len(a.JSON["devices"].([]any)); got != len(e.VMDesc().Devices) {
		t.Errorf("vmdesc lists %d devices", got)
	}
}

// sampleImage is the RAM writeSample(…, false) leaves in block.
func sampleImage(block string) []byte {
	switch block {
	case "pc.ram":
		img := make([]byte, ramSize)
		for _, off := range []uint64{0, testPS, 15 * testPS, 4 * testPS} {
			copy(img[off:], pattern("pc.ram", off))
		}
		return img
	default:
		img := make([]byte, romSize)
		copy(img[testPS:], pattern(romName, testPS))
		return img
	}
}

// TestAnalyzeRejectsLive documents that a stream with commands (a live
// migration with a return path) is not analysable, as with QEMU.
func TestAnalyzeRejectsLive(t *testing.T) {
	var buf bytes.Buffer
	writeSample(t, &buf, true)
	if err := checkAnalyzable(buf.Bytes()); err == nil || !strings.Contains(err.Error(), "COMMAND") {
		t.Fatalf("live stream: %v, want the COMMAND failure", err)
	}
}

// TestTailScanSafe checks the padding predicate against the script's scan
// itself, for every length up to 0x30000 and around the high bytes.
func TestTailScanSafe(t *testing.T) {
	check := func(n uint32) {
		// ... EOF (NUL), 0x06, be32 n, then the JSON's first byte.
		tail := []byte{0xaa, SecEOF, SecVMDesc}
		tail = binary.BigEndian.AppendUint32(tail, n)
		tail = append(tail, '{', '"', '}')
		_, pos, err := scanVMDesc(tail)
		found := err == nil && pos == 2
		if found != tailScanSafe(n) {
			t.Fatalf("length %#x: scan finds it %v, tailScanSafe says %v", n, found, tailScanSafe(n))
		}
	}
	for n := range uint32(0x30000) {
		check(n)
	}
	for _, hi := range []uint32{0x7b, 0x17b, 0x7b7b, 0x10101} {
		for lo := range uint32(0x200) {
			check(hi<<16 | lo)
			check(hi<<8 | lo&0xff)
		}
	}
	for _, n := range []uint32{0x7b, 0x17b, 0x7b01, 0x7b7b, 0x17b01, 0x01017b01, 0x0101017b} {
		if tailScanSafe(n) {
			t.Errorf("%#x must be unsafe", n)
		}
	}
	for _, n := range []uint32{0x7c, 0x7b00, 0x17b00, 0x7b0000, 0x7b000001, 0x01010101} {
		if !tailScanSafe(n) {
			t.Errorf("%#x must be safe", n)
		}
	}
	for n, want := range map[int]int{0x7b: 0x7c, 0x17b: 0x17c, 0x7b00: 0x7b00, 0x7b01: 0x7c00, 0x7bff: 0x7c00, 0x7c: 0x7c} {
		if got := len(padVMDesc(make([]byte, n))); got != want {
			t.Errorf("padVMDesc(%#x bytes) = %#x bytes, want %#x", n, got, want)
		}
	}
}

// paddedStream writes a stream whose vmdesc JSON would naturally be exactly
// natural bytes long (tuning one device's idstr and instance), and returns
// it with the length actually written.
func paddedStream(t testing.TB, natural int) ([]byte, int) {
	t.Helper()
	var buf bytes.Buffer
	e := NewEncoder(&buf)
	must(t, e.WriteHeader(guestName))
	must(t, e.StartRAM(testPS, testBlocks))
	must(t, e.BeginRAMEnd())
	must(t, e.PutPage("pc.ram", 0, pattern("pc.ram", 0)))
	must(t, e.CloseRAMSection())
	measure := func(extra *VMDescDevice) int {
		d := e.VMDesc()
		if extra != nil {
			d.Devices = append(d.Devices, *extra)
		}
		js, err := json.Marshal(d)
		must(t, err)
		return len(js)
	}
	payload := []byte("state")
	for i := 0; measure(nil) < natural-400; i++ {
		must(t, e.WriteDevice(fmt.Sprintf("dev-%05d-%s", i, strings.Repeat("x", 16)), 0, 1, payload))
	}
	for l := 1; l <= 127; l++ {
		for _, inst := range []uint32{0, 10} {
			name := strings.Repeat("t", l)
			cand := VMDescDevice{Name: name, InstanceID: inst, VMSDName: name, Version: 1, Fields: deviceFields(len(payload))}
			if measure(&cand) == natural {
				must(t, e.WriteDevice(name, inst, 1, payload))
				must(t, e.Close())
				b := buf.Bytes()
				_, pos, err := scanVMDesc(b)
				if err != nil {
					t.Fatalf("natural length %#x: %v", natural, err)
				}
				return b, int(binary.BigEndian.Uint32(b[pos+1:]))
			}
		}
	}
	t.Fatalf("cannot build a vmdesc of %#x bytes", natural)
	return nil, 0
}

func TestVMDescPadding(t *testing.T) {
	for natural, want := range map[int]int{0x17b: 0x17c, 0x7b05: 0x7c00, 0x17a: 0x17a} {
		b, got := paddedStream(t, natural)
		if got != want {
			t.Errorf("natural vmdesc length %#x written as %#x, want %#x", natural, got, want)
		}
		if !bytes.HasSuffix(b, bytes.Repeat([]byte(" "), want-natural)) {
			t.Errorf("natural length %#x: padding is not trailing spaces", natural)
		}
		if err := checkAnalyzable(b); err != nil {
			t.Errorf("natural length %#x: %v", natural, err)
		}
		recs, _, err := decodeAll(NewDecoder(bytes.NewReader(b), testLimits()))
		if err != nil {
			t.Fatal(err)
		}
		if _, err := ParseVMDesc(recs[len(recs)-1].Data); err != nil {
			t.Errorf("padded vmdesc: %v", err)
		}
	}
	// Negative control: without the padding the scan really fails.
	b, _ := paddedStream(t, 0x17b)
	unpadded := unpad(b)
	if _, _, err := scanVMDesc(unpadded); err == nil {
		t.Error("an unpadded 0x17b-byte vmdesc was found: the padding test proves nothing")
	}
}

// unpad strips the vmdesc's trailing spaces and rewrites its length.
func unpad(b []byte) []byte {
	out := bytes.TrimRight(b, " ")
	_, pos, err := scanVMDesc(b)
	if err != nil {
		panic(err)
	}
	out = bytes.Clone(out)
	binary.BigEndian.PutUint32(out[pos+1:], uint32(len(out)-pos-5))
	return out
}
