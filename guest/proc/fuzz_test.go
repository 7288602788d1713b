package proc

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"runtime"
	"testing"

	"github.com/migctl/migctl/guest"
)

func validHello() Hello {
	return Hello{
		Version: 1, PID: 1, Role: RoleDestination, ID: "migctl-builtin/1 x",
		Blocks:  []BlockInfo{{Name: "pc.ram", Size: 1 << 20, PageSize: 4096, Addr: 0x7f0000000000}},
		Devices: []DeviceInfo{{Name: "timer", Version: 1}},
		UFFD:    true, Features: 1 << 5, Bitmap: true, BitmapSize: 8192, IdleTimeout: 1e9,
	}
}

func TestHelloValidate(t *testing.T) {
	ok := validHello()
	if err := ok.validate(); err != nil {
		t.Fatal(err)
	}
	for name, mut := range map[string]func(h *Hello){
		"version 0": func(h *Hello) { h.Version = 0 },
		"version 2": func(h *Hello) { h.Version = 2 },
		"role":      func(h *Hello) { h.Role = "spare" },
		"no blocks": func(h *Hello) { h.Blocks = nil },
		"page size 3000": func(h *Hello) { // every other field fits a 3000-byte page
			h.Blocks[0] = BlockInfo{Name: "pc.ram", PageSize: 3000, Size: 3000 * 100, Addr: 3000 << 20}
		},
		"size not pages":       func(h *Hello) { h.Blocks[0].Size = 4097 },
		"address wraps":        func(h *Hello) { h.Blocks[0].Addr = ^uint64(0) &^ 4095 },
		"address 0":            func(h *Hello) { h.Blocks[0].Addr = 0 },
		"two blocks same name": func(h *Hello) { h.Blocks = append(h.Blocks, h.Blocks[0]) },
		"destination no uffd":  func(h *Hello) { h.UFFD = false },
		"bitmap size 0":        func(h *Hello) { h.BitmapSize = 0 },
		"idle 0":               func(h *Hello) { h.IdleTimeout = 0 },
		"empty ID":             func(h *Hello) { h.ID = "" },
	} {
		h := validHello()
		h.Blocks = append([]BlockInfo(nil), h.Blocks...)
		mut(&h)
		if err := h.validate(); !errors.Is(err, ErrProtocol) {
			t.Errorf("%s: %v, want ErrProtocol", name, err)
		}
	}
}

// Hostile HELLO payloads: decoding and validation never panic, and what
// passes is within the bounds the client relies on.
func FuzzHello(f *testing.F) {
	b, _ := json.Marshal(validHello())
	f.Add(b)
	f.Add([]byte(`{"version":1}`))
	f.Add([]byte(`{"blocks":[{"size":-1}]}`))
	f.Fuzz(func(t *testing.T, p []byte) {
		var h Hello
		if decodeJSON(p, &h) != nil || h.validate() != nil {
			return
		}
		if h.fds() > maxFDs || len(h.Blocks) > MaxBlocks {
			t.Fatalf("validated hello wants %d descriptors", h.fds())
		}
		for _, b := range h.Blocks {
			if b.Size <= 0 || b.Size%int64(b.PageSize) != 0 {
				t.Fatalf("validated block %+v", b)
			}
		}
	})
}

// Hostile received-bitmap headers: never panic; accepted offsets always
// leave room for the block's bitmap inside the memory.
func FuzzBitmapHeader(f *testing.F) {
	pages := []int{256, 100}
	size, offsets := bitmapLayout(pages)
	mem := make([]byte, size)
	writeBitmapHeader(mem, pages, offsets)
	f.Add(mem[:bitmapHeader], uint16(size))
	f.Fuzz(func(t *testing.T, hdr []byte, extra uint16) {
		m := make([]byte, len(hdr)+int(extra))
		copy(m, hdr)
		offs, err := parseBitmapHeader(m, pages)
		if err != nil {
			return
		}
		for i, o := range offs {
			if o < bitmapHeader || o%8 != 0 || o+int64(guest.BitmapWords(pages[i]))*8 > int64(len(m)) {
				t.Fatalf("accepted offset %d for block %d in %d bytes", o, i, len(m))
			}
		}
		_ = bitmapsOf(m, pages, offs)
	})
}

func TestBitmapHeaderRoundTrip(t *testing.T) {
	pages := []int{4096, 256, 1}
	size, offsets := bitmapLayout(pages)
	mem := make([]byte, size)
	writeBitmapHeader(mem, pages, offsets)
	got, err := parseBitmapHeader(mem, pages)
	if err != nil {
		t.Fatal(err)
	}
	for i := range offsets {
		if got[i] != offsets[i] {
			t.Fatalf("offsets %v, want %v", got, offsets)
		}
	}
	if _, err := parseBitmapHeader(mem, []int{4096, 256, 2}); !errors.Is(err, ErrProtocol) {
		t.Fatalf("header for other page counts accepted: %v", err)
	}
}

// Frame headers and ERROR payloads from a hostile peer.
func FuzzFrameHeader(f *testing.F) {
	f.Add(encodeHeader(msgHello|replyBit, 100), []byte{3, 0, 'x'})
	f.Add(encodeHeader(msgDevLoad, 1<<31), []byte{})
	f.Fuzz(func(t *testing.T, h []byte, errPayload []byte) {
		if typ, n, err := parseHeader(h, maxRequest); err == nil && (n > maxRequest || n < 0) {
			t.Fatalf("accepted %v of %d bytes", typ, n)
		}
		var re *RemoteError
		if err := decodeError(msgPing, errPayload); errors.As(err, &re) && len(re.Msg) > maxErrorText {
			t.Fatalf("error text of %d bytes", len(re.Msg))
		}
	})
}

// Hostile requests to a guest process: every one is answered (a reply or
// an error code with a message), none panics, replies stay within the
// bounds the client enforces, and the guest still works afterwards.
func FuzzRequest(f *testing.F) {
	procs := runtime.GOMAXPROCS(0)
	cfg := Config{Guest: guest.Config{Size: 64 << 10, Seed: 3, VRAM: -1}, Role: RoleSource}
	s, err := newServer(cfg.withDefaults(), nil)
	runtime.GOMAXPROCS(procs)
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { s.g.Close() })
	for _, t := range []msgType{msgPing, msgStart, msgStop, msgDirtySync, msgDigest, msgVerify, msgStats, msgQuit} {
		f.Add(uint16(t), []byte(nil))
	}
	f.Add(uint16(msgDevSave), binary.LittleEndian.AppendUint32(nil, 2))
	f.Add(uint16(msgDevLoad), binary.LittleEndian.AppendUint32(nil, 0))
	f.Add(uint16(msgThrottle), binary.LittleEndian.AppendUint32(nil, 500))
	f.Add(uint16(msgWaitReaders), []byte{1, 0, 0, 0, 0xff, 0xff, 0xff, 0xff})
	f.Fuzz(func(t *testing.T, typ uint16, payload []byte) {
		reply, code, msg := s.handle(frame{typ: msgType(typ), payload: payload}, 1)
		if code != 0 {
			if msg == "" {
				t.Fatalf("%v: error code %d without a message", msgType(typ), code)
			}
			return
		}
		if len(reply) > maxJSON {
			t.Fatalf("%v: reply of %d bytes", msgType(typ), len(reply))
		}
	})
	f.Cleanup(func() {
		s.g.Stop()
		if _, err := s.g.Digest(); err != nil {
			f.Errorf("guest broken after the requests: %v", err)
		}
	})
}

// TestConfigBacking: a guest process shares its RAM through memfds, so the
// default backing there is memfd and anonymous memory is refused; a
// destination refuses Prealloc (it would fill the holes userfaultfd must
// catch), a source accepts it.
func TestConfigBacking(t *testing.T) {
	for _, c := range []struct {
		guest guest.Config
		role  Role
		ok    bool
	}{
		{guest.Config{Size: 1 << 20}, RoleSource, true},
		{guest.Config{Size: 1 << 20}, RoleDestination, true},
		{guest.Config{Size: 1 << 20, Backing: guest.BackingMemfd}, RoleSource, true},
		{guest.Config{Size: 1 << 20, Backing: guest.BackingAnon}, RoleSource, false},
		{guest.Config{Size: 1 << 20, Backing: guest.BackingAnon}, RoleDestination, false},
		{guest.Config{Size: 1 << 20, Prealloc: true}, RoleSource, true},
		{guest.Config{Size: 1 << 20, Prealloc: true}, RoleDestination, false},
	} {
		raw := Config{Guest: c.guest, Role: c.role}
		cfg := raw.withDefaults()
		err := cfg.validate()
		if (err == nil) != c.ok || (err != nil && !errors.Is(err, guest.ErrConfig)) {
			t.Errorf("%s %+v: validate = %v, want ok=%v", c.role, c.guest, err, c.ok)
		}
		if c.guest.Backing == "" && cfg.Guest.Backing != guest.BackingMemfd {
			t.Errorf("default backing in a guest process = %q, want %q", cfg.Guest.Backing, guest.BackingMemfd)
		}
	}
}
