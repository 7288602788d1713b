package uffd

import (
	"encoding/binary"
	"errors"
	"testing"
)

// The layout of struct uffd_msg (reference postcopy-uffd.md, pitfalls):
// event u8 at 0, flags u64 at 8, address u64 at 16, ptid u32 at 24.
func TestParseMsgLayout(t *testing.T) {
	b := make([]byte, MsgSize)
	b[0] = 0x12
	binary.LittleEndian.PutUint64(b[8:], 1)                 // WRITE
	binary.LittleEndian.PutUint64(b[16:], 0x7f00_1234_5000) // address
	binary.LittleEndian.PutUint32(b[24:], 4242)             // ptid
	m, err := ParseMsg(b)
	if err != nil {
		t.Fatal(err)
	}
	if m.Event != EventPagefault || m.Flags != FaultWrite || m.Address != 0x7f00_1234_5000 || m.TID != 4242 {
		t.Fatalf("decoded %+v", m)
	}
	if got := AppendMsg(nil, m); string(got) != string(b) {
		t.Fatalf("AppendMsg: % x, want % x", got, b)
	}
}

func TestParseMsgRejects(t *testing.T) {
	good := AppendMsg(nil, Msg{Event: EventPagefault, Address: 0x1000})
	mut := func(f func(b []byte)) []byte { b := append([]byte(nil), good...); f(b); return b }
	for name, b := range map[string][]byte{
		"short":           good[:31],
		"long":            append(append([]byte(nil), good...), 0),
		"unknown event":   mut(func(b []byte) { b[0] = 0x11 }),
		"reserved byte":   mut(func(b []byte) { b[3] = 1 }),
		"unknown flag":    mut(func(b []byte) { b[8] = 8 }),
		"ptid padding":    mut(func(b []byte) { b[28] = 1 }),
		"empty":           nil,
		"reserved dword":  mut(func(b []byte) { b[7] = 0x80 }),
		"event zero":      mut(func(b []byte) { b[0] = 0 }),
		"event past last": mut(func(b []byte) { b[0] = 0x17 }),
	} {
		if _, err := ParseMsg(b); !errors.Is(err, ErrMessage) {
			t.Errorf("%s: %v, want ErrMessage", name, err)
		}
	}
	for _, ev := range []Event{EventFork, EventRemap, EventRemove, EventUnmap} {
		if _, err := ParseMsg(mut(func(b []byte) { b[0] = byte(ev) })); err != nil {
			t.Errorf("%v: %v", ev, err)
		}
	}
}

func FuzzParseMsg(f *testing.F) {
	f.Add(AppendMsg(nil, Msg{Event: EventPagefault, Flags: FaultWrite, Address: 0x7fff0000, TID: 7}))
	f.Add(AppendMsg(nil, Msg{Event: EventRemap, Arg: [3]uint64{1, 2, 3}}))
	f.Add([]byte{0x12})
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := ParseMsg(b)
		if err != nil {
			return
		}
		if got := AppendMsg(nil, m); string(got) != string(b) {
			t.Fatalf("accepted % x but re-encodes as % x", b, got)
		}
	})
}
