package engine_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"io"
	"net"
	"strings"
	"sync"
	"testing"

	"github.com/migctl/migctl/guest"
)

// headProxy forwards every connection to target. It reads the first 64
// bytes from the source (a multifd channel's initial packet, or the start
// of the main stream), lets edit change them, records them, and forwards
// the rest untouched. It returns the tcp: URI to dial.
type headProxy struct {
	edit  func(head []byte)
	mu    sync.Mutex
	heads [][]byte
}

func (p *headProxy) start(t *testing.T, target string) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	t.Cleanup(func() { ln.Close(); wg.Wait() })
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			u, err := net.Dial("tcp", strings.TrimPrefix(target, "tcp:"))
			if err != nil {
				c.Close()
				return
			}
			wg.Add(2)
			go func() {
				defer wg.Done()
				io.Copy(c, u)
				c.Close()
			}()
			go func() {
				defer wg.Done()
				defer u.(*net.TCPConn).CloseWrite()
				head := make([]byte, 64)
				if _, err := io.ReadFull(c, head); err != nil {
					return
				}
				if p.edit != nil {
					p.edit(head)
				}
				p.mu.Lock()
				p.heads = append(p.heads, bytes.Clone(head))
				p.mu.Unlock()
				if _, err := u.Write(head); err == nil {
					io.Copy(u, c)
				}
			}()
		}
	}()
	return "tcp:" + ln.Addr().String()
}

// initUUIDs returns the UUID of every multifd initial packet the proxy
// saw, by channel id.
func (p *headProxy) initUUIDs() map[int]guest.UUID {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := map[int]guest.UUID{}
	for _, h := range p.heads {
		if binary.BigEndian.Uint32(h) == 0x11223344 {
			out[int(h[24])] = guest.UUID(h[8:24])
		}
	}
	return out
}

const (
	uuidU = "11111111-1111-1111-1111-111111111111"
	uuidV = "22222222-2222-2222-2222-222222222222"
	uuidW = "33333333-3333-3333-3333-333333333333"
)

func mustUUID(t *testing.T, s string) guest.UUID {
	t.Helper()
	if s == "" {
		return guest.UUID{}
	}
	u, err := guest.ParseUUID(s)
	if err != nil {
		t.Fatal(err)
	}
	return u
}

// Every multifd channel's initial packet carries the source guest's UUID
// (all zero without one, as QEMU fills it from -uuid), whatever
// validate-uuid says; the destination judges it by validate-uuid's rule:
// against the UUID the main stream announced, or, when it announced none,
// for agreement between the channels. A channel whose UUID was changed on
// the way is refused on both sides with a reason naming both UUIDs.
func TestMultifdChannelUUID(t *testing.T) {
	for _, tc := range []struct {
		name     string
		src, dst string // guests' UUIDs ("" none)
		validate bool
		tamper   string // a UUID the proxy writes into channel 1's initial packet
		want     string // "" completes; else both sides' reason contains it
	}{
		{name: "match", src: uuidU, dst: uuidU, validate: true},
		{name: "destination without", src: uuidU, validate: true},
		{name: "source without", dst: uuidV, validate: true},
		{name: "different, validate-uuid off", src: uuidU, dst: uuidV},
		{name: "channel from another migration", src: uuidU, dst: uuidU, validate: true, tamper: uuidW,
			want: "multifd channel 1 carries VM UUID " + uuidW + ", but the main stream announced " + uuidU},
		{name: "channels disagree, validate-uuid off", src: uuidU, dst: uuidU, tamper: uuidW,
			want: "carries VM UUID " + uuidW + ", another channel " + uuidU + ": the channels come from different sources"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			sc, dc := tlsGuest(), tlsGuest()
			sc.UUID, dc.UUID = mustUUID(t, tc.src), mustUUID(t, tc.dst)
			src, dst := newTLSEnd(t, false, sc), newTLSEnd(t, true, dc)
			for _, e := range []*tlsEnd{src, dst} {
				if err := e.c.SetCapabilities(context.Background(), map[string]bool{"multifd": true, "validate-uuid": tc.validate}); err != nil {
					t.Fatal(err)
				}
				e.set(t, map[string]any{"multifd-channels": 3})
			}
			p := &headProxy{}
			if tc.tamper != "" {
				w := mustUUID(t, tc.tamper)
				p.edit = func(h []byte) {
					if binary.BigEndian.Uint32(h) == 0x11223344 && h[24] == 1 {
						copy(h[8:24], w[:])
					}
				}
			}
			sr, dr := tlsMigrate(t, src, dst, "tcp:127.0.0.1:0", func(u string) string { return p.start(t, u) })
			if tc.want != "" {
				for _, c := range []struct {
					side string
					err  error
				}{{"source", sr.Err}, {"destination", dr.Err}} {
					if c.err == nil || !strings.Contains(c.err.Error(), tc.want) {
						t.Errorf("%s: %v\nwant a reason containing %q", c.side, c.err, tc.want)
					}
				}
				return
			}
			if sr.Err != nil || dr.Err != nil {
				t.Fatalf("source %v, destination %v", sr.Err, dr.Err)
			}
			sameMemory(t, src, dst)
			got := p.initUUIDs()
			if len(got) != 3 {
				t.Fatalf("initial packets seen for channels %v, want 0, 1, 2", got)
			}
			for id, u := range got {
				if u != sc.UUID {
					t.Errorf("channel %d's initial packet carries %s, want the source guest's %s", id, u, sc.UUID)
				}
			}
		})
	}
}
