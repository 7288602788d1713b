package control

import (
	"bytes"
	"encoding/hex"
	"errors"
	"reflect"
	"strings"
	"testing"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// unhex turns "0000 0010 | 0000 0007" style text into bytes; spaces and '|'
// are ignored so the table can show field boundaries.
func unhex(t *testing.T, s string) []byte {
	t.Helper()
	s = strings.NewReplacer(" ", "", "|", "", "\n", "", "\t", "").Replace(s)
	b, err := hex.DecodeString(s)
	if err != nil {
		t.Fatalf("bad hex in table: %v", err)
	}
	return b
}

// golden is written by hand from qemu-wire.md §7.3 and §9 and
// migration/rdma.c (RDMAControlHeader: be32 len, be32 type, be32 repeat, u32
// padding; payload structs packed, network order). The header fields each
// QEMU sender uses: READY {len 0, repeat 1} (qemu_rdma_exchange_recv);
// RAM_BLOCKS_REQUEST and REGISTER_FINISHED {len 0, repeat 1}
// (rdma_registration_stop); QEMU_FILE {len n, repeat 0} (zeroed header in
// qio_channel_rdma_writev); COMPRESS and REGISTER_REQUEST {repeat 1}
// (qemu_rdma_write_one); REGISTER_RESULT {len 16, repeat 1}; ERROR {len 0,
// repeat 1} (qemu_rdma_cleanup); UNREGISTER_FINISHED {len 0, repeat 0}.
var golden = []struct {
	name string
	msg  Message
	wire string
}{
	{"READY", Message{Type: TypeReady},
		"00000000 | 00000002 | 00000001 | 00000000"},
	{"ERROR (QEMU: no reason)", Message{Type: TypeError},
		"00000000 | 00000001 | 00000001 | 00000000"},
	{"ERROR with migctl reason", Message{Type: TypeError, Reason: "no"},
		"00000002 | 00000001 | 00000001 | 00000000 | 6e6f"},
	{"QEMU_FILE 5 bytes", Message{Type: TypeQEMUFile, Data: []byte("QEVM\x00")},
		"00000005 | 00000003 | 00000000 | 00000000 | 5145564d00"},
	{"RAM_BLOCKS_REQUEST (QEMU: empty)", Message{Type: TypeRAMBlocksRequest},
		"00000000 | 00000004 | 00000001 | 00000000"},
	{"RAM_BLOCKS_REQUEST with migctl names", Message{Type: TypeRAMBlocksRequest, Names: []string{"pc.ram", "vga"}},
		"0000000b | 00000004 | 00000001 | 00000000 | 06 70632e72616d | 03 766761"},
	{"RAM_BLOCKS_RESULT two blocks", Message{Type: TypeRAMBlocksResult, Blocks: []DestBlock{
		{HostAddr: 0x7f0000000000, Offset: 0, Length: 0x40000000, RKey: 0x1234},
		{HostAddr: 0x7f0040000000, Offset: 0x40000000, Length: 0x100000, RKey: 0},
	}},
		"00000040 | 00000005 | 00000001 | 00000000 |" +
			"00007f0000000000 | 0000000000000000 | 0000000040000000 | 00001234 | 00000000 |" +
			"00007f0040000000 | 0000000040000000 | 0000000000100000 | 00000000 | 00000000"},
	{"COMPRESS", Message{Type: TypeCompress, Comp: Compress{Value: 0, Block: 2, Offset: 0x300000, Length: 0x100000}},
		"00000018 | 00000006 | 00000001 | 00000000 | 00000000 | 00000002 | 0000000000300000 | 0000000000100000"},
	{"REGISTER_REQUEST one chunk (chunks=0 means one)", Message{Type: TypeRegisterRequest, Regs: []Reg{{Addr: 0x40200000, Block: 1, Chunks: 0}}},
		"00000018 | 00000007 | 00000001 | 00000000 | 0000000040200000 | 00000001 | 00000000 | 0000000000000000"},
	{"REGISTER_REQUEST three chunks", Message{Type: TypeRegisterRequest, Regs: []Reg{{Addr: 0x100000, Block: 0, Chunks: 2}}},
		"00000018 | 00000007 | 00000001 | 00000000 | 0000000000100000 | 00000000 | 00000000 | 0000000000000002"},
	{"REGISTER_RESULT", Message{Type: TypeRegisterResult, Results: []RegResult{{RKey: 0xabcd, HostAddr: 0x7f0000000000}}},
		"00000010 | 00000008 | 00000001 | 00000000 | 0000abcd | 00000000 | 00007f0000000000"},
	{"REGISTER_FINISHED", Message{Type: TypeRegisterFinished},
		"00000000 | 00000009 | 00000001 | 00000000"},
	{"UNREGISTER_REQUEST chunk 5", Message{Type: TypeUnregisterRequest, Regs: []Reg{{Addr: 5, Block: 0}}},
		"00000018 | 0000000a | 00000001 | 00000000 | 0000000000000005 | 00000000 | 00000000 | 0000000000000000"},
	{"UNREGISTER_FINISHED", Message{Type: TypeUnregisterFinished},
		"00000000 | 0000000b | 00000000 | 00000000"},
}

func TestGoldenEncode(t *testing.T) {
	for _, g := range golden {
		got, err := Append(nil, g.msg)
		if err != nil {
			t.Errorf("%s: Append: %v", g.name, err)
			continue
		}
		if want := unhex(t, g.wire); !bytes.Equal(got, want) {
			t.Errorf("%s:\n got %x\nwant %x", g.name, got, want)
		}
	}
}

func TestGoldenDecode(t *testing.T) {
	for _, g := range golden {
		m, err := Decode(unhex(t, g.wire))
		if err != nil {
			t.Errorf("%s: Decode: %v", g.name, err)
			continue
		}
		want := g.msg
		want.Repeat = m.Repeat // checked by the encode direction
		if len(want.Data) == 0 && len(m.Data) == 0 {
			want.Data, m.Data = nil, nil
		}
		if len(want.Blocks) == 0 && len(m.Blocks) == 0 {
			want.Blocks, m.Blocks = nil, nil
		}
		if !reflect.DeepEqual(m, want) {
			t.Errorf("%s:\n got %+v\nwant %+v", g.name, m, want)
		}
	}
}

// QEMU's REGISTER_RESULT header says len 16 even for repeat > 1 (errata §9);
// a result with repeat 2 and one entry must decode to that one entry.
func TestRegisterResultQEMURepeat(t *testing.T) {
	m, err := Decode(unhex(t, "00000010 | 00000008 | 00000002 | 00000000 | 00000007 | 00000000 | 0000000000001000"))
	if err != nil {
		t.Fatal(err)
	}
	if len(m.Results) != 1 || m.Results[0] != (RegResult{RKey: 7, HostAddr: 0x1000}) {
		t.Fatalf("got %+v", m.Results)
	}
}

func TestCapsGolden(t *testing.T) {
	// RDMACapabilities {be32 version 1, be32 flags 0x01 pin-all}.
	want := unhex(t, "00000001 | 00000001")
	if got := AppendCaps(nil, Caps{Version: 1, Flags: CapPinAll}); !bytes.Equal(got, want) {
		t.Fatalf("got %x want %x", got, want)
	}
	c, err := ParseCaps(unhex(t, "00000001 | 00000000 | 0000")) // padded private data
	if err != nil || c != (Caps{Version: 1}) {
		t.Fatalf("got %+v, %v", c, err)
	}
	if _, err := ParseCaps([]byte{0, 0, 0, 1}); !errors.Is(err, ErrMalformed) {
		t.Fatalf("short caps: %v", err)
	}
}

func TestDecodeRefuses(t *testing.T) {
	cases := []struct{ name, wire, want string }{
		{"short header", "000000000000", "header needs 16"},
		{"len beyond buffer", "00000010 | 00000003 | 00000000 | 00000000 | 00", "header says 16 payload bytes, 1 arrived"},
		{"unknown type", "00000000 | 0000000c | 00000001 | 00000000", "unknown type"},
		{"repeat too large", "00000000 | 00000002 | 00001001 | 00000000", "repeat 4097 exceeds 4096"},
		{"READY with payload", "00000001 | 00000002 | 00000001 | 00000000 | 00", "want 0"},
		{"COMPRESS short", "00000010 | 00000006 | 00000001 | 00000000 | 00000000000000000000000000000000", "want 24"},
		{"REGISTER repeat 2, one entry", "00000018 | 00000007 | 00000002 | 00000000 | 000000000000000000000000000000000000000000000000", "want 48"},
		{"REGISTER repeat 0", "00000000 | 00000007 | 00000000 | 00000000", "repeat 0"},
		{"RESULT empty", "00000000 | 00000008 | 00000001 | 00000000", "not 1..4096 results"},
		{"BLOCKS ragged", "00000001 | 00000005 | 00000001 | 00000000 | 00", "not 0..4096 blocks"},
		{"names overrun", "00000002 | 00000004 | 00000001 | 00000000 | 0561", "block name of 5 bytes with 1 left"},
		{"empty name", "00000001 | 00000004 | 00000001 | 00000000 | 00", "block name of 0 bytes"},
	}
	for _, c := range cases {
		_, err := Decode(unhex(t, c.wire))
		if !errors.Is(err, ErrMalformed) || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: got %v, want ErrMalformed containing %q", c.name, err, c.want)
		}
	}
	// A QEMU_FILE message above 32 KiB is refused both ways.
	big := make([]byte, HeaderSize+MaxQEMUFile+1)
	copy(big, unhex(t, "00008001 | 00000003 | 00000000 | 00000000"))
	if _, err := Decode(big); !errors.Is(err, ErrMalformed) {
		t.Errorf("QEMU_FILE of 32 KiB + 1: %v", err)
	}
	if _, err := Append(nil, Message{Type: TypeQEMUFile, Data: make([]byte, MaxQEMUFile+1)}); !errors.Is(err, ErrMalformed) {
		t.Errorf("encoding QEMU_FILE of 32 KiB + 1: %v", err)
	}
}
