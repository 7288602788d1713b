package stream

import (
	"bytes"
	"errors"
	"io"
	"slices"
	"testing"
)

// minimalStream writes a header, a handshake, an empty RAM section and
// closes the stream (EOF marker and vmdesc).
func minimalStream(t *testing.T, w io.Writer) *Encoder {
	t.Helper()
	e := NewEncoder(w)
	must(t, e.WriteHeader(guestName))
	h := testHandshake()
	h.Protocol, h.Side = HandshakeProtocol, SideSource
	h.Extensions = []string{ExtSwitchoverCommit}
	must(t, e.WriteHandshake(h))
	must(t, e.Close())
	return e
}

// TestTrailerFrames: the frames after the vmdesc are 8 bytes, "MGCT" then
// a be32 code (1 keepalive, 2 go, 3 abort — written here, not taken from
// the code under test), readable only after the vmdesc, in order.
func TestTrailerFrames(t *testing.T) {
	var buf bytes.Buffer
	e := minimalStream(t, &buf)
	streamEnd := buf.Len()
	for _, tr := range []Trailer{TrailerKeepalive, TrailerGo, TrailerAbort} {
		must(t, e.WriteTrailer(tr))
	}
	want := []byte{'M', 'G', 'C', 'T', 0, 0, 0, 1, 'M', 'G', 'C', 'T', 0, 0, 0, 2, 'M', 'G', 'C', 'T', 0, 0, 0, 3}
	if got := buf.Bytes()[streamEnd:]; !bytes.Equal(got, want) {
		t.Fatalf("trailer bytes %x, want %x", got, want)
	}
	if err := e.WriteTrailer(Trailer(4)); !errors.Is(err, ErrInvalid) {
		t.Errorf("WriteTrailer(4): %v, want ErrInvalid", err)
	}

	d := NewDecoder(bytes.NewReader(buf.Bytes()), testLimits())
	if _, err := d.NextTrailer(); !errors.Is(err, ErrOrder) {
		t.Fatalf("NextTrailer before the vmdesc: %v, want ErrOrder", err)
	}
	var hs *Handshake
	for {
		rec, err := d.Next()
		must(t, err)
		if rec.Kind == KindEOF {
			if _, err := d.NextTrailer(); !errors.Is(err, ErrOrder) {
				t.Fatalf("NextTrailer between the EOF marker and the vmdesc: %v, want ErrOrder", err)
			}
			continue
		}
		if rec.Kind == KindHandshake {
			hs = rec.Handshake
		}
		if rec.Kind == KindVMDesc {
			break
		}
	}
	if hs == nil || !hs.Speaks(ExtSwitchoverCommit) || !slices.Equal(hs.Extensions, []string{"switchover-commit/1"}) {
		t.Fatalf("handshake extensions: %+v", hs)
	}
	var got []Trailer
	for {
		tr, err := d.NextTrailer()
		if err == io.EOF {
			break
		}
		must(t, err)
		got = append(got, tr)
	}
	if !slices.Equal(got, []Trailer{1, 2, 3}) {
		t.Fatalf("read %v, want keepalive, go, abort", got)
	}
}

func TestWriteTrailerBeforeClose(t *testing.T) {
	var buf bytes.Buffer
	e := NewEncoder(&buf)
	must(t, e.WriteHeader(guestName))
	n := buf.Len() + int(e.Stats().Bytes)
	if err := e.WriteTrailer(TrailerGo); !errors.Is(err, ErrOrder) {
		t.Fatalf("WriteTrailer before Close: %v, want ErrOrder", err)
	}
	if got := buf.Len() + int(e.Stats().Bytes); got != n {
		t.Fatalf("a refused WriteTrailer wrote %d bytes", got-n)
	}
}

// TestTrailerCorrupt: a bad magic, an unknown code and a frame cut short
// are corrupt; a clean end between frames is io.EOF.
func TestTrailerCorrupt(t *testing.T) {
	var base bytes.Buffer
	minimalStream(t, &base)
	for name, tail := range map[string][]byte{
		"bad magic":    {'M', 'G', 'C', 'X', 0, 0, 0, 2},
		"unknown code": {'M', 'G', 'C', 'T', 0, 0, 0, 9},
		"code zero":    {'M', 'G', 'C', 'T', 0, 0, 0, 0},
		"cut short":    {'M', 'G', 'C', 'T', 0, 0},
	} {
		t.Run(name, func(t *testing.T) {
			d := NewDecoder(bytes.NewReader(append(bytes.Clone(base.Bytes()), tail...)), testLimits())
			for {
				rec, err := d.Next()
				must(t, err)
				if rec.Kind == KindVMDesc {
					break
				}
			}
			if _, err := d.NextTrailer(); !errors.Is(err, ErrCorrupt) {
				t.Fatalf("NextTrailer: %v, want ErrCorrupt", err)
			}
		})
	}
}

// TestCommitRPMessages: the protocol's return-path messages have the
// migctl type numbers written here and their payload rules.
func TestCommitRPMessages(t *testing.T) {
	var buf bytes.Buffer
	must(t, WriteRP(&buf, NewHello(ExtSwitchoverCommit, "other/2")))
	must(t, WriteRP(&buf, RPMessage{Type: RPLoaded}))
	must(t, WriteRP(&buf, RPMessage{Type: RPKeepalive}))
	want := append([]byte{0x7f, 0x01, 0, 27}, "switchover-commit/1 other/2"...)
	want = append(want, 0x7f, 0x02, 0, 0, 0x7f, 0x03, 0, 0)
	if !bytes.Equal(buf.Bytes(), want) {
		t.Fatalf("wire %x, want %x", buf.Bytes(), want)
	}
	m, err := ReadRP(&buf)
	must(t, err)
	if !slices.Equal(m.Extensions(), []string{ExtSwitchoverCommit, "other/2"}) {
		t.Fatalf("hello extensions %q", m.Extensions())
	}
	for _, typ := range []RPType{RPLoaded, RPKeepalive} {
		if m, err := ReadRP(&buf); err != nil || m.Type != typ {
			t.Fatalf("read %v, %v; want %v", m, err, typ)
		}
	}
	for name, bad := range map[string][]byte{
		"loaded with data":    {0x7f, 0x02, 0, 1, 'x'},
		"keepalive with data": {0x7f, 0x03, 0, 1, 'x'},
		"hello with a NUL":    {0x7f, 0x01, 0, 3, 'a', 0, 'b'},
		"hello too long":      append([]byte{0x7f, 0x01, 0x01, 0x01}, bytes.Repeat([]byte{'a'}, 257)...),
	} {
		if _, err := ReadRP(bytes.NewReader(bad)); !errors.Is(err, ErrCorrupt) {
			t.Errorf("%s: %v, want ErrCorrupt", name, err)
		}
	}
}

// TestHandshakeExtensionsBounded: a handshake's extension list is bounded
// and printable, like the rest of what a peer sends.
func TestHandshakeExtensionsBounded(t *testing.T) {
	for name, js := range map[string]string{
		"control char": `{"protocol":1,"side":"source","extensions":["a\u0001"]}`,
		"too long":     `{"protocol":1,"side":"source","extensions":["` + string(bytes.Repeat([]byte{'x'}, 65)) + `"]}`,
		"too many":     `{"protocol":1,"side":"source","extensions":["a","b","c","d","e","f","g","h","i","j","k","l","m","n","o","p","q"]}`,
	} {
		if h, detail := parseHandshake([]byte(js), HandshakeVersion); h != nil || detail == "" {
			t.Errorf("%s: accepted", name)
		}
	}
	if h, detail := parseHandshake([]byte(`{"protocol":1,"side":"source","extensions":["switchover-commit/1"]}`), HandshakeVersion); h == nil {
		t.Errorf("a valid extension list refused: %s", detail)
	}
}

func FuzzNextTrailer(f *testing.F) {
	f.Add([]byte{'M', 'G', 'C', 'T', 0, 0, 0, 2})
	f.Add([]byte{'M', 'G', 'C', 'T', 0, 0, 0, 1, 'M', 'G', 'C', 'T', 0, 0, 0, 3})
	f.Add([]byte{'M', 'G'})
	var base bytes.Buffer
	e := NewEncoder(&base)
	must(f, e.WriteHeader(guestName))
	must(f, e.Close())
	f.Fuzz(func(t *testing.T, tail []byte) {
		d := NewDecoder(bytes.NewReader(append(bytes.Clone(base.Bytes()), tail...)), Limits{PageSize: testPS})
		for {
			rec, err := d.Next()
			if err != nil {
				t.Fatalf("the stream itself: %v", err)
			}
			if rec.Kind == KindVMDesc {
				break
			}
		}
		for {
			tr, err := d.NextTrailer()
			if err == io.EOF {
				return
			}
			if err != nil {
				if !errors.Is(err, ErrCorrupt) {
					t.Fatalf("unclassified error: %v", err)
				}
				return
			}
			if tr < TrailerKeepalive || tr > TrailerAbort {
				t.Fatalf("accepted frame %v", tr)
			}
		}
	})
}
