package stream

import (
	"bytes"
	"errors"
	"io"
	"strings"
	"testing"
	"unicode/utf8"
)

func TestRPRoundTrip(t *testing.T) {
	msgs := []RPMessage{
		NewShut(0),
		NewShut(1),
		NewPong(0xdeadbeef),
		NewSwitchoverAck(),
		NewFailReason(`RAM block "pc.ram" is 0x20000 bytes on the source, only 0x10000 here`),
		{Type: RPReqPagesID, Data: append([]byte{0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0, 0x10, 0, 6}, "pc.ram"...)},
		{Type: RPReqPages, Data: make([]byte, 12)},
		{Type: RPRecvBitmap, Data: append([]byte{6}, "pc.ram"...)},
		{Type: RPResumeAck, Data: []byte{0, 0, 0, 1}},
	}
	var buf bytes.Buffer
	for _, m := range msgs {
		must(t, WriteRP(&buf, m))
	}
	wantPrefix := []byte{0, 1, 0, 4, 0, 0, 0, 0, 0, 1, 0, 4, 0, 0, 0, 1, 0, 2, 0, 4, 0xde, 0xad, 0xbe, 0xef, 0, 7, 0, 0, 0x7f, 0x00}
	if !bytes.HasPrefix(buf.Bytes(), wantPrefix) {
		t.Errorf("wire bytes %x, want prefix %x", buf.Bytes()[:len(wantPrefix)], wantPrefix)
	}
	for _, want := range msgs {
		got, err := ReadRP(&buf)
		must(t, err)
		if got.Type != want.Type || !bytes.Equal(got.Data, want.Data) {
			t.Errorf("read %v, want %v", got, want)
		}
	}
	if _, err := ReadRP(&buf); err != io.EOF {
		t.Errorf("at the end: %v, want io.EOF", err)
	}
	if v, ok := NewPong(7).Value(); !ok || v != 7 || NewPong(7).String() != "PONG(7)" {
		t.Errorf("Value/String of PONG(7): %d %v %s", v, ok, NewPong(7))
	}
	if _, ok := NewSwitchoverAck().Value(); ok {
		t.Error("SWITCHOVER_ACK has no value")
	}
}

func TestRPFailReasonTruncated(t *testing.T) {
	text := strings.Repeat("é", MaxFailReason) // 2 bytes each
	m := NewFailReason(text)
	if len(m.Data) > MaxFailReason || !utf8.Valid(m.Data) || len(m.Data) < MaxFailReason-1 {
		t.Fatalf("cut to %d bytes, valid UTF-8 %v", len(m.Data), utf8.Valid(m.Data))
	}
	var buf bytes.Buffer
	must(t, WriteRP(&buf, m))
}

func TestRPErrors(t *testing.T) {
	write := []struct {
		name string
		m    RPMessage
		sub  string
	}{
		{"SHUT of 3 bytes", RPMessage{Type: RPShut, Data: []byte{1, 2, 3}}, "SHUT message of 3 bytes, want 4"},
		{"PONG of 5 bytes", RPMessage{Type: RPPong, Data: make([]byte, 5)}, "at most 4"},
		{"SWITCHOVER_ACK with data", RPMessage{Type: RPSwitchoverAck, Data: []byte{0}}, "at most 0"},
		{"unknown type", RPMessage{Type: 0x99}, "unknown return-path message type 0x99"},
		{"type 0", RPMessage{Type: 0}, "unknown"},
		{"fail reason too long", RPMessage{Type: RPFailReason, Data: make([]byte, MaxFailReason+1)}, "at most 4096"},
		{"fail reason not UTF-8", RPMessage{Type: RPFailReason, Data: []byte{0xff}}, "UTF-8"},
		{"REQ_PAGES_ID bad name length", RPMessage{Type: RPReqPagesID, Data: append(make([]byte, 12), 9, 'a')}, "u8-counted block name"},
		{"RECV_BITMAP empty name", RPMessage{Type: RPRecvBitmap, Data: []byte{0}}, "u8-counted block name"},
	}
	for _, c := range write {
		t.Run("write "+c.name, func(t *testing.T) {
			var buf bytes.Buffer
			err := WriteRP(&buf, c.m)
			if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), c.sub) || buf.Len() != 0 {
				t.Errorf("%v (wrote %d bytes), want ErrInvalid containing %q", err, buf.Len(), c.sub)
			}
			// The same bytes on the wire are rejected by ReadRP.
			wire := new(raw).be16(uint16(c.m.Type)).be16(uint16(len(c.m.Data))).bytes(c.m.Data).Bytes()
			_, err = ReadRP(bytes.NewReader(wire))
			wantDecodeError(t, err, ErrCorrupt, nil, -1, "")
		})
	}
	read := []struct {
		name string
		wire []byte
		sub  string
	}{
		{"header truncated", []byte{0, 1, 0}, "ends inside a message header"},
		{"payload truncated", []byte{0, 2, 0, 4, 1, 2}, "ends inside a message PONG payload"},
		{"huge length", []byte{0x7f, 0, 0xff, 0xff}, "MIGCTL_FAIL_REASON message of 65535 bytes, at most 4096"},
	}
	for _, c := range read {
		t.Run("read "+c.name, func(t *testing.T) {
			_, err := ReadRP(bytes.NewReader(c.wire))
			wantDecodeError(t, err, ErrCorrupt, nil, -1, c.sub)
			if strings.Contains(err.Error(), "at stream byte") {
				t.Errorf("%q claims a stream offset", err)
			}
		})
	}
	boom := errors.New("reset")
	if _, err := ReadRP(&failingReader{data: []byte{0, 2}, err: boom}); !errors.Is(err, boom) || errors.Is(err, ErrCorrupt) {
		t.Errorf("reader error: %v", err)
	}
}
