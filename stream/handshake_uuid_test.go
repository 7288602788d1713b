package stream

import (
	"bytes"
	"encoding/json"
	"errors"
	"strings"
	"testing"
)

const testUUID = "11111111-2222-3333-4444-555555555555"

// writeHS writes a header and h and returns the bytes.
func writeHS(t *testing.T, h *Handshake) []byte {
	t.Helper()
	var b bytes.Buffer
	e := NewEncoder(&b)
	must(t, e.WriteHeader(guestName))
	must(t, e.WriteHandshake(h))
	must(t, e.Flush())
	return b.Bytes()
}

// readHS decodes a stream up to its handshake record.
func readHS(t *testing.T, b []byte) (Record, error) {
	t.Helper()
	d := NewDecoder(bytes.NewReader(b), testLimits())
	for {
		rec, err := d.Next()
		if err != nil || rec.Kind == KindHandshake {
			return rec, err
		}
	}
}

// The UUID is a versioned addition: a handshake with one is section
// version 2 and decodes with it; one without stays version 1, so a
// destination that reads only version 1 still reads it.
func TestHandshakeUUID(t *testing.T) {
	h := testHandshake()
	rec, err := readHS(t, writeHS(t, h))
	if err != nil {
		t.Fatal(err)
	}
	if rec.Section.Version != 1 || rec.Handshake.UUID != "" || strings.Contains(string(rec.Data), "uuid") {
		t.Fatalf("without UUID: version %d, UUID %q, JSON %s", rec.Section.Version, rec.Handshake.UUID, rec.Data)
	}
	h.UUID = testUUID
	rec, err = readHS(t, writeHS(t, h))
	if err != nil {
		t.Fatal(err)
	}
	if rec.Section.Version != 2 || rec.Handshake.UUID != testUUID {
		t.Fatalf("with UUID: version %d, UUID %q", rec.Section.Version, rec.Handshake.UUID)
	}

	for _, bad := range []string{"11111111-2222-3333-4444-55555555555G", "11111111-2222-3333-4444-55555555555", "11111111-2222-3333-4444-55555555555A", "x"} {
		h.UUID = bad
		var b bytes.Buffer
		e := NewEncoder(&b)
		must(t, e.WriteHeader(guestName))
		if err := e.WriteHandshake(h); !errors.Is(err, ErrInvalid) {
			t.Errorf("WriteHandshake with UUID %q: %v, want ErrInvalid", bad, err)
		}
	}
}

// rawHS is a stream whose handshake section has the given version and
// JSON payload.
func rawHS(version uint32, js []byte) []byte {
	return new(raw).header().sectionHeader(SecFull, 0, HandshakeIDStr, 0, version).be32(uint32(len(js))).bytes(js).Bytes()
}

func TestHandshakeUUIDDecodeErrors(t *testing.T) {
	h := testHandshake()
	h.Protocol, h.Side = HandshakeProtocol, SideSource
	plain, _ := json.Marshal(h)
	h.UUID = testUUID
	withUUID, _ := json.Marshal(h)
	h.UUID = "11111111-2222-3333-4444-55555555555F"
	upper, _ := json.Marshal(h)
	h.UUID = strings.Repeat("9", 1000)
	long, _ := json.Marshal(h)
	for _, c := range []struct {
		name  string
		b     []byte
		class error
		want  string
	}{
		{"version 1 with a UUID", rawHS(1, withUUID), ErrCorrupt, "a version 1 handshake carries a UUID"},
		{"version 2 without a UUID", rawHS(2, plain), ErrCorrupt, "is not a UUID"},
		{"version 2, uppercase UUID", rawHS(2, upper), ErrCorrupt, "is not a UUID in canonical lowercase form"},
		{"version 2, long UUID", rawHS(2, long), ErrCorrupt, "is not a UUID"},
		{"version 3", rawHS(3, withUUID), ErrUnsupported, "section version 3, this build reads versions 1 and 2"},
	} {
		t.Run(c.name, func(t *testing.T) {
			_, err := readHS(t, c.b)
			wantDecodeError(t, err, c.class, nil, -1, c.want)
			if len(err.Error()) > 1024 {
				t.Errorf("error of %d bytes: the peer's UUID is not bounded", len(err.Error()))
			}
		})
	}
	if _, err := readHS(t, rawHS(1, plain)); err != nil {
		t.Fatalf("a version 1 handshake (older migctl): %v", err)
	}
}

func TestHandshakeCheckUUID(t *testing.T) {
	a, b := testHandshake(), testHandshake()
	a.Side, b.Side = SideDestination, SideSource
	a.UUID, b.UUID = testUUID, "99999999-2222-3333-4444-555555555555"
	err := a.Check(b)
	if err == nil || !strings.Contains(err.Error(), "UUID received is 99999999-2222-3333-4444-555555555555 and local is "+testUUID) {
		t.Fatalf("Check: %v", err)
	}
	b.UUID = ""
	if err := a.Check(b); err != nil {
		t.Fatalf("a source without UUID: %v", err)
	}
}

func FuzzParseHandshake(f *testing.F) {
	h := testHandshake()
	js, _ := json.Marshal(h)
	f.Add(js, uint32(1))
	h.UUID = testUUID
	js, _ = json.Marshal(h)
	f.Add(js, uint32(2))
	f.Add([]byte(`{"protocol":1,"side":"source","uuid":"`+testUUID+`"}`), uint32(2))
	f.Fuzz(func(t *testing.T, data []byte, version uint32) {
		hs, msg := parseHandshake(data, version)
		if msg != "" {
			if hs != nil {
				t.Fatal("a refused handshake was returned")
			}
			if len(msg) > 4096 {
				t.Fatalf("detail of %d bytes", len(msg))
			}
			return
		}
		if version == HandshakeVersion && hs.UUID != "" {
			t.Fatalf("version 1 accepted with UUID %q", hs.UUID)
		}
		if version == HandshakeVersionUUID && !validUUID(hs.UUID) {
			t.Fatalf("version 2 accepted with UUID %q", hs.UUID)
		}
	})
}
